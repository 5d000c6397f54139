"""What each label tier is worth offline: retrain on the loop's feedback, one tier at a time.

The loop's own traffic is simulated into a real event log (`simulate` with the in-process
recommender and sink, the world's click, watch and like model), joined by the real join,
and the positives of each schedule (`feedback.tiers.select_positives`) are given to the
same warm fine-tune of the production run (no popularity prior in any arm, so that only
the labels differ):

- `no feedback`: the fine-tune on the base log alone (the control);
- `final`: every written positive, weight 1 (what a retrain used before tiers);
- `final, weighted`: the same, weak positives at `weak_weight`;
- `strong`: final long watches and likes only (the slow schedule);
- `weak`: every attributed impression at the cut, still-pending ones included (the fast
  schedule), weak at `weak_weight`.

The simulated traffic spans `span_windows` attribution windows on a fake clock, so at the
cut the newest window is still pending: only `weak` sees it. Each candidate is scored on
the world's test split (NDCG@10, as `northstar train` reports it) and on what the world
knows and the log does not: the mean true relevance of its top 10 (studies.depth), the
quantity clicks in the loop follow.

    northstar simulate tiers --dir reports/tiers [--set requests=20000 epochs=2]
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from common.files import atomic_write_text
from feedback.join import JoinConfig, run_join
from feedback.sink import open_sink, open_source
from feedback.tiers import TierConfig, export_tiered
from simulator.config import SimulateConfig
from simulator.doubles import LocalRecommender, SinkSender
from simulator.driver import simulate
from studies.config import FeedbackStudyConfig, TiersStudyConfig
from studies.depth import DepthConfig, build, relevance_by_depth
from studies.freshness import prepare
from training.train import TrainConfig, train

log = logging.getLogger(__name__)

ARMS = ("no feedback", "final", "final, weighted", "strong", "weak")


def simulate_log(cfg: FeedbackStudyConfig, world_dir: Path, root: Path) -> tuple[Path, float]:
    """The loop's traffic into a fresh SQLite event log, on a clock that spreads it over
    `span_windows` windows ending now; returns (log, the clock's last reading: the cut)."""

    path = root / "events.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    sink = open_sink(path)
    span = cfg.span_windows * cfg.window_s
    # the driver reads the clock about three times a request (sent, answered, events)
    step = span / (3.0 * cfg.requests)
    ticks = itertools.count()
    start = time.time() - span

    def clock() -> float:
        return start + next(ticks) * step

    sim = SimulateConfig(
        world=str(world_dir),
        users=cfg.users,
        requests=cfg.requests,
        seed=cfg.seed,
        window_s=cfg.window_s,
        resend_share=0.0,
        # no click later than a window: the cut then leaves exactly the newest window open
        max_delay_s=cfg.window_s,
    )
    local = LocalRecommender(world_dir, sink, seed=cfg.seed, clock=clock)
    simulate(sim, client_factory=lambda: local, sender=SinkSender(sink), clock=clock)
    return path, clock()


def feedback_labels(cfg: FeedbackStudyConfig, world_dir: Path, root: Path):
    """Simulate the loop's traffic (`simulate_log`) and join it at the cut, seeing only what
    had happened by then: impressions of the newest window are still pending, and clicks
    after the cut do not exist yet. Returns (labels folder, JoinReport)."""

    events, cut = simulate_log(cfg, world_dir, root)
    labels = root / "labels"
    if labels.exists():
        shutil.rmtree(labels)
    joined = run_join(
        JoinConfig(log=str(events), out=str(labels), window_s=cfg.window_s, as_of=cut),
        source=_Upto(open_source(str(events)), cut),
    )
    return labels, joined


def study_feedback(cfg: FeedbackStudyConfig):
    """What a feedback study starts from: its folder, the world and production run (made
    the first time: `studies.freshness.prepare`), and the loop's labels joined at the cut.
    Returns (root, world dir, production run dir, labels dir, JoinReport)."""

    root = Path(cfg.dir)
    root.mkdir(parents=True, exist_ok=True)
    data, prod = prepare(
        root,
        preset=cfg.preset,
        seed=cfg.seed,
        world=cfg.world,
        run=cfg.run,
        train_epochs=cfg.train_epochs,
    )
    labels, joined = feedback_labels(cfg, data, root)
    return root, data, prod, labels, joined


def warm_finetune(cfg: FeedbackStudyConfig, data: Path, prod: Path, **fields):
    """The fine-tune every arm of a feedback study runs: production's weights, canary
    `warm_window`'s epochs and rate, and no popularity prior in any arm (a beta chosen per
    arm would differ between arms and hide what the arms compare). `fields`: more
    TrainConfig fields."""

    return TrainConfig(
        data=str(data),
        init_from=str(prod),
        epochs=cfg.epochs,
        lr=cfg.lr,
        seed=cfg.seed,
        resume=False,
        progress=False,
        prior_betas=(0.0,),
        **fields,
    )


def run_study(cfg: TiersStudyConfig, progress=None) -> dict[str, Any]:
    t0 = time.perf_counter()
    root, data, prod, labels, joined = study_feedback(cfg)
    if progress:
        progress(f"simulated and joined: {joined.labels_written} final, {joined.pending} pending")
    weighted = TierConfig(strong_watch_s=cfg.strong_watch_s, weak_weight=cfg.weak_weight)
    plans = {
        "no feedback": None,
        "final": ("final", replace(weighted, weak_weight=1.0)),
        "final, weighted": ("final", weighted),
        "strong": ("strong", weighted),
        "weak": ("weak", weighted),
    }
    # No baselines: they do not depend on the labels.
    base = warm_finetune(cfg, data, prod, baselines=())
    arms: dict[str, dict[str, Any]] = {}
    for name, plan in plans.items():
        out = root / "runs" / name.replace(", ", "-").replace(" ", "-")
        counts: dict[str, int] = {}
        extra = None
        if plan is not None:
            use, tiers = plan
            extra = out.parent / f"{out.name}.parquet"
            extra.parent.mkdir(parents=True, exist_ok=True)
            counts = export_tiered(labels, extra, use, tiers)
        metrics = train(
            replace(base, out=str(out), extra_interactions=str(extra) if extra else None)
        )
        loop = build(
            DepthConfig(dir=str(root), world=str(data), run=str(out), users=cfg.eval_users)
        )
        depth = relevance_by_depth(loop, (0.0,))
        arms[name] = {
            "positives": counts,
            "ndcg@10": _test_ndcg(metrics),
            "true_relevance@10": depth[0]["rel@1-10"],
            "oracle_relevance@10": depth[-1]["rel@1-10"],
        }
        if progress:
            progress(f"{name}: {arms[name]}")
    result = {
        "config": asdict(cfg),
        "join": {"final": joined.labels_written, "pending": joined.pending},
        "arms": arms,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = Path(cfg.out) if cfg.out else root / "tiers.json"
    atomic_write_text(path, json.dumps(result, indent=1, default=str))
    result["path"] = str(path)
    return result


class _Upto:
    """An event source that shows only events up to `cut` (event time)."""

    def __init__(self, source, cut: float):
        self.source, self.cut = source, cut

    def snapshot(self) -> dict[str, int]:
        return self.source.snapshot()

    def read(self, kind: str, *, after: int, upto: int):
        df = self.source.read(kind, after=after, upto=upto)
        return df[df["ts"] <= self.cut]

    def quarantine_counts(self) -> dict[str, dict[str, int]]:
        return self.source.quarantine_counts()


def _test_ndcg(metrics: dict) -> float | None:
    """The model's NDCG@10 on the test split from `train`'s metrics (None if absent)."""
    try:
        return float(metrics["test"]["model"]["ndcg@10"])
    except (KeyError, TypeError):
        return None


def table(result: dict[str, Any]) -> str:
    lines = [
        "| positives from | positives (weak / strong / not final) | test NDCG@10 | "
        "true relevance of top 10 |",
        "| --- | --- | --- | --- |",
    ]
    for name, arm in result["arms"].items():
        c = arm["positives"]
        pos = f"{c['positives']} ({c['weak']} / {c['strong']} / {c['not_final']})" if c else "–"
        ndcg = f"{arm['ndcg@10']:.4f}" if arm["ndcg@10"] is not None else "–"
        lines.append(f"| {name} | {pos} | {ndcg} | {arm['true_relevance@10']:.3f} |")
    return "\n".join(lines)
