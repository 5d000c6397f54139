"""In-process stand-ins for the server's two doors, for tests and dry runs without Triton."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feedback.events import ServedImpressions
from feedback.explore import rank_with_exploration
from feedback.hook import ImpressionLogger
from feedback.ids import uuid7_batch
from feedback.sink_api import EventSink
from serving.ingest_batches import IngestResult
from training.synth import World


class SinkSender:
    """Sends straight into an EventSink, in batches: the loop without a server."""

    def __init__(self, sink: EventSink, batch: int = 512) -> None:
        self.sink, self.batch = sink, batch

    def __call__(self, columns: dict[str, np.ndarray]) -> IngestResult:
        n = len(columns["event_id"])
        accepted, reasons = np.zeros(n, bool), [""] * n
        res = IngestResult(accepted, reasons)
        for s in range(0, n, self.batch):
            sl = slice(s, min(n, s + self.batch))
            r = self.sink.write_interactions({k: v[sl] for k, v in columns.items()})
            accepted[sl], reasons[sl] = r.accepted, r.reasons
            res.batches += 1
        return res


@dataclass(frozen=True)
class LocalSlate:
    user_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    model_version: int
    request_id: str
    cold_start: bool = False


class LocalRecommender:
    """An in-process stand-in for `recommend`: ranks by the world's noisy truth, explores
    with ε, logs impressions through the same ImpressionLogger. For tests and dry runs."""

    def __init__(
        self,
        world_dir: str | Path,
        sink: EventSink,
        *,
        epsilon: float = 0.1,
        overfetch: int = 30,
        noise: float = 1.0,
        seed: int = 0,
        model_version: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = World.load(world_dir)
        # the driver's clock, so impressions and the clicks on them share one timeline
        self.logger = ImpressionLogger(sink, clock=clock)
        self.epsilon, self.overfetch, self.noise = epsilon, overfetch, noise
        self.model_version = model_version
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def recommend(self, user_ids, k: int = 10) -> list[LocalSlate]:
        uid = np.atleast_1d(np.asarray(user_ids, np.int64))
        with self.lock:
            u = self.world.user_index(uid)
            truth = self.world.oracle_scores(u, self.world.cfg.end_ts)  # (B, I)
            noisy = truth + self.noise * self.rng.standard_normal(truth.shape)
            top = np.argsort(-noisy, axis=1)[:, : self.overfetch]  # (B, N)
            cand = self.world.item_id_of(top)
            scores = np.take_along_axis(noisy, top, axis=1).astype(np.float32)
            r = rank_with_exploration(cand, scores, k, epsilon=self.epsilon, rng=self.rng)
            req = uuid7_batch(len(uid), rng=self.rng)
            rows, pos = np.nonzero(r.item_ids >= 0)
            self.logger.write(
                ServedImpressions(
                    request_id=req[rows],
                    user_id=uid[rows],
                    item_id=r.item_ids[rows, pos],
                    position=pos,
                    score=r.scores[rows, pos],
                    model_version=np.full(len(rows), self.model_version),
                    propensity=r.propensity[rows, pos],
                )
            )
        return [
            LocalSlate(
                int(uid[b]),
                r.item_ids[b][r.item_ids[b] >= 0],
                r.scores[b][r.item_ids[b] >= 0],
                self.model_version,
                str(req[b]),
            )
            for b in range(len(uid))
        ]

    def close(self) -> None:
        pass
