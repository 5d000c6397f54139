"""`retrain(cfg)`: feedback -> candidate -> offline gates -> Triton canary. Closes the loop.

    1 collect   join the event log (optional), export positives in the interaction schema,
                count the ones newer than the last model, pick the base data (production's)
    2 train     warm start from production's weights (same vocabulary) or a fresh model on
                a sliding window of the newest data
    3 evaluate  candidate vs production on the newest time slice: training's metrics,
                top-K churn, popularity bias (ARP, exposure Gini) and its trend
    4 fairness  the candidate's audit gated against production's (fairness.gates.check_gates)
    5 export    the next `retrieval` version, promote=False (production keeps routing.json)
    6 load      Triton loads production + candidate (all or nothing; old set keeps serving)
    7 route     routing.json: canary = candidate at canary_percent, written atomically
    8 record    state.json decision + MLflow run, registered version, `challenger` alias

Production is only ever changed by step 7 and only after step 6 succeeded, so a failure
anywhere (an exception, a failed gate, kill -9) leaves it serving as before. Every outcome
is a history entry with its numbers; a killed run is reported by the next one.

Each step is one function taking the `RetrainContext` (what the steps share); `collect`
returns a `Collected`; the production and canary entries of state.json are
`canary.state.ProductionRecord` and `CanaryRecord`. The base dataset is loaded once per
retrain and handed to the steps that need it. Fault injection (`RetrainConfig.fault`,
tests and demo only) lives in `canary.faults` and is called only when a fault is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from canary import decide, faults
from canary.faults import Fault
from canary.offline import compare_offline
from canary.state import Busy, CanaryRecord, ProductionRecord, StateStore, new_id
from fairness.gates import GateConfig
from feedback.join import JoinConfig, read_labels, run_join
from feedback.tiers import TierConfig, export_tiered
from models.features import FeatureVocab
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.control import switch_routing
from serving.publish import ExportConfig, export
from serving.routing import RoutingState
from training.run import FEATURES_FILE, VOCAB_FILE, load_run
from training.schema import Dataset
from training.train import TrainConfig, train

if TYPE_CHECKING:
    from canary.offline import OfflineReport
    from canary.tracking import Tracker
    from training.run import Run

log = logging.getLogger(__name__)

WINDOW_MODES = ("sliding_window", "warm_window")  # train (and evaluate) on the newest window
WARM_MODES = ("warm_start", "warm_window")  # start from production's weights


@dataclass(frozen=True)
class RetrainConfig:
    state_dir: str = "canary"  # state.json, mlflow.db, runs/<id>/, the retrain lock
    repo: str = "model_repository"
    # Triton gRPC address ("a,b" or dns:NAME:PORT for every replica); None changes only
    # files (the next server start serves them).
    url: str | None = "localhost:8001"
    labels: str | None = None  # feedback join output (feedback/README.md)
    event_log: str | None = None  # when set, the join runs first, into `labels`
    join_window_s: float = 1800.0  # must match the labels folder's window
    join_as_of: float | None = None  # None: event-time watermark; inf closes every window
    data: str | None = None  # base dataset; default: the production run's data dir
    # warm_start: production's weights and vocabulary, all data + feedback (cheap, stable).
    # sliding_window: a fresh model on the newest `window_days` (forgets stale taste).
    # warm_window: production's weights fine-tuned on the newest `window_days` + feedback:
    # the recency of a window without throwing away what the older log taught (tastes drift,
    # so the newest weeks say most about today; a fresh model on them alone has too little
    # data per user). Offline it is evaluated on the window's newest slice, as sliding_window.
    mode: Literal["warm_start", "sliding_window", "warm_window"] = "warm_start"
    window_days: float = 60.0
    # Fewer new positive labels than this since the last model: skip, nothing to learn.
    min_new_labels: int = 0
    # Which feedback labels the candidate learns from (feedback/tiers.py): "final" every
    # written positive; "weak" also impressions still in their window that have a click (a
    # fast schedule, hours fresher); "strong" only final long watches and likes (a slow,
    # cleaner schedule). `tiers` sets the strong threshold and the weak/strong loss weights
    # (weak_weight 1 here: every positive counts the same unless a schedule says otherwise).
    label_tier: Literal["final", "weak", "strong"] = "final"
    tiers: TierConfig = field(default_factory=lambda: TierConfig(weak_weight=1.0))
    # > 0: the candidate also learns from what users were shown and did not pick (the join's
    # final negatives, at impression time), pushed down with this weight
    # (TrainConfig.skip_negatives). 0: positives only. Needs the full softmax.
    skip_weight: float = 0.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    # Export: the largest k `recommend` serves and the over-fetch; None takes production's,
    # which is what a canary must match (versions served side by side share one config).
    k: int | None = None
    overfetch: int | None = None
    exporter: Literal["dynamo", "legacy"] = "dynamo"
    target: Literal["cpu", "gpu"] = "cpu"
    canary_percent: int = 10
    eval_k: int = 10  # offline metrics, churn and bias at this list length
    audit_boot: int = 50  # bootstrap resamples for the fairness audit's intervals
    gates: decide.OfflineGates = field(default_factory=decide.OfflineGates)
    fairness: GateConfig = field(default_factory=GateConfig)
    tracking_uri: str | None = None  # default sqlite:///STATE_DIR/mlflow.db
    # Seconds to let `recommend` re-read routing.json before the old version unloads.
    drain_s: float = 2.0
    # Fault injection for the tests and the demo (canary/faults.py); "none" in production.
    fault: Fault = "none"

    def __post_init__(self) -> None:
        if not 1 <= self.canary_percent <= 100:
            raise ValueError(f"canary_percent={self.canary_percent}; expected 1..100")
        if self.skip_weight < 0:
            raise ValueError(f"skip_weight={self.skip_weight}: expected >= 0")
        faults.check(self.fault)


@dataclass
class RetrainResult:
    id: str
    status: str  # canary | rejected | skipped | failed | busy
    step: str  # the last step reached: start, lock, collect, ... load, route, record
    reasons: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # the exported version, when one was made
    production: int | None = None
    run_dir: str | None = None
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Collected:
    """Step 1's result: what the candidate learns from, what it is evaluated on, the counts."""

    base_data: str  # the base dataset dir (production's, or `RetrainConfig.data`)
    data: Path  # the candidate's training data: the base, its window, or a fault copy
    eval_data: Path  # what both runs are evaluated on: the base or its window, never a fault
    extra: Path | None  # feedback positives the candidate learns from
    eval_extra: Path | None  # the real positives: evaluation history and serving features
    label_ts: float | None  # the cursor this retrain consumes: the newest positive's time
    positives: int  # positives with known ids (inside the window, for window modes)
    new_positives: int  # positives newer than the last retrain's cursor
    dropped_unknown_ids: int
    since_label_ts: float | None  # the last retrain's cursor
    base_interactions: int  # interactions in the base data (its window, for window modes)
    join: dict[str, Any] | None  # the join's report, when the event log was joined first
    fault: str
    # `eval_data` in memory (the base or its window), so no step loads it again.
    eval_dataset: Dataset | None = field(default=None, repr=False, compare=False)
    skips: Path | None = None  # impressions not picked (RetrainConfig.skip_weight > 0)
    n_skips: int = 0

    def evidence(self) -> dict[str, Any]:
        """What the history entry records under "collect"."""
        return {
            "base_data": self.base_data,
            "join": self.join,
            "positives": self.positives,
            "new_positives": self.new_positives,
            "dropped_unknown_ids": self.dropped_unknown_ids,
            "since_label_ts": self.since_label_ts,
            "base_interactions": self.base_interactions,
            "skips": self.n_skips,
            "fault": self.fault,
        }


@dataclass
class RetrainContext:
    """Everything the steps share. Each step reads what the earlier ones set and sets its
    own fields; a field stays None until the step that sets it has run. The exported
    version and production's version live on `result` (they are part of the outcome)."""

    cfg: RetrainConfig
    store: StateStore
    result: RetrainResult
    state: dict[str, Any] = field(default_factory=dict)  # state.json as read before step 1
    # 1 collect
    routing: RoutingState | None = None  # routing.json before the retrain
    prod_run: Run | None = None
    dataset: Dataset | None = None  # the base dataset, loaded once for the whole retrain
    collected: Collected | None = None
    # 2 train
    train_cfg: TrainConfig | None = None
    candidate: Run | None = None
    # 3 evaluate, 4 fairness
    offline: OfflineReport | None = None
    bias_history: list[dict[str, Any]] = field(default_factory=list)
    # 6 load, 7 route
    routed: bool = False  # routing.json names the candidate: it must not be removed
    # bookkeeping
    tracker: Tracker | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.state_dir) / "runs" / self.result.id

    @property
    def repo(self) -> Path:
        return Path(self.cfg.repo)


class StepError(RuntimeError):
    def __init__(self, step: str, exc: BaseException):
        super().__init__(f"step {step!r} failed: {type(exc).__name__}: {exc}")
        self.step = step


# ---------------------------------------------------------------------------- the pipeline


def retrain(cfg: RetrainConfig) -> RetrainResult:
    store = StateStore(cfg.state_dir)
    rid = new_id("retrain")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.retrain_lock(blocking=False))
        except Busy as exc:
            return RetrainResult(rid, "busy", "lock", [f"another retrain is running ({exc})"])
        return _retrain_locked(cfg, store, rid)


def _retrain_locked(cfg: RetrainConfig, store: StateStore, rid: str) -> RetrainResult:
    _report_abandoned(store, rid)
    ctx = RetrainContext(cfg, store, RetrainResult(rid, "failed", "start", []))
    result = ctx.result
    result.run_dir = str(ctx.run_dir)
    try:
        _run_steps(ctx)
    except Exception as exc:
        if not isinstance(exc, StepError):
            exc = StepError(result.step, exc)
        result.status, result.step = "failed", exc.step
        result.reasons.append(f"{exc}; production untouched")
        log.error("retrain %s: %s", rid, exc, exc_info=exc.__cause__)
        _cleanup_version(ctx)
    finally:
        _finish(ctx)
    return result


def _run_steps(ctx: RetrainContext) -> None:
    """The steps in order; a step returns False when the retrain ends with it (skipped,
    rejected) and raises StepError when it fails."""
    if _canary_on_trial(ctx):
        return
    for step in (
        _collect_step,
        _train_step,
        _evaluate_step,
        _fairness_step,
        _export_step,
        _route_step,  # reports "load", then "route"
        _record_step,
    ):
        if not step(ctx):
            return


def _enter(result: RetrainResult, name: str) -> None:
    if result.step != name:
        result.step = name
        log.info("retrain %s: step %s", result.id, name)


@contextlib.contextmanager
def _step(ctx: RetrainContext, name: str) -> Iterator[None]:
    """Enter step `name`; an exception inside becomes a StepError that names the step
    reached (switch_routing moves it on from "load" to "route")."""
    _enter(ctx.result, name)
    try:
        yield
    except StepError:
        raise
    except Exception as exc:
        raise StepError(ctx.result.step, exc) from exc


def _canary_on_trial(ctx: RetrainContext) -> bool:
    """Read the state; a canary still on trial skips the retrain (one canary at a time)."""
    ctx.state = ctx.store.load()
    _reconcile(ctx.store, ctx.state, ctx.repo)
    canary = CanaryRecord.from_state(ctx.state)
    if canary is None:
        return False
    ctx.result.status = "skipped"
    ctx.result.reasons.append(
        f"canary version {canary.version} is still on trial; evaluate it (promote or "
        "roll back) before the next retrain"
    )
    return True


def _collect_step(ctx: RetrainContext) -> bool:
    """1 collect: production's routing and run, the base data (loaded once), the positives."""
    cfg, result = ctx.cfg, ctx.result
    with _step(ctx, "collect"):
        ctx.routing = RoutingState.load(layout.routing_path(ctx.repo))
        result.production = ctx.routing.production
        ctx.prod_run = load_run(Path(layout.read_meta(ctx.repo, result.production)["run"]))
        # The base dataset stays the same across retrains: a candidate trained on a copy
        # (a window, a fault) must not make that copy the next retrain's base.
        prod = ProductionRecord.from_state(ctx.state)
        base = str(
            cfg.data
            or (prod.base_data if prod else None)
            or ctx.prod_run.meta.get("data_dir")
            or ctx.prod_run.meta["train"]["data"]
        )
        ctx.dataset = Dataset.load(base)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        ctx.collected = collect(
            cfg,
            ctx.run_dir,
            base,
            since_label_ts=(ctx.state.get("last_retrain") or {}).get("label_ts"),
            dataset=ctx.dataset,
        )
    got = ctx.collected
    result.evidence["collect"] = got.evidence()
    if got.new_positives < cfg.min_new_labels:
        result.status = "skipped"
        result.reasons.append(
            f"{got.new_positives} new positive labels since the last model; "
            f"min_new_labels is {cfg.min_new_labels}"
        )
        return False
    return True


def _train_step(ctx: RetrainContext) -> bool:
    """2 train: from production's weights (warm modes) or fresh; then the candidate's
    online features (`serving_features`)."""
    cfg, got = ctx.cfg, ctx.collected
    warm = cfg.mode in WARM_MODES
    if cfg.fault != "none":  # FAULT INJECTION, tests and demo only (canary/faults.py)
        warm = warm and faults.allows_warm_start(cfg.fault)
    with _step(ctx, "train"):
        ctx.train_cfg = replace(
            cfg.train,
            data=str(got.data),
            out=str(ctx.run_dir / "run"),
            extra_interactions=str(got.extra) if got.extra else None,
            init_from=str(ctx.prod_run.path) if warm else None,
            progress=False,
            skip_negatives=str(got.skips) if got.skips else None,
            skip_weight=cfg.skip_weight if got.skips else cfg.train.skip_weight,
        )
        # A fault copy lives only on disk; otherwise the data is what collect holds already.
        same = got.data == got.eval_data
        metrics = train(ctx.train_cfg, dataset=got.eval_dataset if same else None)
        ctx.candidate = load_run(ctx.run_dir / "run")
        serving_features(
            ctx.candidate.path,
            got.base_data,
            got.eval_extra,
            dataset=ctx.dataset,
            vocab=ctx.candidate.vocab,
        )
        ctx.result.evidence["train"] = {
            "mode": cfg.mode,
            "warm_start": metrics.get("warm_start"),
            "epochs": len(metrics.get("epochs", [])),
            "seconds": metrics.get("train_seconds"),
            "test": metrics["test"]["model"],
        }
    return True


def _evaluate_step(ctx: RetrainContext) -> bool:
    """3 evaluate: candidate and production on the same newest slice (canary.offline)."""
    cfg, got = ctx.cfg, ctx.collected
    with _step(ctx, "evaluate"):
        # The evaluation slice is the base data's (or its window's), never a fault copy's.
        eval_cfg = replace(
            ctx.train_cfg,
            data=str(got.eval_data),
            extra_interactions=str(got.eval_extra) if got.eval_extra else None,
        )
        ctx.offline = compare_offline(
            candidate=ctx.candidate,
            production=ctx.prod_run,
            train_cfg=eval_cfg,
            k=cfg.eval_k,
            gates=cfg.fairness,
            n_boot=cfg.audit_boot,
            report_dir=ctx.run_dir / "fairness",
            dataset=got.eval_dataset,
        )
    return True


def _fairness_step(ctx: RetrainContext) -> bool:
    """4 fairness (and the other offline gates): decide.offline_decision; reject ends here."""
    cfg, result, off = ctx.cfg, ctx.result, ctx.offline
    with _step(ctx, "fairness"):
        prod_version = result.production
        ctx.bias_history = [
            b for b in ctx.state.get("bias", []) if b.get("version") != prod_version
        ]
        ctx.bias_history.append({"version": prod_version, **off.production_bias})
        verdict = decide.offline_decision(
            candidate=off.candidate,
            production=off.production,
            toppop=off.toppop,
            overlap=off.overlap,
            bias=off.bias,
            production_bias=off.production_bias,
            bias_history=ctx.bias_history,
            fairness_passed=off.fairness.passed,
            fairness_reasons=off.fairness.reasons,
            gates=cfg.gates,
        )
        result.evidence["offline"] = {**off.evidence(), "verdict": verdict.to_dict()}
    if verdict.action == decide.REJECT:
        result.status = "rejected"
        result.reasons.extend(["offline gates rejected the candidate", *verdict.reasons])
        result.reasons.append(f"production version {prod_version} untouched; nothing exported")
        return False
    return True


def _export_step(ctx: RetrainContext) -> bool:
    """5 export: the next `retrieval` version, promote=False, with production's k."""
    cfg, result = ctx.cfg, ctx.result
    with _step(ctx, "export"):
        run = ctx.run_dir / "run"
        if cfg.fault != "none":  # FAULT INJECTION, tests and demo only (canary/faults.py)
            run = faults.served_run(cfg.fault, run, ctx.run_dir / "run-served", seed=result.id)
        meta = layout.read_meta(ctx.repo, result.production)
        k = cfg.k if cfg.k is not None else int(meta["k"])
        overfetch = cfg.overfetch if cfg.overfetch is not None else int(meta["graph_k"]) - k
        ex = export(
            ExportConfig(
                run=str(run),
                repo=str(ctx.repo),
                target=cfg.target,
                k=k,
                overfetch=overfetch,
                exporter=cfg.exporter,
                promote=False,
            )
        )
        result.version = ex.version
        if cfg.fault != "none":  # FAULT INJECTION, tests and demo only (canary/faults.py)
            faults.apply_after_export(cfg.fault, ex.path)
    return True


def _route_step(ctx: RetrainContext) -> bool:
    """6 load (production + candidate; all or nothing), 7 route (the only write production's
    users can notice): one `switch_routing`, which reports which of the two it is in."""
    cfg, result = ctx.cfg, ctx.result
    with _step(ctx, "load"):
        new = RoutingState(
            production=result.production,
            canary=result.version,
            canary_percent=cfg.canary_percent,
            salt=ctx.routing.salt,
        )
        switch_routing(ctx.repo, new, url=cfg.url, progress=lambda phase: _enter(result, phase))
    ctx.routed = True
    return True


def _record_step(ctx: RetrainContext) -> bool:
    """8 record: production (once) and the canary in state.json; MLflow follows in _finish."""
    cfg, result, off, got = ctx.cfg, ctx.result, ctx.offline, ctx.collected
    with _step(ctx, "record"), ctx.store.update() as s:
        now = time.time()
        prod = ProductionRecord.from_state(s)
        if prod is None or prod.version != result.production:
            prod = ProductionRecord(
                version=result.production,
                run=str(ctx.prod_run.path),
                since=now,
                offline=off.production,
                base_data=got.base_data,
            )
            s["production"] = prod.to_dict()
        s["bias"] = ctx.bias_history
        s["canary"] = CanaryRecord(
            version=result.version,
            run=str(ctx.run_dir / "run"),
            percent=cfg.canary_percent,
            started=now,
            retrain_id=result.id,
            base_data=got.base_data,
            offline=off.candidate,
            bias=off.bias,
        ).to_dict()
    result.status = "canary"
    result.reasons.append(
        f"candidate passed the offline gates; version {result.version} serves "
        f"{cfg.canary_percent}% of users as canary beside production {result.production}"
    )
    return True


# ---------------------------------------------------------------------------- step 1


def collect(
    cfg: RetrainConfig,
    run_dir: Path,
    data: str | Path,
    *,
    since_label_ts: float | None = None,
    dataset: Dataset | None = None,
) -> Collected:
    """Positives from the feedback labels -> `run_dir/extra.parquet` (interaction schema);
    the candidate's dataset dir (a copy only for windows and fault injection).

    `data` is the base dataset dir and `dataset` the same data already loaded (a retrain
    loads it once and passes it to every step; without it, it is loaded here). Positives
    newer than `since_label_ts` (the last retrain's cursor) count as new.
    """
    joined = None
    if cfg.event_log:
        if not cfg.labels:
            raise ValueError("event_log is set but labels is not: where should the join write?")
        joined = run_join(
            JoinConfig(
                log=cfg.event_log,
                out=cfg.labels,
                window_s=cfg.join_window_s,
                as_of=cfg.join_as_of,
            )
        ).to_dict()
    ds = dataset if dataset is not None else Dataset.load(data)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pos = pd.DataFrame(columns=["user_id", "item_id", "timestamp", "event_type", "value"])
    if cfg.labels and Path(cfg.labels).exists():
        export_tiered(cfg.labels, run_dir / "positives.parquet", cfg.label_tier, cfg.tiers)
        pos = pd.read_parquet(run_dir / "positives.parquet")
    known = pos["user_id"].isin(ds.users["user_id"]) & pos["item_id"].isin(ds.items["item_id"])
    dropped = int((~known).sum())
    pos = pos[known]
    new = pos if since_label_ts is None else pos[pos["timestamp"] > since_label_ts]
    label_ts = float(pos["timestamp"].max()) if len(pos) else since_label_ts
    inter = ds.interactions
    if cfg.mode in WINDOW_MODES:
        horizon = float(inter["timestamp"].max()) - cfg.window_days * 86_400
        inter = inter[inter["timestamp"] >= horizon]
        newest = float(pos["timestamp"].max()) if len(pos) else 0.0
        pos = pos[pos["timestamp"] >= newest - cfg.window_days * 86_400]
    extra = None
    if len(pos):
        extra = run_dir / "extra.parquet"
        pos.to_parquet(extra, index=False)
    skips = _skips(cfg, ds, pos, run_dir) if cfg.skip_weight > 0 and cfg.labels else None
    eval_data, eval_ds = Path(data), ds
    if cfg.mode in WINDOW_MODES:
        eval_data = run_dir / "data"
        eval_ds = Dataset.from_frames(ds.users, ds.items, inter, source="window")
        eval_ds.save(eval_data)
    train_data, train_extra = eval_data, extra
    if cfg.fault != "none":  # FAULT INJECTION, tests and demo only (canary/faults.py)
        train_data, train_extra = faults.training_data(
            cfg.fault,
            dataset=ds,
            interactions=inter,
            positives=pos,
            split_cfg=cfg.train.split,
            run_dir=run_dir,
            data=train_data,
            extra=train_extra,
        )
    return Collected(
        base_data=str(data),
        data=train_data,
        eval_data=eval_data,
        extra=train_extra,
        eval_extra=extra,
        label_ts=label_ts,
        positives=len(pos),
        new_positives=len(new),
        dropped_unknown_ids=dropped,
        since_label_ts=since_label_ts,
        base_interactions=len(inter),
        join=joined,
        fault=cfg.fault,
        eval_dataset=eval_ds,
        skips=skips[0] if skips else None,
        n_skips=skips[1] if skips else 0,
    )


def _skips(cfg: RetrainConfig, ds, pos: pd.DataFrame, run_dir: Path) -> tuple[Path, int] | None:
    """The join's final negatives (shown, nothing attributed) -> run_dir/skips.parquet: known
    ids, never a pair the user picked at another time, inside the window for window modes."""
    if not Path(cfg.labels).exists():
        return None
    lab = read_labels(cfg.labels)
    neg = lab[~lab["clicked"].to_numpy(bool)]
    neg = neg[neg["user_id"].isin(ds.users["user_id"]) & neg["item_id"].isin(ds.items["item_id"])]
    picked = pd.MultiIndex.from_frame(pos[["user_id", "item_id"]])
    neg = neg[~pd.MultiIndex.from_frame(neg[["user_id", "item_id"]]).isin(picked)]
    if cfg.mode in WINDOW_MODES and len(neg):
        neg = neg[neg["impression_ts"] >= neg["impression_ts"].max() - cfg.window_days * 86_400]
    if not len(neg):
        return None
    out = pd.DataFrame(
        {
            "user_id": neg["user_id"].to_numpy(np.int64),
            "item_id": neg["item_id"].to_numpy(np.int64),
            "timestamp": np.floor(neg["impression_ts"].to_numpy(np.float64)).astype(np.int64),
        }
    )
    path = run_dir / "skips.parquet"
    out.to_parquet(path, index=False)
    return path, len(out)


def serving_features(
    run: Path,
    base_data: str | Path,
    feedback: Path | None,
    *,
    dataset: Dataset | None = None,
    vocab: FeatureVocab | None = None,
) -> Path:
    """Rewrite the candidate's online features (`features.npz`, what Triton looks up per user)
    so that they differ from production's only where the model does.

    - history (a model input): the whole base log + the feedback positives, in time order.
      Training writes it from the candidate's own dataset, which for a window (or a fault
      copy) has lost every user's older items.
    - seen set (the serving rule "never show an item again"): the base log + the feedback
      positives. A version's snapshot is built when it is trained, so production's still
      lacks what users clicked since; a retrain that knows them stops re-recommending
      watched items, which is part of what a retrain is for. It pays off only if users do
      not rewatch at once: the simulator's users remember their clicks (ClickMemory,
      rewatch_factor) as real ones do; users without that memory click an already-clicked
      item as readily as a new one, and this rule then costs the candidate CTR whatever its
      weights. A seen set that follows the live log for every version would be serving's
      job (a known limit).

    `dataset` is `base_data` already loaded and `vocab` the run's vocabulary (a retrain has
    both at hand); either is read from disk when not given.
    """
    run = Path(run)
    ds = dataset if dataset is not None else Dataset.load(base_data)
    if vocab is None:
        vocab = FeatureVocab.load(run / VOCAB_FILE)
    base = ds.interactions
    known = base
    if feedback is not None and Path(feedback).exists():
        fb = pd.read_parquet(feedback)[base.columns]
        known = pd.concat([base, fb], ignore_index=True).sort_values("timestamp", kind="stable")
    return FeatureSnapshot.build(vocab, ds.users, known).save(run / FEATURES_FILE)


# ---------------------------------------------------------------------------- bookkeeping


def _report_abandoned(store: StateStore, rid: str) -> None:
    """Mark this retrain in progress; one that a previous run left there was killed."""
    with store.update() as s:
        stale = s.get("in_progress")
        s["in_progress"] = {"id": rid, "pid": os.getpid(), "started": time.time()}
    if stale:
        store.record(
            "retrain",
            "abandoned",
            [
                f"retrain {stale['id']} (pid {stale['pid']}) started at {_iso(stale['started'])} "
                "never finished (killed?); production was not touched by it"
            ],
            {"stale": stale},
            id=stale["id"] + "-abandoned",
        )


def _finish(ctx: RetrainContext) -> None:
    """Whatever the outcome: clear the in-progress marker, move the label cursor (canary or
    rejected), track the run in MLflow, append the history entry, set the aliases."""
    result, store = ctx.result, ctx.store
    entry_evidence = {**result.evidence, "step": result.step}
    with store.update() as s:
        s["in_progress"] = None
        s["last_attempt"] = {"id": result.id, "ts": time.time(), "status": result.status}
        if result.status in ("canary", "rejected") and ctx.collected is not None:
            s["last_retrain"] = {
                "id": result.id,
                "ts": time.time(),
                "label_ts": ctx.collected.label_ts,
            }
    result.mlflow_run_id = _track(ctx)
    store.record(
        "retrain",
        result.status,
        result.reasons,
        entry_evidence,
        id=result.id,
        version=result.version,
        production=result.production,
        mlflow_run_id=result.mlflow_run_id,
    )
    if result.status == "canary":
        _set_challenger(ctx)


def _reconcile(store: StateStore, state: dict[str, Any], repo: Path) -> None:
    """routing.json is the truth about serving: a canary the state remembers but routing no
    longer sends anyone to (changed by hand, or a run killed mid-promotion) is cleared."""
    c = CanaryRecord.from_state(state)
    path = layout.routing_path(repo)
    if c is None or not path.exists():
        return
    routing = RoutingState.load(path)
    if c.version in routing.versions and routing.canary == c.version:
        return
    with store.update() as s:
        s["canary"] = None
    state["canary"] = None
    store.record(
        "reconcile",
        "canary cleared",
        [f"state had canary {c.version} but routing.json serves {list(routing.versions)}"],
        {"routing": routing.__dict__, "canary": c.to_dict()},
    )


def _cleanup_version(ctx: RetrainContext) -> None:
    """A version that was exported but never routed is removed, so it cannot be loaded by
    accident (the next export takes the next number either way)."""
    v = ctx.result.version
    if v is None or ctx.routed:
        return
    for path in (layout.version_dir(ctx.repo, v), layout.features_dir(ctx.repo, v)):
        if path.exists():
            trash = path.with_name(f".removed-{path.name}-{os.getpid()}")
            os.replace(path, trash)  # out of Triton's sight in one step
            shutil.rmtree(trash, ignore_errors=True)
    log.info("removed unrouted version %d from %s", v, ctx.repo)


def _track(ctx: RetrainContext) -> str | None:
    """One MLflow run per retrain that trained a candidate, whatever the outcome. Tracking
    never decides anything, so its errors are logged and reported, not raised."""
    cfg, result = ctx.cfg, ctx.result
    if "train" not in result.evidence:  # nothing was trained: the history entry says it all
        return None
    try:
        # lazy: MLflow is heavy and optional; a retrain runs without it
        from canary.tracking import Tracker, flat_metrics

        tracker = Tracker(cfg.state_dir, cfg.tracking_uri)
        metrics = flat_metrics(result.evidence.get("offline", {}), "offline.")
        metrics.update(flat_metrics(result.evidence.get("train", {}), "train."))
        run_dir = Path(result.run_dir) if result.run_dir else None
        decision = run_dir / "decision.json" if run_dir else None
        if decision is not None and run_dir.exists():
            decision.write_text(json.dumps(result.to_dict(), indent=1, default=str))
        artifacts = []
        if run_dir is not None:
            artifacts = [
                p
                for p in (decision, run_dir / "fairness", run_dir / "run" / "metrics.json")
                if p is not None and p.exists()
            ]
        params = {
            "retrain": {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in ("train", "gates", "fairness")
            },
            "train": dataclasses.asdict(ctx.train_cfg or cfg.train),
            "gates": dataclasses.asdict(cfg.gates),
            "fairness_gates": dataclasses.asdict(cfg.fairness),
        }
        tags = {
            "retrain_id": result.id,
            "status": result.status,
            "step": result.step,
            "production_version": str(result.production),
            "candidate_version": str(result.version),
        }
        run_id = tracker.log_retrain(
            name=result.id, params=params, metrics=metrics, artifacts=artifacts, tags=tags
        )
        ctx.tracker = tracker
        return run_id
    except Exception as exc:  # tracking is a record, never a gate
        log.warning("MLflow tracking failed: %s", exc)
        result.reasons.append(f"MLflow tracking failed ({type(exc).__name__}: {exc})")
        return None


def _set_challenger(ctx: RetrainContext) -> None:
    """Registered versions for production (once) and the canary; aliases mirror routing."""
    tracker, result = ctx.tracker, ctx.result
    if tracker is None or result.version is None:
        return
    try:
        prod = ProductionRecord.from_state(ctx.store.load())
        if prod is None:
            raise ValueError("state.json has no production record")
        if not prod.mlflow_version:
            prod.mlflow_version = tracker.register(
                source=prod.run, run_id=None, triton_version=prod.version
            )
        tracker.set_alias("champion", prod.mlflow_version)
        mv = tracker.register(
            source=str(ctx.run_dir / "run"),
            run_id=result.mlflow_run_id,
            triton_version=result.version,
        )
        tracker.set_alias("challenger", mv)
        with ctx.store.update() as s:
            current = ProductionRecord.from_state(s)
            if current is not None:
                current.mlflow_version = prod.mlflow_version
                s["production"] = current.to_dict()
            canary = CanaryRecord.from_state(s)
            if canary is not None:
                canary.mlflow_version = mv
                s["canary"] = canary.to_dict()
    except Exception as exc:
        log.warning("MLflow registry update failed: %s", exc)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
