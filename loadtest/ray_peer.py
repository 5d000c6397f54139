"""The batching peer: Ray Serve with `@serve.batch`, doing `recommend`'s work on the same graph.

A team that outgrows a one-request-at-a-time server (loadtest/naive.py) would most likely
reach for Ray Serve and its request batching, not for Triton. This peer is that choice,
built fairly: per batch of concurrent requests it looks the users up in the production
version's feature snapshot, runs the version's own model.onnx once through the same
onnxruntime path `recommend` uses inline on the cpu target (serving.inline), drops seen
items and keeps k (serving.recommender.select_unseen), and mints a request id per user.
Only the serving stack differs: Ray Serve's HTTP proxy, its router and `@serve.batch`
instead of Triton's dynamic batcher and Python backend.

Run in its own process (the benchmark does); Ray starts its own daemons (GCS, raylet,
the Serve controller and proxy), all in that process's session:

    python -m loadtest.ray_peer --repo model_repository --port 8091 --threads 2
    curl 'http://127.0.0.1:8091/recommend?user_id=42&k=10'
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.peer_process import PeerProcess
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.inline import InlineRetrieval
from serving.recommender import select_unseen
from serving.routing import RoutingState


@dataclass(frozen=True)
class PeerConfig:
    repo: str
    threads: int = 0  # onnxruntime intra-op threads; 0 = its default
    max_batch_size: int = 64  # recommend's dynamic batcher takes up to 64 users too
    batch_wait_ms: float = 1.0  # how long a batch waits to fill once a request is in
    max_ongoing_requests: int = 256


def _deployment(cfg: PeerConfig):
    # lazy: Ray is heavy; only the peer's process needs it, not `bench` (for RayPeerServer)
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    class RecommendPeer:
        def __init__(self) -> None:
            self.version = RoutingState.load(layout.routing_path(cfg.repo)).production
            self.snapshot = FeatureSnapshot.load(layout.features_path(cfg.repo, self.version))
            self.retrieve = InlineRetrieval(cfg.repo, intra_op_threads=cfg.threads)
            self.retrieve.warm([self.version])
            self.recommend.set_max_batch_size(cfg.max_batch_size)
            self.recommend.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000.0)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
        async def recommend(self, requests: list[tuple[int, int]]) -> list[dict]:
            users = np.fromiter((u for u, _ in requests), dtype=np.int64, count=len(requests))
            ks = np.fromiter((k for _, k in requests), dtype=np.int64, count=len(requests))
            feats = self.snapshot.lookup(users)
            ids, scores = self.retrieve(self.version, feats)
            out_ids, out_scores, counts = select_unseen(ids, scores, feats.seen, ks)
            return [
                {
                    "user_id": int(users[i]),
                    "item_ids": out_ids[i, : counts[i]].tolist(),
                    "scores": out_scores[i, : counts[i]].tolist(),
                    "model_version": self.version,
                    "request_id": uuid.uuid4().hex,
                    "cold_start": not bool(feats.known[i]),
                }
                for i in range(len(requests))
            ]

        async def __call__(self, request):
            if request.url.path.rstrip("/").endswith("/health"):
                return {"ok": True}
            try:
                user_id = int(request.query_params["user_id"])
                k = int(request.query_params.get("k", 10))
            except (KeyError, ValueError) as exc:
                return JSONResponse(
                    {"error": f"user_id (int) and k (int) expected: {exc}"}, status_code=400
                )
            if k < 1:
                return JSONResponse({"error": f"k={k}: expected >= 1"}, status_code=400)
            return await self.recommend((user_id, k))

    return RecommendPeer


def serve_forever(cfg: PeerConfig, port: int) -> None:
    """Start Ray and the deployment on 127.0.0.1:port; block until SIGTERM/SIGINT."""
    # lazy: Ray is heavy and only the peer's own process needs it (see _deployment)
    import ray
    from ray import serve

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    ray.init(
        num_cpus=max(1, len(os.sched_getaffinity(0))),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(_deployment(cfg).bind(), route_prefix="/")
        print(f"ray peer ready on 127.0.0.1:{port}", flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


class RayPeerServer(PeerProcess):
    """The peer in its own process; `with RayPeerServer(repo) as s: s.wait_ready(); s.url`."""

    name = "ray-peer"

    def __init__(
        self,
        repo: str | Path,
        *,
        threads: int = 0,
        max_batch_size: int = 64,
        batch_wait_ms: float = 1.0,
        log_dir: str | Path | None = None,
        startup_timeout_s: float = 300.0,
    ):
        # a clean stop (serve.shutdown + ray.shutdown in the child) takes seconds
        super().__init__(log_dir=log_dir, startup_timeout_s=startup_timeout_s, stop_timeout_s=60)
        self.repo, self.threads = Path(repo), threads
        self.max_batch_size, self.batch_wait_ms = max_batch_size, batch_wait_ms

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "loadtest.ray_peer", "--repo", str(self.repo.resolve())]
        cmd += ["--port", str(self.port), "--threads", str(self.threads)]
        cmd += ["--max-batch-size", str(self.max_batch_size)]
        return [*cmd, "--batch-wait-ms", str(self.batch_wait_ms)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.ray_peer", description=__doc__)
    p.add_argument("--repo", required=True, help="the model repository (production is served)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=1.0)
    a = p.parse_args(argv)
    cfg = PeerConfig(
        repo=a.repo,
        threads=a.threads,
        max_batch_size=a.max_batch_size,
        batch_wait_ms=a.batch_wait_ms,
    )
    serve_forever(cfg, a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
