"""`northstar schedule`: a long-running loop that retrains and evaluates canaries.

Each tick (`tick(cfg, now)`):
  1. a canary on trial is evaluated (auto: promote / roll back / continue);
  2. otherwise a retrain runs when any trigger fires:
       cron       the cron expression's last fire time is after the last retrain;
       labels     at least `label_volume` new positive labels since the last retrain;
       drift      PSI of an input feature, recent traffic vs the training data, above
                  `psi_threshold` (common.stats.psi).
A retrain takes the retrain lock (`canary.state.file_lock`, a flock the kernel drops when
its holder dies), so two never overlap, even across processes; a tick that finds it held
reports "busy". Every step's failure is caught, reported in the tick's result and the
decision history, and leaves production untouched.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from croniter import croniter

from canary.online import EvaluateConfig, evaluate_canary
from canary.pipeline import RetrainConfig, retrain
from canary.state import CanaryRecord, ProductionRecord, StateStore
from common.stats import psi
from feedback.join import read_labels
from training.run import RUN_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str = "0 3 * * *"  # nightly at 03:00 (server local time)
    label_volume: int | None = 5000  # new positive labels that trigger a retrain; None: off
    psi_threshold: float | None = 0.25  # "major shift" by the usual PSI rule; None: off
    poll_s: float = 300.0  # how often the loop wakes up to evaluate a canary
    # After a failed retrain, wait this long before the next try (any trigger), so a
    # persistent fault (a missing file, a full disk) is not retried every poll.
    retry_s: float = 3600.0
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluate: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(auto=True))


def drift_features(train: pd.DataFrame, recent: pd.DataFrame) -> dict[str, tuple[np.ndarray, ...]]:
    """Two model inputs as (reference, recent) samples, per served impression:

    - user_activity: log1p of the user's interaction count in the training data (the
      history the user tower sees; new or suddenly heavy users shift it);
    - item_popularity: log1p of the shown item's training count (what the catalogue
      side is asked to score).
    """
    user_n = train["user_id"].value_counts()
    item_n = train["item_id"].value_counts()
    ref_users = np.log1p(user_n.reindex(train["user_id"]).fillna(0).to_numpy())
    ref_items = np.log1p(item_n.reindex(train["item_id"]).fillna(0).to_numpy())
    now_users = np.log1p(user_n.reindex(recent["user_id"]).fillna(0).to_numpy())
    now_items = np.log1p(item_n.reindex(recent["item_id"]).fillna(0).to_numpy())
    return {"user_activity": (ref_users, now_users), "item_popularity": (ref_items, now_items)}


def triggers(cfg: ScheduleConfig, state: dict, now: float) -> dict[str, Any]:
    """Which retrain triggers fire now, each with its numbers."""

    out: dict[str, Any] = {}
    last = (state.get("last_retrain") or {}).get("ts")
    prev_fire = croniter(cfg.cron, now).get_prev(float)
    out["cron"] = {
        "fired": last is None or prev_fire > last,
        "last_fire": prev_fire,
        "last_retrain": last,
    }
    labels = _recent_labels(cfg, state)
    if cfg.label_volume is not None:
        n = 0 if labels is None else int(labels["clicked"].sum())
        out["labels"] = {"fired": n >= cfg.label_volume, "new_positives": n}
    if cfg.psi_threshold is not None and labels is not None and len(labels):
        train = _training_interactions(state)
        if train is not None:
            scores = {
                name: psi(expected=ref, actual=now_)
                for name, (ref, now_) in drift_features(train, labels).items()
            }
            worst = max(scores, key=scores.get)
            out["drift"] = {
                "fired": scores[worst] > cfg.psi_threshold,
                "psi": scores,
                "threshold": cfg.psi_threshold,
            }
    return out


def _recent_labels(cfg: ScheduleConfig, state: dict) -> pd.DataFrame | None:
    labels_dir = cfg.retrain.labels
    if not labels_dir or not Path(labels_dir).exists():
        return None

    lab = read_labels(labels_dir)
    since = (state.get("last_retrain") or {}).get("label_ts")
    if since is not None:
        lab = lab[lab["label_ts"] > since]
    return lab


def _training_interactions(state: dict) -> pd.DataFrame | None:
    prod = ProductionRecord.from_state(state)
    if prod is None:
        return None

    try:
        meta = json.loads((Path(prod.run) / RUN_FILE).read_text())
        return pd.read_parquet(Path(meta["data_dir"]) / "interactions.parquet")
    except (OSError, KeyError, ValueError):
        return None


def tick(cfg: ScheduleConfig, now: float | None = None) -> dict[str, Any]:
    """One pass of the loop; never raises for a failed step (it is in the result)."""
    now = time.time() if now is None else now
    store = StateStore(cfg.retrain.state_dir)
    out: dict[str, Any] = {"time": now}
    try:
        state = store.load()
        if CanaryRecord.from_state(state) is not None:
            ev = evaluate_canary(cfg.evaluate)
            out["evaluate"] = {"action": ev.action, "reasons": list(ev.verdict.reasons)}
            return out
        attempt = state.get("last_attempt") or {}
        if attempt.get("status") == "failed" and now - attempt["ts"] < cfg.retry_s:
            out["retrain"] = {
                "status": "backing off",
                "reasons": [f"retrain {attempt['id']} failed {now - attempt['ts']:.0f} s ago"],
            }
            return out
        fired = triggers(cfg, state, now)
        out["triggers"] = fired
        why = [name for name, t in fired.items() if t.get("fired")]
        if not why:
            out["retrain"] = {"status": "not triggered"}
            return out
        res = retrain(cfg.retrain)
        out["retrain"] = {
            "status": res.status,
            "step": res.step,
            "reasons": res.reasons,
            "version": res.version,
            "triggered_by": why,
        }
    except Exception as exc:  # the loop outlives any single failure
        log.exception("schedule tick failed")
        out["error"] = f"{type(exc).__name__}: {exc}"
        try:
            store.record("schedule", "failed", [out["error"]], {}, production=None)
        except Exception:
            log.exception("could not record the failure")
    return out


def run_forever(cfg: ScheduleConfig, *, once: bool = False, on_tick=None) -> int:
    """Tick now, then at every cron fire time or poll_s, whichever comes first."""

    while True:
        result = tick(cfg)
        if on_tick:
            on_tick(result)
        if once:  # a CronJob's exit code: a failed tick or retrain shows as a failed job
            failed = "error" in result or result.get("retrain", {}).get("status") == "failed"
            return 1 if failed else 0
        now = time.time()
        nxt = croniter(cfg.cron, now).get_next(float)
        time.sleep(max(1.0, min(nxt - now, cfg.poll_s)))
