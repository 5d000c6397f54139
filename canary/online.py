"""`northstar canary status | evaluate | promote | rollback`: the online half of the loop.

`evaluate_canary` reads the north-star metric per arm from the feedback labels (CTR and
engaged value per impression since the canary started, both arms over the same period,
aggregated per user with each user's earlier behaviour as the CUPED covariate), the
serving guardrails from `recommend`'s per-version metrics on Triton's endpoint, and online
fairness by user group; the pure `canary.verdict.online_decision` turns those numbers into
promote, roll back or continue.
With `auto`, the decision is applied:

    promote:  routing production = canary, canary = none; unload the old version after
    rollback: routing canary = none; unload the canary

Each change loads first and rewrites routing.json second (`serving.control.switch_routing`), and
unloads only after `drain_s`, once `recommend` has re-read the routing, so no request
ever meets an unloaded version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from canary import decide, verdict
from canary.group_ratio_ci import per_user_groups, ratio_diff_upper
from canary.inference import (
    ArmUsers,
    SequentialState,
    delta_test,
    per_user,
    sequential_update,
    with_covariate,
)
from canary.prom import fleet_serving_metrics
from canary.state import CanaryRecord, ProductionRecord, StateStore
from canary.stats import srm_chi2
from fairness.inputs import user_attributes
from fairness.online import online_by_group
from feedback.join import JoinConfig, read_labels, run_join
from serving import repository as layout
from serving.control import switch_routing
from serving.routing import RoutingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    state_dir: str = "canary"
    repo: str = "model_repository"
    # Triton gRPC: loads and unloads versions; "a,b" or dns:NAME:PORT for every replica
    url: str | None = "localhost:8001"
    # Triton's Prometheus endpoint, where `recommend` publishes its per-version serving
    # metrics. None: no guardrails, so the canary is never promoted (gates.
    # require_serving_metrics=False lifts that for offline replays of labels).
    # Triton's metrics endpoint, or several ("a,b", dns:NAME:PORT): the guardrails read the
    # per-version counters summed over every replica.
    metrics_url: str | None = "localhost:8002"
    labels: str | None = None  # feedback join output
    event_log: str | None = None  # when set, the join runs first, into `labels`
    join_window_s: float = 1800.0
    join_as_of: float | None = None
    users: str | None = None  # users.parquet for group fairness; default: production's data
    auto: bool = False  # apply the decision (promote / roll back)
    gates: verdict.OnlineGates = field(default_factory=verdict.OnlineGates)
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
        # One line per look at the current (or last) canary: what the verdict rested on.
        "looks": [look_summary(h) for h in state["history"] if h.get("kind") == "evaluate"][-20:],
    }


def look_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one recorded look: users per arm, the delta-method interval, the CUPED
    variance reduction, the always-valid state, and each version's serving metrics."""
    ev = entry.get("evidence") or {}
    t, seq, srv = ev.get("ctr_test") or {}, ev.get("sequential") or {}, ev.get("serving") or {}
    return {
        "ts": entry.get("ts"),
        "canary": entry.get("canary"),
        "decision": entry.get("decision"),
        "users": {"production": t.get("users_a"), "canary": t.get("users_b")},
        "ctr": {"production": t.get("rate_a"), "canary": t.get("rate_b")},
        "diff": t.get("diff"),
        "ci": [t.get("ci_low"), t.get("ci_high")],
        "cuped_variance_reduction": t.get("variance_reduction"),
        "design_effect": t.get("design_effect"),
        "always_valid_p": seq.get("p_value"),
        "direction": seq.get("direction"),
        "confidence_sequence": [seq.get("ci_low"), seq.get("ci_high")],
        "serving": srv,
        "reason": (entry.get("reasons") or [""])[0],
    }


def _arm(version: int, users: ArmUsers) -> verdict.Arm:
    return verdict.Arm(
        version=int(version),
        impressions=int(users.n.sum()),
        clicks=int(users.y.sum()),
        users=users.users,
    )


def _pre_period(labels: pd.DataFrame, before: float) -> pd.Series:
    """Each user's linearised CTR before the canary started (the CUPED covariate), by id:
    (clicks - R·impressions) / mean impressions, R the pooled pre-period CTR."""
    pre = labels[labels["impression_ts"] < before]
    if pre.empty:
        return pd.Series(dtype=float)
    g = pre.groupby("user_id")["clicked"].agg(["sum", "size"])
    r = g["sum"].sum() / g["size"].sum()
    return (g["sum"] - r * g["size"]) / g["size"].mean()


def group_ratios(
    labels: pd.DataFrame,
    users: pd.DataFrame | None,
    versions: dict[str, int],
    gates: verdict.OnlineGates,
) -> dict[str, dict[str, float | None]]:
    """Per attribute and arm: min/max CTR across groups with enough impressions
    (fairness.online_by_group's per-version figures), and "diff_upper": the user-clustered
    always-valid upper bound of canary ratio - production ratio (`canary.group_ratio_ci`)."""
    if users is None or labels.empty:
        return {}

    fb = labels[["user_id", "model_version", "clicked", "value"]].copy()
    fb["clicked"] = fb["clicked"].astype(float)
    fb["value"] = fb["value"].fillna(0.0).astype(float)
    online = online_by_group(feedback=fb, users=users, attributes=gates.fairness_attributes)
    attrs = user_attributes(users=users, user_ids=fb["user_id"].to_numpy(np.int64))
    out: dict[str, dict[str, float | None]] = {}
    for attr, body in online["attributes"].items():
        out[attr] = {}
        eligible: dict[str, list[str]] = {}
        for arm, v in versions.items():
            groups = body["by_group"].get(str(v), {})
            eligible[arm] = sorted(
                g for g, m in groups.items() if m["impressions"] >= gates.min_group_impressions
            )
            ctrs = [groups[g]["ctr"] for g in eligible[arm]]
            ok = len(ctrs) >= 2 and max(ctrs) > 0
            out[attr][arm] = min(ctrs) / max(ctrs) if ok else None
        if out[attr]["production"] is None or out[attr]["canary"] is None:
            continue
        pu = per_user_groups(fb, attrs[attr])
        pu_version = pu["model_version"].astype(str)
        out[attr]["diff_upper"] = ratio_diff_upper(
            pu[pu_version == str(versions["production"])],
            pu[pu_version == str(versions["canary"])],
            groups_production=eligible["production"],
            groups_canary=eligible["canary"],
            alpha=gates.fairness_level,
            tau=gates.max_group_ratio_drop,
        )
    return out


def gather_evidence(
    cfg: EvaluateConfig, canary: CanaryRecord, prod: ProductionRecord
) -> verdict.OnlineEvidence:
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
    all_labels = read_labels(cfg.labels)
    # Both arms over the same period: production's traffic before the canary started is a
    # different population of days and would bias the comparison. It is the covariate.
    labels = all_labels[
        (all_labels["impression_ts"] >= canary.started + cfg.burn_in_s)
        & all_labels["model_version"].isin([prod.version, canary.version])
    ]
    versions = (prod.version, canary.version)
    (ids_a, ua), (ids_b, ub) = per_user(labels, versions=versions)
    if cfg.gates.cuped:
        pre = _pre_period(all_labels, canary.started)
        ua, ub = with_covariate(ua, ids_a, pre), with_covariate(ub, ids_b, pre)
    a, b = _arm(prod.version, ua), _arm(canary.version, ub)
    test = seq = value_test = srm = None
    if min(ua.users, ub.users) >= 2:
        g = cfg.gates
        test = delta_test(ua, ub, alpha=g.alpha, cuped=g.cuped)
        previous = SequentialState.from_dict(canary.sequential)
        seq = sequential_update(
            previous, diff=test.diff, var=test.var, tau2=g.tau**2, alpha=g.alpha
        )
        engaged = labels.assign(value=labels["value"].fillna(0.0).astype(float))
        (_, va), (_, vb) = per_user(engaged, versions=versions, metric="value")
        value_test = delta_test(va, vb, alpha=g.alpha, cuped=False)
    pct = canary.percent
    if a.users + b.users > 0 and 0 < pct < 100:
        # Users are the unit the hash assigns; impressions cluster within users.
        srm = srm_chi2(observed=[a.users, b.users], shares=[100 - pct, pct])
    serving_p = serving_c = None
    if cfg.metrics_url:
        try:
            m = fleet_serving_metrics(cfg.metrics_url)
            serving_p, serving_c = m.get(str(prod.version)), m.get(str(canary.version))
        except OSError as exc:  # no numbers: the verdict says "cannot decide"
            log.warning("metrics endpoint %s unreachable (%s)", cfg.metrics_url, exc)
    users = _users(cfg, prod)
    fairness = group_ratios(
        labels, users, {"production": prod.version, "canary": canary.version}, cfg.gates
    )
    return verdict.OnlineEvidence(
        a, b, test, seq, srm, serving_p, serving_c, fairness, value_test=value_test
    )


def _users(cfg: EvaluateConfig, prod: ProductionRecord) -> pd.DataFrame | None:
    path = cfg.users
    if path is None:
        try:
            # lazy: torch (training.run), for one file name; the online decision runs without it
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
    decision = verdict.online_decision(ev, cfg.gates)
    evidence = ev.to_dict()
    evidence["verdict"] = decision.to_dict()
    out = Evaluation(decision, evidence, canary=canary.version, production=prod.version)
    if ev.sequential is not None:
        with store.update() as s:
            current = CanaryRecord.from_state(s)
            if current is not None and current.version == canary.version:
                current.sequential = ev.sequential.to_dict()
                current.msprt_p = ev.sequential.p_value  # the running minimum
                current.looks += 1
                s["canary"] = current.to_dict()
    store.record(
        "evaluate",
        decision.action,
        list(decision.reasons),
        evidence,
        canary=out.canary,
        production=out.production,
        auto=cfg.auto,
    )
    if cfg.auto and decision.action == decide.PROMOTE:
        promote(cfg, reasons=list(decision.reasons), evidence=evidence)
        out.applied = True
    elif cfg.auto and decision.action == decide.ROLLBACK:
        rollback(cfg, reasons=list(decision.reasons), evidence=evidence)
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
        # lazy: MLflow is heavy; only this registry update needs it
        from canary.tracking import Tracker

        t = Tracker(cfg.state_dir, cfg.tracking_uri)
        if champion:
            t.set_alias("champion", champion)
        t.set_alias("challenger", None)
    except Exception as exc:  # the registry mirrors serving; it never blocks it
        log.warning("MLflow alias update failed: %s", exc)
