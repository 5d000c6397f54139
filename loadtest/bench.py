"""`northstar bench`: the served path beside its ceilings and its peers, in ONE run.

Rows, per catalogue size (queries = users scored):
  (a) the exported model.onnx in onnxruntime in this process, batched, with the intra-op
      threads the server's `retrieval` gets: the ceiling;
  (b) Triton `retrieval` with batched requests;
  (c) Triton `recommend` with single-user requests over a concurrency sweep (p50, p99);
  (d) the naive peer (loadtest/naive.py): FastAPI + PyTorch eager, one request at a time,
      in its own uvicorn process, over a concurrency sweep;
  (e) faiss IndexFlatIP over the same item embeddings (search only: user embeddings are
      computed beforehand, not timed);
  (g) the batching peer (loadtest/ray_peer.py): Ray Serve with @serve.batch running the
      same model.onnx, snapshot and seen filter as `recommend`, over the same sweep as (d).

The machine is shared and noisy, so every figure that goes into a ratio is measured in
the same run, one after the other, with the load average recorded beside it. The load
generator for (b), (c) and (d) is a separate process (loadtest/loadgen.py); while one
row runs the other servers sit idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import onnxruntime
import psutil
import torch

from common import config as config_mod
from loadtest import catalogue, report
from loadtest.loadgen import LoadGenerator, LoadResult, LoadSpec, infer_request
from loadtest.naive import NaiveServer
from loadtest.ray_peer import RayPeerServer
from loadtest.users import UserSampler, production_snapshot
from models.compact_export import MODES, IndexConfig
from models.export import ParityError, build_retrieval
from models.features import INPUT_USER_INDEX, graph_input_names
from models.onnx_session import onnx_session
from models.towers import TowerConfig
from serving import repository as layout
from serving.client import RecommenderClient
from serving.routing import RoutingState
from serving.server import ServerConfig, TritonServer
from training.run import load_run

log = logging.getLogger(__name__)


ROWS = ("a", "b", "c", "d", "e", "g")  # (f) is per retrieval mode: `retrieval_modes`


@dataclass(frozen=True)
class BenchConfig:
    # Catalogue sizes; each gets its own untrained repository (catalogue.py) and server.
    items: tuple[int, ...] = (100_000,)
    n_users: int = 20_000  # known users in the snapshot; Zipf-sampled like the locustfile
    out: str = "reports/bench"
    cache: str | None = None  # where built catalogues live (default ~/.cache/northstar/bench)
    # A trained run and its repository instead of untrained catalogues (items is ignored).
    run: str | None = None
    repo: str | None = None
    # Seconds measured per row or sweep level, after a warmup that is not measured. Short,
    # because every row and level runs this long: a whole sweep of one catalogue size must
    # stay quick enough to repeat on a small machine.
    duration_s: float = 4.0
    warmup_s: float = 1.0
    # (a), (b), (e): the in-process ceiling flattens by 256 (loadtest/RESULTS.md).
    batch_size: int = 256
    # (b): two batches in flight keep the server busy while one travels.
    retrieval_concurrency: int = 2
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # (c)
    # (d) collapses past 16 (p99 of seconds); these levels pair with (c)'s for the ratios.
    naive_concurrency: tuple[int, ...] = (1, 16, 32, 64)
    # (g): the batching peer's levels and its batcher (recommend batches up to 64 users in
    # the same ~ms; the peer gets the same chance).
    peer_concurrency: tuple[int, ...] = (1, 16, 32, 64)
    peer_max_batch_size: int = 64
    peer_batch_wait_ms: float = 1.0
    k: int = 10  # items per recommend request
    zipf_a: float = 0.8
    unknown_share: float = 0.05
    seed: int = 0
    rows: tuple[str, ...] = ROWS
    label: str = ""  # a name for this configuration (RESULTS.md steps)
    tiny: bool = False  # smoke shapes (catalogue.TINY_SHAPE) instead of the production tower
    # Threads for the in-process rows and the naive peer; 0 = every core the machine has
    # (what the server gets). Independent of retrieval.intra_op_threads on purpose.
    ceiling_threads: int = 0
    # Log impressions to an event log (out/events.db) as production does. Off by default:
    # the naive peer logs nothing, and "the same work" is the comparison.
    impressions: bool = False
    retrieval: layout.RetrievalServing = field(default_factory=layout.RetrievalServing)
    recommend: layout.RecommendServing = field(default_factory=layout.RecommendServing)
    # Rows (f): `recommend` serving the same catalogue exported with each of these retrieval
    # modes (exact, int8, hnsw, ivf: models/compact_export.py), each version on its own
    # server, at `mode_concurrency`, with the recall or overlap its export measured.
    retrieval_modes: tuple[str, ...] = ()
    mode_concurrency: tuple[int, ...] = (32,)
    index: IndexConfig = field(default_factory=IndexConfig)  # mode is set per row
    # Untrained catalogues with items around this many centres (catalogue.CatalogueShape).
    item_clusters: int = 0
    # The untrained catalogues' user tower and history length (catalogue.CatalogueShape):
    # e.g. tower.user_encoder=sequence tower.time_gaps=true history_len=50 prices the
    # sequential tower against the default mean encoder. Ignored with `tiny` or `run`.
    tower: TowerConfig = catalogue.BENCH_TOWER
    history_len: int = 20


def tiny_config(out: str, cache: str | None = None) -> BenchConfig:
    return BenchConfig(
        items=(catalogue.TINY_SHAPE.n_items,),
        n_users=catalogue.TINY_SHAPE.n_users,
        out=out,
        cache=cache,
        duration_s=0.5,
        warmup_s=0.2,
        batch_size=32,
        concurrency=(1, 4),
        naive_concurrency=(1, 4),
        peer_concurrency=(1, 4),
        label="smoke",
        tiny=True,
    )


def ceiling_threads(cfg: BenchConfig) -> int:
    """Threads for (a), (d) and (e): as many as the server has cores, whatever
    `retrieval.intra_op_threads` says, so that a server lever never lowers the ceiling."""
    return cfg.ceiling_threads or (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- rows


def _row(name: str, what: str, n_items: int, res: LoadResult | dict, **extra) -> dict:
    d = res.to_dict() if isinstance(res, LoadResult) else dict(res)
    d.update(row=name, what=what, n_items=n_items, loadavg=list(os.getloadavg()), **extra)
    return d


def _timed_loop(fn, batches: list, duration_s: float, warmup_s: float) -> dict:
    """Call fn(batch) round-robin; per-call latency and rows/s over the measured window."""
    i = 0
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        fn(batches[i % len(batches)])
        i += 1
    lat, rows = [], 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    while (now := time.perf_counter()) - t0 < duration_s:
        b = batches[i % len(batches)]
        fn(b)
        lat.append(time.perf_counter() - now)
        rows += _batch_rows(b)
        i += 1
    window = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {
        "concurrency": 1,
        "rows_per_request": _batch_rows(batches[0]),
        "requests": len(lat),
        "failures": 0,
        "window_s": window,
        "qps": rows / window,
        "rps": len(lat) / window,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "client_cpu_s": time.process_time() - cpu0,
        "first_error": "",
    }


def _batch_rows(b) -> int:
    return len(b[INPUT_USER_INDEX]) if isinstance(b, dict) else len(b)


def measure_onnx(br: catalogue.BenchRepo, batches, cfg: BenchConfig) -> dict:
    session = onnx_session(
        layout.version_dir(br.repo, br.version) / layout.ONNX_FILE,
        intra_op_threads=ceiling_threads(cfg),
        allow_spinning=cfg.retrieval.allow_spinning,
    )
    names = ["item_ids", "scores"]
    res = _timed_loop(lambda f: session.run(names, f), batches, cfg.duration_s, cfg.warmup_s)
    return _row(
        "a",
        f"ONNX in-process, batch {cfg.batch_size}, {ceiling_threads(cfg)} threads",
        br.shape.n_items,
        res,
        threads=ceiling_threads(cfg),
    )


def measure_faiss(br: catalogue.BenchRepo, batches, cfg: BenchConfig) -> dict:
    run = load_run(br.run)
    module = build_retrieval(run.model, run.vocab.item_ids, br.graph_k)
    items = np.ascontiguousarray(module.item_embeddings.numpy(), dtype=np.float32)  # (N, d)
    with torch.inference_mode():
        queries = [
            np.ascontiguousarray(
                module.user_tower(*(torch.from_numpy(b[n]) for n in module.input_names)).numpy()
            )
            for b in batches
        ]  # each (B, d)
    del module
    threads = ceiling_threads(cfg)
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    res = _timed_loop(lambda q: index.search(q, br.graph_k), queries, cfg.duration_s, cfg.warmup_s)
    return _row(
        "e",
        f"faiss IndexFlatIP k={br.graph_k}, batch {cfg.batch_size}, search only",
        br.shape.n_items,
        res,
        threads=threads,
    )


class _CpuWatch:
    """CPU seconds used by a process and its children (tritonserver + its Python stubs)."""

    def __init__(self, pid: int | None):
        self.proc = psutil.Process(pid) if pid else None

    def seconds(self) -> float:
        if self.proc is None:
            return 0.0
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


def _triton_stats(client, model: str) -> tuple[int, ...]:
    """(inference_count, execution_count, queue_ns, compute_ns) summed over versions."""
    stats = client.statistics(model).values()
    return (
        sum(s.inference_count for s in stats),
        sum(s.execution_count for s in stats),
        sum(s.queue_ns for s in stats),
        sum(s.compute_ns for s in stats),
    )


def _run_load(gen, spec, server_cpu: _CpuWatch, client=None, models=()) -> tuple[LoadResult, dict]:
    before = {m: _triton_stats(client, m) for m in models}
    cpu0, t0 = server_cpu.seconds(), time.perf_counter()
    res = gen.run(spec)
    wall = time.perf_counter() - t0
    server_s = server_cpu.seconds() - cpu0
    extra = {"server_cpu_share": server_s / wall / (os.cpu_count() or 1)}
    # Server CPU per query, warmup included at the measured rate: steadier than q/s when
    # other jobs take a varying share of the machine.
    extra["server_cpu_ms_per_query"] = 1e3 * server_s / max(res.qps * wall, 1e-9)
    extra["client_cpu_share"] = res.client_cpu_s / wall / (os.cpu_count() or 1)
    for m in models:
        inf, exe, queue, compute = (
            a - b for a, b in zip(_triton_stats(client, m), before[m], strict=True)
        )
        extra[f"{m}_avg_batch"] = inf / exe if exe else 0.0
        # Triton's per-request queue wait and per-execution compute (BLS wait included).
        extra[f"{m}_queue_ms"] = queue / max(inf, 1) / 1e6
        extra[f"{m}_compute_ms"] = compute / max(exe, 1) / 1e6
    return res, extra


# ----------------------------------------------------------------------------- one size


def _payloads(br: catalogue.BenchRepo, cfg: BenchConfig):
    snap = production_snapshot(br.repo)
    names = graph_input_names(layout.read_meta(br.repo, br.version))
    sampler = UserSampler.build(
        snap.user_ids, zipf_a=cfg.zipf_a, unknown_share=cfg.unknown_share, seed=cfg.seed
    )
    rng = np.random.default_rng(cfg.seed)
    batches = []
    for _ in range(8):
        f = snap.lookup(sampler.sample(cfg.batch_size, rng))
        batches.append(f.feeds(names))
    singles = sampler.sample(4096, rng)
    return batches, singles


def bench_size(br: catalogue.BenchRepo, cfg: BenchConfig, out: Path) -> list[dict]:
    catalogue.write_serving_configs(br.repo, cfg.retrieval, cfg.recommend)
    batches, singles = _payloads(br, cfg)
    rows: list[dict] = []
    n = br.shape.n_items
    need_triton = {"b", "c"} & set(cfg.rows)
    with contextlib.ExitStack() as stack:
        naive = None
        if "d" in cfg.rows:  # starts in the background while tritonserver loads
            naive = stack.enter_context(
                NaiveServer(br.run, br.repo, threads=ceiling_threads(cfg), log_dir=out)
            )
        peer = None
        if "g" in cfg.rows:  # Ray takes tens of seconds to come up: start it early too
            peer = stack.enter_context(
                RayPeerServer(
                    br.repo,
                    threads=ceiling_threads(cfg),
                    max_batch_size=cfg.peer_max_batch_size,
                    batch_wait_ms=cfg.peer_batch_wait_ms,
                    log_dir=out,
                )
            )
        server = None
        if need_triton:
            event_log = None
            if cfg.impressions:
                event_log = out / f"events-{n}.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{event_log}{suffix}").unlink(missing_ok=True)
            server_cfg = ServerConfig.on_free_ports(
                str(br.repo),
                log_file=str(out / f"tritonserver-{n}.log"),
                event_log=str(event_log) if event_log else None,
            )
            with _without_env(_EVENT_LOG_ENV):  # an inherited event log would log anyway
                server = stack.enter_context(TritonServer(server_cfg))
        if naive is not None:
            naive.wait_ready()
        if peer is not None:
            peer.wait_ready()
        gen = stack.enter_context(LoadGenerator())

        # Order: (a), (e), (b), then (c) and (d) at each concurrency back to back (the pairs
        # a ratio compares are seconds apart), then (a) again: the ceiling's drift over the
        # run shows, and the checks use the mean of the two.
        if "a" in cfg.rows:
            rows.append(measure_onnx(br, batches, cfg))
            log.info("(a) %s", _fmt(rows[-1]))
        if "e" in cfg.rows:
            rows.append(measure_faiss(br, batches, cfg))
            log.info("(e) %s", _fmt(rows[-1]))
        client = cpu = None
        models = (layout.RECOMMEND, layout.RETRIEVAL)
        if server is not None:
            client = stack.enter_context(RecommenderClient(server.grpc_url))
            cpu = _CpuWatch(server.process.pid)
        if server is not None and "b" in cfg.rows:
            payloads = tuple(
                infer_request(layout.RETRIEVAL, b, ("item_ids", "scores")) for b in batches
            )
            spec = LoadSpec(
                "grpc",
                server.grpc_url,
                payloads,
                cfg.batch_size,
                cfg.retrieval_concurrency,
                cfg.duration_s,
                cfg.warmup_s,
            )
            res, extra = _run_load(gen, spec, cpu, client, models)
            rows.append(_row("b", f"Triton retrieval, batch {cfg.batch_size}", n, res, **extra))
            log.info("(b) %s", _fmt(rows[-1]))
        rec_payloads = tuple(_recommend_request(u, cfg.k) for u in singles)
        naive_paths = tuple(f"/recommend?user_id={int(u)}&k={cfg.k}" for u in singles)
        naive_cpu = _CpuWatch(naive.process.pid) if naive is not None else None
        c_levels = cfg.concurrency if server is not None and "c" in cfg.rows else ()
        d_levels = cfg.naive_concurrency if naive is not None else ()
        g_levels = cfg.peer_concurrency if peer is not None else ()
        peer_cpu = _CpuWatch(peer.process.pid) if peer is not None else None
        for c in sorted(set(c_levels) | set(d_levels) | set(g_levels)):
            if c in c_levels:
                spec = LoadSpec(
                    "grpc", server.grpc_url, rec_payloads, 1, c, cfg.duration_s, cfg.warmup_s
                )
                res, extra = _run_load(gen, spec, cpu, client, models)
                rows.append(_row("c", "Triton recommend, 1 user/request", n, res, **extra))
                log.info("(c) %s", _fmt(rows[-1]))
            if c in d_levels:
                spec = LoadSpec("http", naive.url, naive_paths, 1, c, cfg.duration_s, cfg.warmup_s)
                res, extra = _run_load(gen, spec, naive_cpu)
                what = "naive FastAPI + torch eager, 1 user/request"
                rows.append(_row("d", what, n, res, **extra))
                log.info("(d) %s", _fmt(rows[-1]))
            if c in g_levels:
                # the same paths as (d): one user per HTTP request, batched inside the peer
                spec = LoadSpec("http", peer.url, naive_paths, 1, c, cfg.duration_s, cfg.warmup_s)
                res, extra = _run_load(gen, spec, peer_cpu)
                what = "Ray Serve @serve.batch + onnxruntime, 1 user/request"
                rows.append(_row("g", what, n, res, **extra))
                log.info("(g) %s", _fmt(rows[-1]))
        if "a" in cfg.rows:
            rows.append(measure_onnx(br, batches, cfg))
            log.info("(a) %s", _fmt(rows[-1]))
    return rows


def bench_modes(br: catalogue.BenchRepo, cfg: BenchConfig, out: Path) -> list[dict]:
    """Rows (f): for each retrieval mode, route production to that version of the catalogue,
    start a server and measure `recommend` at cfg.mode_concurrency. Routing is put back to
    the exact baseline afterwards (the catalogue is cached and shared)."""

    versions: dict[str, int] = {}
    rows: list[dict] = []
    n = br.shape.n_items
    for m in cfg.retrieval_modes:
        try:
            versions[m] = br.version if br.trained else catalogue.variant(br, m, cfg.index)
        except ParityError as exc:  # the export's own check refused it: a result, not a crash
            log.warning("(f) %s refused at export: %s", m, exc)
            nan = float("nan")
            refused = {"concurrency": 0, "qps": nan, "p50_ms": nan, "p99_ms": nan, "failures": 0}
            rows.append(_row("f", f"{m} retrieval: refused at export", n, refused, error=str(exc)))
    _, singles = _payloads(br, cfg)
    payloads = tuple(_recommend_request(u, cfg.k) for u in singles)
    routing_path = layout.routing_path(br.repo)
    saved = RoutingState.load(routing_path)
    try:
        for mode, version in versions.items():
            RoutingState(production=version, salt=saved.salt).save(routing_path)
            catalogue.write_serving_configs(br.repo, cfg.retrieval, cfg.recommend)
            info = layout.read_meta(br.repo, version).get("index", {"mode": "exact"})
            quality = {
                k: info[k]
                for k in ("recall", "recall_k", "search_param", "search_value", "overlap_mean")
                if k in info
            }
            server_cfg = ServerConfig.on_free_ports(
                str(br.repo), log_file=str(out / f"tritonserver-{n}-{mode}.log")
            )
            with (
                _without_env(_EVENT_LOG_ENV),
                TritonServer(server_cfg) as server,
                LoadGenerator() as gen,
                RecommenderClient(server.grpc_url) as client,
            ):
                cpu = _CpuWatch(server.process.pid)
                for c in cfg.mode_concurrency:
                    spec = LoadSpec(
                        "grpc", server.grpc_url, payloads, 1, c, cfg.duration_s, cfg.warmup_s
                    )
                    res, extra = _run_load(gen, spec, cpu, client, (layout.RECOMMEND,))
                    what = f"Triton recommend, {mode} retrieval{_quality_text(quality)}"
                    rows.append(
                        _row("f", what, n, res, mode=mode, version=version, **quality, **extra)
                    )
                    log.info("(f) %s %s", _fmt(rows[-1]), quality)
    finally:
        saved.save(routing_path)
        catalogue.write_serving_configs(br.repo, cfg.retrieval, cfg.recommend)
    return rows


def _quality_text(q: dict) -> str:
    if "recall" in q:
        width = f"{q['search_param']}={q['search_value']}"
        return f" (recall@{q['recall_k']} {q['recall']:.3f}, {width})"
    if "overlap_mean" in q:
        return f" (top-K overlap with fp32 {q['overlap_mean']:.3f})"
    return ""


_EVENT_LOG_ENV = "NORTHSTAR_EVENT_LOG"  # feedback.sink.EVENT_LOG_ENV


@contextlib.contextmanager
def _without_env(name: str):
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def _recommend_request(user_id: int, k: int) -> bytes:
    return infer_request(
        layout.RECOMMEND,
        {
            layout.REC_USER_ID: np.array([[user_id]], dtype=np.int64),
            layout.REC_K: np.array([[k]], dtype=np.int32),
        },
        (
            layout.REC_ITEM_IDS,
            layout.REC_SCORES,
            layout.REC_MODEL_VERSION,
            layout.REC_REQUEST_ID,
            layout.REC_COLD_START,
        ),
    )


def _fmt(r: dict) -> str:
    return (
        f"{r['what']} @{r['concurrency']}: {r['qps']:.0f} q/s, p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms, failures {r['failures']}, load {r['loadavg'][0]:.1f}"
    )


# ----------------------------------------------------------------------------- the run


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every row for every size; write bench.json/.png/.html; return the result."""

    unknown = set(cfg.rows) - set(ROWS)
    if unknown:
        raise ValueError(f"rows: unknown {sorted(unknown)}; expected some of {', '.join(ROWS)}")
    bad_modes = set(cfg.retrieval_modes) - (set(MODES) - {"auto"})
    if bad_modes:
        raise ValueError(
            f"retrieval_modes: unknown {sorted(bad_modes)}; expected some of exact, int8, hnsw, ivf"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    result = {
        "label": cfg.label,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "config": config_mod.to_dict(cfg),
        "loadavg_start": list(os.getloadavg()),
        "weights": "trained run" if cfg.run else "untrained (random init): throughput only",
        "sizes": [],
    }
    if cfg.run:
        repos = [catalogue.from_existing(cfg.run, cfg.repo or "model_repository")]
    else:
        shape = (
            catalogue.TINY_SHAPE
            if cfg.tiny
            else catalogue.CatalogueShape(
                n_users=cfg.n_users, tower=cfg.tower, history_len=cfg.history_len
            )
        )
        shape = dataclasses.replace(shape, item_clusters=cfg.item_clusters)
        repos = [
            catalogue.build(dataclasses.replace(shape, n_items=n), cfg.cache) for n in cfg.items
        ]
    for br in repos:
        t0 = time.perf_counter()
        rows = bench_size(br, cfg, out)
        if cfg.retrieval_modes:
            rows += bench_modes(br, cfg, out)
        result["sizes"].append(
            {
                "n_items": br.shape.n_items,
                "graph_k": br.graph_k,
                "trained": br.trained,
                "seconds": time.perf_counter() - t0,
                "rows": rows,
                "checks": report.checks(rows),
            }
        )
    result["loadavg_end"] = list(os.getloadavg())
    result["seconds"] = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    report.plot(result, out / "bench.png")
    report.write_html(result, out / "bench.html", out / "bench.png")
    return result
