"""`northstar canary status | evaluate | promote | rollback`: the online half of the loop.

`evaluate_canary` reads the north-star metric per arm from the feedback labels (CTR per
impression, since the canary started, production and canary over the same period), the
guardrails from Triton's metrics endpoint, and online fairness by user group; the pure
`canary.decide.online_decision` turns those numbers into promote, roll back or continue.
With `auto`, the decision is applied:

    promote:  routing production = canary, canary = none; unload the old version after
    rollback: routing canary = none; unload the canary

Each change loads first and rewrites routing.json second (`serving.control.switch_routing`), and
unloads only after `drain_s`, once `recommend` has re-read the routing, so no request
ever meets an unloaded version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from canary import decide
from canary.state import CanaryRecord, ProductionRecord, StateStore
from canary.stats import msprt, srm_chi2, two_proportion_z
from serving import repository as layout
from serving.control import switch_routing
from serving.routing import RoutingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    state_dir: str = "canary"
    repo: str = "model_repository"
    url: str | None = "localhost:8001"  # Triton gRPC: loads and unloads versions
    metrics_url: str | None = "localhost:8002"  # Triton Prometheus endpoint; None: no guardrails
    labels: str | None = None  # feedback join output
    event_log: str | None = None  # when set, the join runs first, into `labels`
    join_window_s: float = 1800.0
    join_as_of: float | None = None
    users: str | None = None  # users.parquet for group fairness; default: production's data
    auto: bool = False  # apply the decision (promote / roll back)
    gates: decide.OnlineGates = field(default_factory=decide.OnlineGates)
    tracking_uri: str | None = None
    drain_s: float = 2.0  # recommend re-reads routing.json at most once a second
    # Burn-in after the canary is routed: `recommend` re-reads routing.json at most once a
    # second and loads a new version's features on first use, so for a moment some canary
    # users are still answered by production. Counting that moment shows up as a sample-ratio
    # mismatch that is only this start-up moment, so it is left out.
    burn_in_s: float = 5.0


@dataclass
class Evaluation:
    verdict: decide.Verdict
    evidence: dict[str, Any]
    applied: bool = False
    canary: int | None = None
    production: int | None = None

    @property
    def action(self) -> str:
        return self.verdict.action


def status(state_dir: str | Path, repo: str | Path) -> dict[str, Any]:
    """State file + live routing, and the last few decisions."""
    state = StateStore(state_dir).load()
    path = layout.routing_path(repo)
    routing = RoutingState.load(path).__dict__ if path.exists() else None
    prod, canary = ProductionRecord.from_state(state), CanaryRecord.from_state(state)
    return {
        "production": prod.to_dict() if prod else None,
        "canary": canary.to_dict() if canary else None,
        "routing": routing,
        "in_progress": state["in_progress"],
        "last_retrain": state["last_retrain"],
        "history": state["history"][-10:],
    }


def arm_stats(labels: pd.DataFrame, version: int) -> decide.Arm:
    rows = labels[labels["model_version"] == version]
    return decide.Arm(
        version=int(version),
        impressions=len(rows),
        clicks=int(rows["clicked"].sum()),
        users=int(rows["user_id"].nunique()),
    )


def group_ratios(
    labels: pd.DataFrame,
    users: pd.DataFrame | None,
    versions: dict[str, int],
    gates: decide.OnlineGates,
) -> dict[str, dict[str, float | None]]:
    """Per attribute and arm: min/max CTR across groups with enough impressions
    (fairness.online_by_group's per-version figures)."""
    if users is None or labels.empty:
        return {}
    from fairness.online import online_by_group

    fb = labels[["user_id", "model_version", "clicked", "value"]].copy()
    fb["clicked"] = fb["clicked"].astype(float)
    fb["value"] = fb["value"].fillna(0.0).astype(float)
    online = online_by_group(feedback=fb, users=users, attributes=gates.fairness_attributes)
    out: dict[str, dict[str, float | None]] = {}
    for attr, body in online["attributes"].items():
        out[attr] = {}
        for arm, v in versions.items():
            groups = body["by_group"].get(str(v), {})
            ctrs = [
                g["ctr"] for g in groups.values() if g["impressions"] >= gates.min_group_impressions
            ]
            ok = len(ctrs) >= 2 and max(ctrs) > 0
            out[attr][arm] = min(ctrs) / max(ctrs) if ok else None
    return out


def gather_evidence(
    cfg: EvaluateConfig, canary: CanaryRecord, prod: ProductionRecord
) -> decide.OnlineEvidence:
    from feedback.join import JoinConfig, read_labels, run_join

    if cfg.event_log:
        if not cfg.labels:
            raise ValueError("event_log is set but labels is not")
        run_join(
            JoinConfig(
                log=cfg.event_log, out=cfg.labels, window_s=cfg.join_window_s, as_of=cfg.join_as_of
            )
        )
    if not cfg.labels:
        raise ValueError("canary evaluate needs `labels` (the feedback join output)")
    labels = read_labels(cfg.labels)
    # Both arms over the same period: production's traffic before the canary started is a
    # different population of days and would bias the comparison.
    labels = labels[
        (labels["impression_ts"] >= canary.started + cfg.burn_in_s)
        & labels["model_version"].isin([prod.version, canary.version])
    ]
    a = arm_stats(labels, prod.version)
    b = arm_stats(labels, canary.version)
    z = seq = srm = None
    if a.impressions and b.impressions:
        z = two_proportion_z(
            clicks_a=a.clicks, n_a=a.impressions, clicks_b=b.clicks, n_b=b.impressions
        )
        var = z.se**2
        seq = msprt(diff=z.diff, var=var, tau2=cfg.gates.tau**2, previous_p=canary.msprt_p)
    pct = canary.percent
    if a.users + b.users > 0 and 0 < pct < 100:
        # Users are the unit the hash assigns; impressions cluster within users.
        srm = srm_chi2(observed=[a.users, b.users], shares=[100 - pct, pct])
    guard_p = guard_c = None
    if cfg.metrics_url:
        from canary.prom import fetch, guardrails

        try:
            g = guardrails(fetch(cfg.metrics_url))
            guard_p, guard_c = g.get(prod.version), g.get(canary.version)
        except OSError as exc:
            log.warning("metrics endpoint %s unreachable (%s)", cfg.metrics_url, exc)
    users = _users(cfg, prod)
    fairness = group_ratios(
        labels, users, {"production": prod.version, "canary": canary.version}, cfg.gates
    )
    return decide.OnlineEvidence(a, b, z, seq, srm, guard_p, guard_c, fairness)


def _users(cfg: EvaluateConfig, prod: ProductionRecord) -> pd.DataFrame | None:
    path = cfg.users
    if path is None:
        try:
            import json

            from training.run import RUN_FILE

            meta = json.loads((Path(prod.run) / RUN_FILE).read_text())
            path = str(Path(meta["data_dir"]) / "users.parquet")
        except (OSError, KeyError, ValueError):
            return None
    return pd.read_parquet(path) if Path(path).exists() else None


def evaluate_canary(cfg: EvaluateConfig) -> Evaluation:
    """One look at the canary; with cfg.auto the decision is applied and recorded."""
    store = StateStore(cfg.state_dir)
    state = store.load()
    canary, prod = CanaryRecord.from_state(state), ProductionRecord.from_state(state)
    if canary is None:
        v = decide.Verdict(decide.CONTINUE, ("no canary on trial",))
        return Evaluation(v, {}, production=prod.version if prod else None)
    if prod is None:
        raise ValueError(f"{store.path}: canary {canary.version} on trial but no production")
    ev = gather_evidence(cfg, canary, prod)
    verdict = decide.online_decision(ev, cfg.gates)
    evidence = ev.to_dict()
    evidence["verdict"] = verdict.to_dict()
    out = Evaluation(verdict, evidence, canary=canary.version, production=prod.version)
    if ev.sequential is not None:
        with store.update() as s:
            current = CanaryRecord.from_state(s)
            if current is not None and current.version == canary.version:
                current.msprt_p = ev.sequential.p_value  # the running minimum
                current.looks += 1
                s["canary"] = current.to_dict()
    store.record(
        "evaluate",
        verdict.action,
        list(verdict.reasons),
        evidence,
        canary=out.canary,
        production=out.production,
        auto=cfg.auto,
    )
    if cfg.auto and verdict.action == decide.PROMOTE:
        promote(cfg, reasons=list(verdict.reasons), evidence=evidence)
        out.applied = True
    elif cfg.auto and verdict.action == decide.ROLLBACK:
        rollback(cfg, reasons=list(verdict.reasons), evidence=evidence)
        out.applied = True
    return out


def _trial(
    cfg: EvaluateConfig, verb: str
) -> tuple[StateStore, CanaryRecord, ProductionRecord | None, Path, RoutingState]:
    """The state store, the canary on trial, production, the repo and the live routing."""
    store = StateStore(cfg.state_dir)
    state = store.load()
    canary, prod = CanaryRecord.from_state(state), ProductionRecord.from_state(state)
    if canary is None:
        raise ValueError(f"no canary to {verb}")
    repo = Path(cfg.repo)
    return store, canary, prod, repo, RoutingState.load(layout.routing_path(repo))


def promote(
    cfg: EvaluateConfig, *, reasons: list[str] | None = None, evidence: dict | None = None
) -> dict:
    """Canary becomes production; the old production version is unloaded after a drain."""
    store, canary, prod, repo, current = _trial(cfg, "promote")
    new = RoutingState(production=canary.version, salt=current.salt)
    _apply(cfg, repo, new)
    previous = prod.version if prod else None
    with store.update() as s:
        s["production"] = canary.promoted(previous=previous).to_dict()
        s["canary"] = None
        if canary.bias:
            s["bias"] = [*s.get("bias", []), {"version": canary.version, **canary.bias}]
    _aliases(cfg, champion=canary.mlflow_version)
    entry = store.record(
        "promote",
        "promote",
        reasons or ["promoted by hand"],
        evidence or {},
        version=canary.version,
        previous=previous,
    )
    log.info("promoted version %d (was %s)", canary.version, previous)
    return entry


def rollback(
    cfg: EvaluateConfig, *, reasons: list[str] | None = None, evidence: dict | None = None
) -> dict:
    """Canary removed from routing, then unloaded; production never changed."""
    store, canary, prod, repo, current = _trial(cfg, "roll back")
    new = RoutingState(production=current.production, salt=current.salt)
    _apply(cfg, repo, new)
    with store.update() as s:
        s["canary"] = None
    _aliases(cfg, champion=prod.mlflow_version if prod else None)
    entry = store.record(
        "rollback",
        "rollback",
        reasons or ["rolled back by hand"],
        evidence or {},
        version=canary.version,
        production=current.production,
    )
    log.info("rolled back canary %d; production %d", canary.version, current.production)
    return entry


def _apply(cfg: EvaluateConfig, repo: Path, new: RoutingState) -> None:
    """Load what `new` needs (keeping what the current routing uses), switch routing, wait
    for `recommend` to re-read it, then serve exactly `new`'s versions."""
    switch_routing(repo, new, url=cfg.url, drain_s=cfg.drain_s if cfg.url else None)


def _aliases(cfg: EvaluateConfig, *, champion: str | None) -> None:
    try:
        from canary.tracking import Tracker

        t = Tracker(cfg.state_dir, cfg.tracking_uri)
        if champion:
            t.set_alias("champion", champion)
        t.set_alias("challenger", None)
    except Exception as exc:  # the registry mirrors serving; it never blocks it
        log.warning("MLflow alias update failed: %s", exc)
