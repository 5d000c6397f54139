"""`northstar bench-online`: the live state's costs, side by side, in one run.

1. Feature lookup for a batch of users: the snapshot file (today's embedded default), the
   Redis store read through a version's view, and the in-process cache's hit path.
2. The event stream: ingest events/s (each write acknowledged), the log writer's drain
   rate, and consumer lag at a fixed offered rate.
3. `recommend` over gRPC on a real tritonserver, single-user requests in a closed loop:
   per-version snapshot files against the Redis store, same world, same users.

Figures go to tables (printed, and bench-online.json/.md in --out) and a page with the plot
inline (bench-online.html, .png); none of them is asserted anywhere.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.figures import save_png
from common.redis_server import RedisServer
from common.templating import render
from feedback.bench import StreamBenchConfig, format_stream_bench, run_stream_bench
from loadtest.bench import machine
from loadtest.loadgen import LoadGenerator, LoadSpec, infer_request
from online.bench import run
from online.store import RedisFeatureStore
from serving import repository as layout
from serving.publish import ExportConfig, export
from serving.server import ServerConfig, TritonServer
from serving.testing import world_run
from training.synth import SynthConfig, generate_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineBenchConfig:
    out: str = "reports/bench-online"
    lookup_users: int = 100_000  # users seeded for the lookup figure
    lookup_batch: int = 64
    lookup_batches: int = 500
    stream_events: int = 200_000
    stream_rate: float = 20_000.0  # events/s offered for the lag figure
    stream_seconds: float = 10.0
    world: str = "small"  # training.synth preset for the recommend figure
    concurrency: tuple[int, ...] = (1, 16)
    duration_s: float = 10.0
    k: int = 10


def bench_lookup(cfg: OnlineBenchConfig) -> dict:
    r = run(cfg.lookup_users, batch=cfg.lookup_batch, n_batches=cfg.lookup_batches, log=log.info)
    return {
        "users": r.users,
        "seed_s": r.seed_s,
        "batch": cfg.lookup_batch,
        "p50_ms": {k: v[0] for k, v in r.lookup_ms.items()},
        "p99_ms": {k: v[1] for k, v in r.lookup_ms.items()},
    }


def bench_stream(cfg: OnlineBenchConfig) -> dict:
    return run_stream_bench(
        StreamBenchConfig(
            events=cfg.stream_events, rate=cfg.stream_rate, seconds=cfg.stream_seconds
        )
    )


def _world(root: Path, preset: str):
    _, ds = generate_dataset(SynthConfig.preset(preset, seed=0), progress=False)
    run = world_run(ds, root / "run")
    return ds, run


def bench_recommend(cfg: OnlineBenchConfig) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="northstar-bench-online-") as tmp:
        root = Path(tmp)
        ds, run = _world(root, cfg.world)
        repo = root / "model_repository"
        export(ExportConfig(run=str(run), repo=str(repo), k=cfg.k, overfetch=cfg.k))
        users = ds.users["user_id"].to_numpy(np.int64)
        rng = np.random.default_rng(0)
        picks = rng.choice(users, size=min(2000, len(users)), replace=False)
        payloads = tuple(
            infer_request(
                layout.RECOMMEND,
                {
                    layout.REC_USER_ID: np.array([[u]], dtype=np.int64),
                    layout.REC_K: np.array([[cfg.k]], dtype=np.int32),
                },
                (layout.REC_ITEM_IDS, layout.REC_SCORES),
            )
            for u in picks
        )
        with RedisServer(root / "redis") as redis:
            store = RedisFeatureStore(redis.url, socket_timeout_s=30.0)
            store.seed(ds.users, ds.interactions)
            store.close()
            for features, online in (("snapshot", None), ("redis", redis.url)):
                server = TritonServer(
                    ServerConfig.on_free_ports(str(repo), online_store=online)
                ).start()
                try:
                    with LoadGenerator() as gen:
                        for c in cfg.concurrency:
                            spec = LoadSpec(
                                kind="grpc",
                                url=server.grpc_url,
                                payloads=payloads,
                                rows_per_request=1,
                                concurrency=c,
                                duration_s=cfg.duration_s,
                            )
                            res = gen.run(spec)
                            log.info("%s c=%d: %.0f q/s", features, c, res.qps)
                            rows.append({"features": features, **res.to_dict()})
                finally:
                    server.stop()
    return rows


def run_online_bench(cfg: OnlineBenchConfig) -> dict:
    return {
        "config": asdict(cfg),
        "machine": machine(),
        "lookup": bench_lookup(cfg),
        "stream": bench_stream(cfg),
        "recommend": bench_recommend(cfg),
    }


def format_online_bench(res: dict) -> str:
    lk = res["lookup"]
    lines = [
        f"feature lookup, {lk['batch']} users per batch ({lk['users']:,} users seeded):",
        "| path | p50 ms | p99 ms | p50 ÷ snapshot |",
        "| --- | --- | --- | --- |",
    ]
    base = lk["p50_ms"]["snapshot"]
    for name in ("snapshot", "redis", "cached"):
        p50, p99 = lk["p50_ms"][name], lk["p99_ms"][name]
        lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {p50 / base:.1f}× |")

    lines += ["", "event stream:", format_stream_bench(res["stream"]), ""]
    lines += [
        "recommend over gRPC, one user per request:",
        "| concurrency | snapshot q/s (p50, p99 ms) | redis q/s (p50, p99 ms) | redis ÷ snapshot |",
        "| --- | --- | --- | --- |",
    ]
    by = {(r["features"], r["concurrency"]): r for r in res["recommend"]}
    for c in sorted({r["concurrency"] for r in res["recommend"]}):
        s, r = by.get(("snapshot", c)), by.get(("redis", c))
        if not (s and r):
            continue
        lines.append(
            f"| {c} | {s['qps']:.0f} ({s['p50_ms']:.1f}, {s['p99_ms']:.1f}) | "
            f"{r['qps']:.0f} ({r['p50_ms']:.1f}, {r['p99_ms']:.1f}) | "
            f"{r['qps'] / s['qps']:.2f}× |"
        )
    return "\n".join(lines)


def plot(res: dict, path: str | Path) -> Path:
    """Left: feature lookup p50/p99 per path. Right: recommend q/s per concurrency, the
    snapshot files beside the Redis store."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    lk = res["lookup"]
    paths = ["snapshot", "redis", "cached"]
    x = np.arange(len(paths))
    for off, key, label in ((-0.2, "p50_ms", "p50"), (0.2, "p99_ms", "p99")):
        left.bar(x + off, [lk[key][p] for p in paths], width=0.4, label=label)
    left.set_xticks(x, ["snapshot file", "Redis + view", "cache hit + view"])
    left.set_ylabel("ms per batch")
    left.set_title(f"feature lookup, {lk['batch']} users per batch", fontsize=10)
    left.legend(fontsize=8)
    conc = sorted({r["concurrency"] for r in res["recommend"]})
    by = {(r["features"], r["concurrency"]): r["qps"] for r in res["recommend"]}
    xc = np.arange(len(conc))
    for off, feats in ((-0.2, "snapshot"), (0.2, "redis")):
        right.bar(xc + off, [by.get((feats, c), 0.0) for c in conc], width=0.4, label=feats)
    right.set_xticks(xc, [f"concurrency {c}" for c in conc])
    right.set_ylabel("requests / s")
    right.set_title("recommend over gRPC, one user per request", fontsize=10)
    right.legend(fontsize=8)
    return save_png(fig, path)


def write_reports(res: dict, out: str | Path) -> Path:
    """bench-online.json, .md, .png, and .html (the plot inline, the tables as text)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_online_bench(res)
    (out / "bench-online.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "bench-online.md").write_text(text + "\n")
    png = plot(res, out / "bench-online.png")
    page = render(
        __file__,
        "bench_online.html.j2",
        machine=res["machine"],
        png=base64.b64encode(png.read_bytes()).decode(),
        text=text,
    )
    (out / "bench-online.html").write_text(page)
    return out
