"""The naive peer: FastAPI + PyTorch eager, one request at a time, doing `recommend`'s work.

Per request: look up the user's online features, run the retrieval module eagerly
(user tower -> scores against the whole catalogue -> top-K), drop seen items, keep k,
and mint a request id. The handler is `async def` and computes inline, so the event
loop serves exactly one request at a time: the way a first prototype usually looks.

Run it in its own process (the benchmark does):

    NAIVE_RUN=runs/x NAIVE_REPO=model_repository NAIVE_THREADS=2 \
        uvicorn loadtest.naive:app --port 8090
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI

from loadtest.peer_process import PeerProcess
from models.export import build_retrieval
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.recommender import select_unseen
from serving.routing import RoutingState
from training.run import load_run


@dataclass
class NaiveRecommender:
    module: object  # models.retrieval.TwoTowerRetrieval, eval mode
    snapshot: object  # models.snapshot.FeatureSnapshot
    version: int

    @classmethod
    def load(cls, run: str, repo: str, threads: int = 0) -> NaiveRecommender:
        if threads > 0:
            torch.set_num_threads(threads)
        routing = RoutingState.load(layout.routing_path(repo))
        meta = layout.read_meta(repo, routing.production)
        trained = load_run(run)
        module = build_retrieval(trained.model, trained.vocab.item_ids, int(meta["graph_k"]))
        snapshot = FeatureSnapshot.load(layout.features_path(repo, routing.production))
        return cls(module, snapshot, routing.production)

    def recommend(self, user_id: int, k: int) -> dict:
        feats = self.snapshot.lookup(np.asarray([user_id], dtype=np.int64))
        feeds = feats.feeds(self.module.input_names)
        with torch.inference_mode():
            ids, scores = self.module(
                *(torch.from_numpy(feeds[n]) for n in self.module.input_names)
            )  # (1, K) each
        out_ids, out_scores, counts = select_unseen(
            ids.numpy(), scores.numpy(), feats.seen, np.asarray([k], dtype=np.int64)
        )
        n = int(counts[0])
        return {
            "user_id": int(user_id),
            "item_ids": out_ids[0, :n].tolist(),
            "scores": out_scores[0, :n].tolist(),
            "model_version": self.version,
            "request_id": uuid.uuid4().hex,
            "cold_start": not bool(feats.known[0]),
        }


def create_app(run: str, repo: str, threads: int = 0):
    rec = NaiveRecommender.load(run, repo, threads)
    app = FastAPI(title="northstar naive peer")

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.get("/recommend")
    async def recommend(user_id: int, k: int = 10) -> dict:
        # async + blocking compute: one request at a time, on purpose.
        return rec.recommend(user_id, k)

    return app


def __getattr__(name: str):
    # `uvicorn loadtest.naive:app` builds the app from the environment on first access.
    if name == "app":
        threads = int(os.environ.get("NAIVE_THREADS", 0))
        return create_app(os.environ["NAIVE_RUN"], os.environ["NAIVE_REPO"], threads)
    raise AttributeError(name)


class NaiveServer(PeerProcess):
    """The naive peer in its own uvicorn process; `with NaiveServer(run, repo) as s: s.url`."""

    name = "naive"

    def __init__(
        self,
        run: str | Path,
        repo: str | Path,
        *,
        threads: int = 0,
        log_dir: str | Path | None = None,
        startup_timeout_s: float = 120.0,
    ):
        super().__init__(log_dir=log_dir, startup_timeout_s=startup_timeout_s)
        self.run, self.repo, self.threads = Path(run), Path(repo), threads

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "NAIVE_RUN": str(self.run.resolve()),
            "NAIVE_REPO": str(self.repo.resolve()),
            "NAIVE_THREADS": str(self.threads),
        }

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "uvicorn", "loadtest.naive:app", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1", "--log-level", "warning"]
        return [*cmd, "--no-access-log"]
