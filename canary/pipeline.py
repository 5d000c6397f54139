"""`retrain(cfg)`: feedback -> candidate -> offline gates -> Triton canary. Closes the loop.

    1 collect   join the event log (optional), export positives in the interaction schema,
                count the ones newer than the last model, pick the base data (production's)
    2 train     warm start from production's weights (same vocabulary) or a fresh model on
                a sliding window of the newest data
    3 evaluate  candidate vs production on the newest time slice: training's metrics,
                top-K churn, popularity bias (ARP, exposure Gini) and its trend
    4 fairness  the candidate's audit gated against production's (fairness.check_gates)
    5 export    the next `retrieval` version, promote=False (production keeps routing.json)
    6 load      Triton loads production + candidate (all or nothing; old set keeps serving)
    7 route     routing.json: canary = candidate at canary_percent, written atomically
    8 record    state.json decision + MLflow run, registered version, `challenger` alias

Production is only ever changed by step 7 and only after step 6 succeeded, so a failure
anywhere (an exception, a failed gate, kill -9) leaves it serving as before. Every outcome
is a history entry with its numbers; a killed run is reported by the next one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from canary import decide
from canary.state import Busy, StateStore, new_id
from fairness.gates import GateConfig
from serving import repository as layout
from serving.control import switch_routing
from serving.publish import ExportConfig
from serving.routing import RoutingState
from training.train import TrainConfig

log = logging.getLogger(__name__)

# Fault injection for the demo and the tests; each is explained where it is applied.
FAULTS = ("none", "shuffle_labels", "serving_skew", "corrupt_export")
WINDOW_MODES = ("sliding_window", "warm_window")  # train (and evaluate) on the newest window
WARM_MODES = ("warm_start", "warm_window")  # start from production's weights


@dataclass(frozen=True)
class RetrainConfig:
    state_dir: str = "canary"  # state.json, mlflow.db, runs/<id>/, the retrain lock
    repo: str = "model_repository"
    # Triton gRPC address; None changes only files (the next server start serves them).
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
    fault: Literal["none", "shuffle_labels", "serving_skew", "corrupt_export"] = "none"

    def __post_init__(self) -> None:
        if not 1 <= self.canary_percent <= 100:
            raise ValueError(f"canary_percent={self.canary_percent}; expected 1..100")
        if self.fault not in FAULTS:
            raise ValueError(f"fault={self.fault!r}; expected one of {FAULTS}")


@dataclass
class RetrainResult:
    id: str
    status: str  # canary | rejected | skipped | failed | busy
    step: str  # the last step reached
    reasons: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # the exported version, when one was made
    production: int | None = None
    run_dir: str | None = None
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepError(RuntimeError):
    def __init__(self, step: str, exc: BaseException):
        super().__init__(f"step {step!r} failed: {type(exc).__name__}: {exc}")
        self.step = step


# ---------------------------------------------------------------------------- the pipeline


def retrain(cfg: RetrainConfig) -> RetrainResult:
    store = StateStore(cfg.state_dir)
    rid = new_id("retrain")
    try:
        lock = store.retrain_lock(blocking=False)
        lock.__enter__()
    except Busy as exc:
        return RetrainResult(rid, "busy", "lock", [f"another retrain is running ({exc})"])
    try:
        return _retrain_locked(cfg, store, rid)
    finally:
        lock.__exit__(None, None, None)


def _retrain_locked(cfg: RetrainConfig, store: StateStore, rid: str) -> RetrainResult:
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
    result = RetrainResult(rid, "failed", "start", [])
    run_dir = Path(cfg.state_dir) / "runs" / rid
    result.run_dir = str(run_dir)
    ctx: dict[str, Any] = {}
    try:
        _run_steps(cfg, store, rid, run_dir, result, ctx)
    except Exception as exc:
        if not isinstance(exc, StepError):
            exc = StepError(result.step, exc)
        result.status, result.step = "failed", exc.step
        result.reasons.append(f"{exc}; production untouched")
        log.error("retrain %s: %s", rid, exc, exc_info=exc.__cause__)
        _cleanup_version(cfg, ctx)
    finally:
        entry_evidence = {**result.evidence, "step": result.step}
        with store.update() as s:
            s["in_progress"] = None
            s["last_attempt"] = {"id": rid, "ts": time.time(), "status": result.status}
            if result.status in ("canary", "rejected"):
                s["last_retrain"] = {"id": rid, "ts": time.time(), **ctx.get("cursor", {})}
        result.mlflow_run_id = _track(cfg, store, result, ctx)
        store.record(
            "retrain",
            result.status,
            result.reasons,
            entry_evidence,
            id=rid,
            version=result.version,
            production=result.production,
            mlflow_run_id=result.mlflow_run_id,
        )
        if result.status == "canary":
            _set_challenger(cfg, store, result, ctx)
    return result


def _step(name: str, result: RetrainResult):
    result.step = name
    log.info("retrain %s: step %s", result.id, name)


def _run_steps(cfg, store, rid, run_dir: Path, result: RetrainResult, ctx) -> None:
    from training.run import load_run
    from training.train import train

    repo = Path(cfg.repo)
    state = store.load()
    _reconcile(store, state, repo)
    if state.get("canary"):
        c = state["canary"]
        result.status = "skipped"
        result.reasons.append(
            f"canary version {c['version']} is still on trial; evaluate it (promote or "
            "roll back) before the next retrain"
        )
        return
    # ---- 1 collect
    _step("collect", result)
    try:
        routing = RoutingState.load(layout.routing_path(repo))
        prod_version = routing.production
        prod_run_dir = Path(layout.read_meta(repo, prod_version)["run"])
        prod_run = load_run(prod_run_dir)
        # The base dataset stays the same across retrains: a candidate trained on a copy
        # (a window, a fault) must not make that copy the next retrain's base.
        data = (
            cfg.data
            or (state.get("production") or {}).get("base_data")
            or prod_run.meta.get("data_dir")
            or prod_run.meta["train"]["data"]
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        collected = collect(cfg, state, run_dir, data, prod_run)
    except Exception as exc:
        raise StepError("collect", exc) from exc
    result.production = prod_version
    data_dir = data
    ctx.update(routing=routing, prod_run=prod_run, cursor=collected["cursor"])
    result.evidence["collect"] = collected["evidence"]
    if collected["evidence"]["new_positives"] < cfg.min_new_labels:
        result.status = "skipped"
        result.reasons.append(
            f"{collected['evidence']['new_positives']} new positive labels since the last "
            f"model; min_new_labels is {cfg.min_new_labels}"
        )
        ctx.pop("cursor")  # nothing consumed
        return

    # ---- 2 train
    _step("train", result)
    train_cfg = replace(
        cfg.train,
        data=str(collected["data"]),
        out=str(run_dir / "run"),
        extra_interactions=str(collected["extra"]) if collected["extra"] else None,
        # The broken candidate starts fresh: production's weights would mask the fault.
        init_from=str(prod_run_dir)
        if cfg.mode in WARM_MODES and cfg.fault != "shuffle_labels"
        else None,
        progress=False,
    )
    try:
        metrics = train(train_cfg)
        serving_features(run_dir / "run", data, collected["eval_extra"])
        cand_run = load_run(run_dir / "run")
    except Exception as exc:
        raise StepError("train", exc) from exc
    result.evidence["train"] = {
        "mode": cfg.mode,
        "warm_start": metrics.get("warm_start"),
        "epochs": len(metrics.get("epochs", [])),
        "seconds": metrics.get("train_seconds"),
        "test": metrics["test"]["model"],
    }
    ctx["train_cfg"] = train_cfg

    # ---- 3 evaluate + 4 fairness
    _step("evaluate", result)
    from canary.offline import compare_offline

    try:
        # The evaluation slice is the base data's, never the shuffled copy's (fault).
        eval_cfg = replace(
            train_cfg,
            data=str(collected["eval_data"]),
            extra_interactions=str(collected["eval_extra"]) if collected["eval_extra"] else None,
        )
        off = compare_offline(
            candidate=cand_run,
            production=prod_run,
            train_cfg=eval_cfg,
            k=cfg.eval_k,
            gates=cfg.fairness,
            n_boot=cfg.audit_boot,
            report_dir=run_dir / "fairness",
        )
    except Exception as exc:
        raise StepError("evaluate", exc) from exc
    ctx["offline"] = off
    _step("fairness", result)
    bias_history = [b for b in state.get("bias", []) if b.get("version") != prod_version]
    bias_history.append({"version": prod_version, **off.production_bias})
    verdict = decide.offline_decision(
        candidate=off.candidate,
        production=off.production,
        toppop=off.toppop,
        overlap=off.overlap,
        bias=off.bias,
        production_bias=off.production_bias,
        bias_history=bias_history,
        fairness_passed=off.fairness.passed,
        fairness_reasons=off.fairness.reasons,
        gates=cfg.gates,
    )
    result.evidence["offline"] = {**off.evidence(), "verdict": verdict.to_dict()}
    ctx["bias_history"] = bias_history
    if verdict.action == decide.REJECT:
        result.status = "rejected"
        result.reasons.extend(["offline gates rejected the candidate", *verdict.reasons])
        result.reasons.append(f"production version {prod_version} untouched; nothing exported")
        return

    # ---- 5 export
    _step("export", result)
    from serving.publish import export

    try:
        export_run = run_dir / "run"
        if cfg.fault == "serving_skew":
            export_run = skew_item_table(run_dir / "run", run_dir / "run-served", seed=rid)
        meta = layout.read_meta(repo, prod_version)
        k = cfg.k if cfg.k is not None else int(meta["k"])
        overfetch = cfg.overfetch if cfg.overfetch is not None else int(meta["graph_k"]) - k
        ex = export(
            ExportConfig(
                run=str(export_run),
                repo=str(repo),
                target=cfg.target,
                k=k,
                overfetch=overfetch,
                exporter=cfg.exporter,
                promote=False,
            )
        )
    except Exception as exc:
        raise StepError("export", exc) from exc
    result.version = ex.version
    ctx["version"] = ex.version
    if cfg.fault == "corrupt_export":
        # A disk or copy fault after publishing: Triton must refuse the version.
        (ex.path / layout.ONNX_FILE).write_bytes(b"not an onnx graph")

    # ---- 6 load (production + candidate; all or nothing), 7 route (the only write
    # production's users can notice): one switch, which reports which of the two failed.
    new_routing = RoutingState(
        production=prod_version,
        canary=ex.version,
        canary_percent=cfg.canary_percent,
        salt=ctx["routing"].salt,
    )
    try:
        switch_routing(repo, new_routing, url=cfg.url, progress=lambda s: _step(s, result))
    except Exception as exc:
        raise StepError(result.step, exc) from exc
    ctx["routed"] = True

    # ---- 8 record
    _step("record", result)
    with store.update() as s:
        if not s.get("production") or s["production"].get("version") != prod_version:
            s["production"] = {
                "version": prod_version,
                "run": str(prod_run_dir),
                "since": time.time(),
                "offline": off.production,
                "base_data": str(data_dir),
            }
        s["bias"] = bias_history
        s["canary"] = {
            "version": ex.version,
            "run": str(run_dir / "run"),
            "percent": cfg.canary_percent,
            "started": time.time(),
            "retrain_id": rid,
            "base_data": str(data_dir),
            "msprt_p": 1.0,
            "offline": off.candidate,
            "bias": off.bias,
        }
    result.status = "canary"
    result.reasons.append(
        f"candidate passed the offline gates; version {ex.version} serves "
        f"{cfg.canary_percent}% of users as canary beside production {prod_version}"
    )


# ---------------------------------------------------------------------------- step 1


def collect(cfg: RetrainConfig, state: dict, run_dir: Path, data: str, prod_run) -> dict:
    """Positives from the feedback labels -> `run_dir/extra.parquet` (interaction schema);
    the candidate's dataset dir (a copy only for sliding windows and fault injection)."""
    from feedback.join import JoinConfig, export_positives, run_join
    from training.schema import Dataset
    from training.split import split

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
    ds = Dataset.load(data)
    extra_path = run_dir / "extra.parquet"
    pos = pd.DataFrame(columns=["user_id", "item_id", "timestamp", "event_type", "value"])
    if cfg.labels and Path(cfg.labels).exists():
        export_positives(cfg.labels, run_dir / "positives.parquet")
        pos = pd.read_parquet(run_dir / "positives.parquet")
    known = pos["user_id"].isin(ds.users["user_id"]) & pos["item_id"].isin(ds.items["item_id"])
    dropped = int((~known).sum())
    pos = pos[known]
    last = (state.get("last_retrain") or {}).get("label_ts")
    new = pos if last is None else pos[pos["timestamp"] > last]
    label_ts = float(pos["timestamp"].max()) if len(pos) else last
    inter = ds.interactions
    if cfg.mode in WINDOW_MODES:
        horizon = float(inter["timestamp"].max()) - cfg.window_days * 86_400
        inter = inter[inter["timestamp"] >= horizon]
        newest = float(pos["timestamp"].max()) if len(pos) else 0.0
        pos = pos[pos["timestamp"] >= newest - cfg.window_days * 86_400]
    if len(pos):
        pos.to_parquet(extra_path, index=False)
    cand_data = eval_data = Path(data)
    train_path = None
    if cfg.mode in WINDOW_MODES or cfg.fault == "shuffle_labels":
        eval_data = run_dir / "data"
        Dataset.from_frames(ds.users, ds.items, inter, source="window").save(eval_data)
        cand_data = eval_data
    if cfg.fault == "shuffle_labels":
        # The broken candidate: item ids shuffled across the interactions it learns from
        # (train + val and the feedback positives), so no user keeps their own taste; the
        # newest slice it is evaluated on stays the real one.
        sp = split(inter, cfg.train.split)
        rng = np.random.default_rng(0)
        learn = pd.concat([sp.train, sp.val], ignore_index=True)
        # Row count and timestamps are kept, so the time split of the copy is the same.
        learn["item_id"] = rng.permutation(learn["item_id"].to_numpy())
        cand_data = run_dir / "data-shuffled"
        shuffled = pd.concat([learn, sp.test], ignore_index=True)
        Dataset.from_frames(ds.users, ds.items, shuffled, source="shuffled").save(cand_data)
        if len(pos):
            train_path = run_dir / "extra-shuffled.parquet"
            pos.assign(item_id=rng.permutation(pos["item_id"].to_numpy())).to_parquet(
                train_path, index=False
            )
    return {
        "data": cand_data,
        "eval_data": eval_data,
        "extra": train_path if train_path else (extra_path if len(pos) else None),
        "eval_extra": extra_path if len(pos) else None,  # the real labels, for history
        "cursor": {"label_ts": label_ts},
        "evidence": {
            "base_data": str(data),
            "join": joined,
            "positives": len(pos),
            "new_positives": len(new),
            "dropped_unknown_ids": dropped,
            "since_label_ts": last,
            "base_interactions": len(inter),
            "fault": cfg.fault,
        },
    }


def serving_features(run: Path, base_data: str | Path, feedback: Path | None) -> Path:
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
      rewatch_factor) as real ones do. Without that memory they clicked an already-clicked
      item as readily as a new one (42% of production's impressions in the demo), and this
      rule cost the candidate ~0.6 CTR points whatever its weights. A seen set that follows
      the live log for every version would be serving's job (a known limit).
    """
    from models.snapshot import FeatureSnapshot
    from training.run import FEATURES_FILE, load_run
    from training.schema import Dataset

    ds = Dataset.load(base_data)
    vocab = load_run(run).vocab
    base = ds.interactions
    known = base
    if feedback is not None and Path(feedback).exists():
        fb = pd.read_parquet(feedback)[base.columns]
        known = pd.concat([base, fb], ignore_index=True).sort_values("timestamp", kind="stable")
    return FeatureSnapshot.build(vocab, ds.users, known).save(run / FEATURES_FILE)


def skew_item_table(run_dir: Path, out: Path, *, seed: str) -> Path:
    """A copy of a run whose item table is permuted: item i gets item π(i)'s id embedding
    and categories. Its offline-evaluated weights are unchanged elsewhere; what it serves
    is a mismatch between item rows and raw ids, the training/serving skew a canary exists
    to catch (`fault="serving_skew"`)."""
    import torch

    from training.run import MODEL_FILE

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("checkpoint.pt"))
    state = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)
    n = state["item_cats"].shape[0]
    perm = torch.from_numpy(np.random.default_rng(zlib.crc32(seed.encode())).permutation(n))
    for key in ("item_tower.item_emb.weight", "item_cats"):
        state[key] = state[key][perm].clone()
    torch.save(state, out / MODEL_FILE)
    return out


# ---------------------------------------------------------------------------- bookkeeping


def _reconcile(store: StateStore, state: dict, repo: Path) -> None:
    """routing.json is the truth about serving: a canary the state remembers but routing no
    longer sends anyone to (changed by hand, or a run killed mid-promotion) is cleared."""
    c = state.get("canary")
    path = layout.routing_path(repo)
    if not c or not path.exists():
        return
    routing = RoutingState.load(path)
    if c["version"] in routing.versions and routing.canary == c["version"]:
        return
    with store.update() as s:
        s["canary"] = None
    state["canary"] = None
    store.record(
        "reconcile",
        "canary cleared",
        [f"state had canary {c['version']} but routing.json serves {list(routing.versions)}"],
        {"routing": routing.__dict__, "canary": c},
    )


def _cleanup_version(cfg: RetrainConfig, ctx: dict) -> None:
    """A version that was exported but never routed is removed, so it cannot be loaded by
    accident (the next export takes the next number either way)."""
    v = ctx.get("version")
    if v is None or ctx.get("routed"):
        return
    repo = Path(cfg.repo)
    for path in (layout.version_dir(repo, v), layout.features_dir(repo, v)):
        if path.exists():
            trash = path.with_name(f".removed-{path.name}-{os.getpid()}")
            os.replace(path, trash)  # out of Triton's sight in one step
            shutil.rmtree(trash, ignore_errors=True)
    log.info("removed unrouted version %d from %s", v, repo)


def _track(cfg: RetrainConfig, store: StateStore, result: RetrainResult, ctx) -> str | None:
    """One MLflow run per retrain that trained a candidate, whatever the outcome. Tracking
    never decides anything, so its errors are logged and reported, not raised."""
    if "train" not in result.evidence:  # nothing was trained: the history entry says it all
        return None
    try:
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
            "train": dataclasses.asdict(ctx.get("train_cfg") or cfg.train),
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
        ctx["tracker"] = tracker
        return run_id
    except Exception as exc:  # tracking is a record, never a gate
        log.warning("MLflow tracking failed: %s", exc)
        result.reasons.append(f"MLflow tracking failed ({type(exc).__name__}: {exc})")
        return None


def _set_challenger(cfg: RetrainConfig, store: StateStore, result: RetrainResult, ctx) -> None:
    """Registered versions for production (once) and the canary; aliases mirror routing."""
    tracker = ctx.get("tracker")
    if tracker is None:
        return
    try:
        state = store.load()
        prod = state["production"]
        if prod and not prod.get("mlflow_version"):
            prod["mlflow_version"] = tracker.register(
                source=str(prod["run"]), run_id=None, triton_version=prod["version"]
            )
        tracker.set_alias("champion", prod["mlflow_version"])
        mv = tracker.register(
            source=str(Path(result.run_dir) / "run"),
            run_id=result.mlflow_run_id,
            triton_version=result.version,
        )
        tracker.set_alias("challenger", mv)
        with store.update() as s:
            s["production"]["mlflow_version"] = prod["mlflow_version"]
            if s.get("canary"):
                s["canary"]["mlflow_version"] = mv
    except Exception as exc:
        log.warning("MLflow registry update failed: %s", exc)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
