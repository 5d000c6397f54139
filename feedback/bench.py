"""Measure the two feedback figures: ingest rate into the embedded log, and join time.

    northstar feedback bench [--events 1000000] [--impressions 1000000] [--dir DIR]

Targets (feedback/README.md): ingest >= 50k events/s with batched appends; the join of 1M
impressions with their clicks < 20 s. Figures vary with machine load, so the script prints
what it measured and the targets side by side and never asserts; tests do not time things.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.redis_server import RedisServer
from feedback.consume import ConsumerConfig, LogWriter, StreamConsumer, run_log_writer
from feedback.ids import uuid7_batch
from feedback.join import JoinConfig, run_join
from feedback.lag import stream_lag
from feedback.sink import SqliteEventLog, impression_rows, open_sink
from feedback.stream import StreamConfig, StreamSink, connect

INGEST_TARGET_EPS = 50_000
JOIN_TARGET_S = 20.0


@dataclass(frozen=True)
class IngestBenchConfig:
    events: int = 1_000_000  # interactions appended in the ingest figure
    batch: int = 5_000  # rows per append: one dynamic batch of a busy ingest model
    small_batch: int = 500  # a quieter server's batches: more commits (fsyncs) per event
    random_ids: int = 300_000  # events for the UUIDv4 (random id) comparison; 0 = skip
    writers: int = 4  # processes for the concurrent-writer figure; 0 = skip
    impressions: int = 1_000_000  # impressions in the join figure
    k: int = 10  # items per request in the join figure
    click_rate: float = 0.05
    seed: int = 0
    dir: str | None = None  # default: a temp folder, removed afterwards


def _interaction_batch(rng: np.random.Generator, n: int, ts: float, ids: np.ndarray) -> dict:
    return {
        "event_id": ids,
        "user_id": rng.integers(1, 100_000, n),
        "item_id": rng.integers(1, 10_000, n),
        "type": np.full(n, "click", dtype=object),
        "value": np.ones(n),
        "ts": np.full(n, ts),
        "request_id": np.full(n, "", dtype=object),
    }


def bench_ingest(path: Path, *, events: int, batch: int, random_ids: bool, seed: int) -> dict:
    """Append `events` interactions in batches; rate over the whole run (log grows)."""
    rng = np.random.default_rng(seed)
    now = time.time()
    elapsed = 0.0
    t_start = time.time()
    with open_sink(path) as sink:
        for start in range(0, events, batch):
            n = min(batch, events - start)
            if random_ids:
                ids = np.asarray([str(uuid.uuid4()) for _ in range(n)], dtype=object)
            else:
                ids = uuid7_batch(n, rng=rng)
            rows = _interaction_batch(rng, n, now, ids)
            t = time.perf_counter()
            res = sink.write_interactions(rows)
            elapsed += time.perf_counter() - t
            assert res.inserted == n, res
    return {
        "events": events,
        "batch": batch,
        "seconds": elapsed,
        "events_per_s": events / elapsed,
        "ids": "uuid4 (random)" if random_ids else "uuid7 (time-ordered)",
        "t_start": t_start,
        "t_end": time.time(),
    }


def _writer(path: str, events: int, batch: int, seed: int, q: mp.Queue) -> None:
    q.put(bench_ingest(Path(path), events=events, batch=batch, random_ids=False, seed=seed))


def bench_concurrent(path: Path, *, writers: int, events: int, batch: int) -> dict:
    """`writers` processes append to one log at once (Triton instances + ingest)."""
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    per = events // writers
    open_sink(path).close()  # create the schema once, before the race
    procs = [
        ctx.Process(target=_writer, args=(str(path), per, batch, 100 + i, q))
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    # From the first write to the last ack: process start-up (imports) is not ingest.
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    with open_sink(path) as s:
        stored = s.count("interaction")
    return {
        "writers": writers,
        "events": per * writers,
        "stored": stored,
        "seconds": wall,
        "events_per_s": per * writers / wall,
        "per_writer_events_per_s": [round(r["events_per_s"]) for r in results],
    }


def synthetic_log(
    sink, *, impressions: int, k: int, click_rate: float, seed: int, step: int
) -> int:
    """Write `impressions` (requests of k items over 2 h) and their clicks into `sink`
    (the SQLite log or a Parquet lake), `step` requests a write; returns the clicks.

    Some clicks land after the attribution window (lognormal delays), and 30% carry no
    request id, so the join attributes them by (user, item)."""
    rng = np.random.default_rng(seed)
    n_req = impressions // k
    req_ts = np.sort(1_750_000_000.0 + rng.uniform(0, 7200, n_req))
    users = rng.integers(1, 200_000, n_req)
    request_ids = uuid7_batch(n_req, ts=req_ts, rng=rng)
    items = rng.integers(1, 20_000, (n_req, k))
    clicks = 0
    for s in range(0, n_req, step):
        sl = slice(s, s + step)
        sink.write_impressions(
            impression_rows(
                request_ids=request_ids[sl],
                user_ids=users[sl],
                item_ids=items[sl],
                scores=rng.random(items[sl].shape),
                model_version=1,
                propensity=np.ones(items[sl].shape),
                ts=req_ts[sl],
            )
        )
        r, p = np.nonzero(rng.random(items[sl].shape) < click_rate)  # (b, k) clicked
        n = len(r)
        ts = req_ts[sl][r] + rng.lognormal(np.log(120), 1.5, n)
        keep_req = rng.random(n) < 0.7
        sink.write_interactions(
            {
                "event_id": uuid7_batch(n, ts=ts, rng=rng),
                "user_id": users[sl][r],
                "item_id": items[sl][r, p],
                "type": np.full(n, "click", dtype=object),
                "value": np.ones(n),
                "ts": ts,
                "request_id": np.where(keep_req, request_ids[sl][r], "").astype(object),
            }
        )
        clicks += n
    return clicks


def bench_join(root: Path, *, impressions: int, k: int, click_rate: float, seed: int) -> dict:
    """Log `impressions` (requests of k items over 2 h) and their clicks, then join them."""
    log = root / "join-events.db"
    n_req = impressions // k
    t = time.perf_counter()
    with open_sink(log) as sink:
        clicks = synthetic_log(
            sink, impressions=impressions, k=k, click_rate=click_rate, seed=seed, step=5_000
        )
    load_s = time.perf_counter() - t
    out = root / "labels"
    rep = run_join(JoinConfig(log=str(log), out=str(out), window_s=1800, as_of=float("inf")))
    rerun = run_join(JoinConfig(log=str(log), out=str(out), window_s=1800, as_of=float("inf")))
    return {
        "impressions": n_req * k,
        "clicks": clicks,
        "load_seconds": load_s,
        "join_seconds": rep.seconds,
        "labels": rep.labels_written,
        "statuses": rep.statuses,
        "rerun_noop": rerun.noop,
        "rerun_seconds": rerun.seconds,
    }


def run_bench(cfg: IngestBenchConfig) -> dict:
    root = Path(cfg.dir) if cfg.dir else Path(tempfile.mkdtemp(prefix="northstar-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        res: dict = {"config": asdict(cfg)}
        res["ingest"] = bench_ingest(
            root / "ingest.db", events=cfg.events, batch=cfg.batch, random_ids=False, seed=cfg.seed
        )
        if cfg.small_batch:
            res["ingest_small_batch"] = bench_ingest(
                root / "ingest-small.db",
                events=min(cfg.events, 200_000),
                batch=cfg.small_batch,
                random_ids=False,
                seed=cfg.seed,
            )
        if cfg.random_ids:
            res["ingest_random_ids"] = bench_ingest(
                root / "ingest-random.db",
                events=cfg.random_ids,
                batch=cfg.batch,
                random_ids=True,
                seed=cfg.seed,
            )
        if cfg.writers:
            res["ingest_concurrent"] = bench_concurrent(
                root / "ingest-concurrent.db",
                writers=cfg.writers,
                events=min(cfg.events, 400_000),
                batch=cfg.batch,
            )
        if cfg.impressions:
            res["join"] = bench_join(
                root, impressions=cfg.impressions, k=cfg.k, click_rate=cfg.click_rate, seed=cfg.seed
            )
        return res
    finally:
        if not cfg.dir:
            shutil.rmtree(root, ignore_errors=True)


def format_bench(res: dict) -> str:
    lines = ["figure                                   measured        target"]
    ing = res["ingest"]
    lines.append(
        f"ingest, {ing['ids']:<24} {ing['events_per_s']:>10,.0f} ev/s   "
        f">= {INGEST_TARGET_EPS:,} ev/s  ({ing['events']:,} events, batch {ing['batch']})"
    )
    if "ingest_small_batch" in res:
        r = res["ingest_small_batch"]
        lines.append(
            f"ingest, batch {r['batch']:<18} {r['events_per_s']:>10,.0f} ev/s   "
            f"(comparison; {r['events']:,} events)"
        )
    if "ingest_random_ids" in res:
        r = res["ingest_random_ids"]
        lines.append(
            f"ingest, {r['ids']:<24} {r['events_per_s']:>10,.0f} ev/s   "
            f"(comparison; {r['events']:,} events)"
        )
    if "ingest_concurrent" in res:
        c = res["ingest_concurrent"]
        lines.append(
            f"ingest, {c['writers']} writer processes       "
            f"{c['events_per_s']:>10,.0f} ev/s   (all {c['stored']:,} stored once)"
        )
    if "join" in res:
        j = res["join"]
        lines.append(
            f"join {j['impressions']:,} impressions + {j['clicks']:,} clicks "
            f"{j['join_seconds']:>6.1f} s      < {JOIN_TARGET_S:.0f} s"
        )
        lines.append(
            f"join re-run (nothing new)             {j['rerun_seconds']:>6.2f} s      "
            f"noop={j['rerun_noop']}"
        )
    return "\n".join(lines)


def main(cfg: IngestBenchConfig, out: str | None = None) -> dict:
    res = run_bench(cfg)
    print(format_bench(res))
    if out:
        Path(out).write_text(json.dumps(res, indent=1, default=str))
    return res


# ---------------------------------------------------------------------------- Redis Stream


@dataclass(frozen=True)
class StreamBenchConfig:
    """`northstar feedback bench --stream`: the Redis Stream path (feedback/stream.py)."""

    events: int = 1_000_000  # interactions appended in the ingest figure
    batch: int = 5_000  # rows per write call (one entry per partition touched)
    partitions: int = 4
    rate: float = 20_000.0  # events/s offered in the fixed-rate figure
    seconds: float = 20.0  # length of the fixed-rate figure
    url: str | None = None  # default: a redis-server (appendfsync always) in a temp dir
    dir: str | None = None  # default: a temp folder, removed afterwards
    seed: int = 0


def _stream_consumer_proc(url: str, log: str, stop, ready) -> None:

    ready.set()
    run_log_writer(
        StreamConfig.from_url(url),
        ConsumerConfig(consumer="bench", progress_every_s=0, trim_every_s=1.0),
        log,
        stop=_MpStop(stop),
    )


class _MpStop:
    """A multiprocessing.Event with threading.Event's is_set/wait (what run() calls)."""

    def __init__(self, ev) -> None:
        self.ev = ev

    def is_set(self) -> bool:
        return self.ev.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.ev.wait(timeout)


def run_stream_bench(cfg: StreamBenchConfig) -> dict:
    """Three figures: produce rate (XADD acked, fsync'd), drain rate of a backlog by the
    log writer, and lag while a consumer process keeps up with a fixed offered rate."""
    root = Path(cfg.dir) if cfg.dir else Path(tempfile.mkdtemp(prefix="northstar-sbench-"))
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if not cfg.dir:
            stack.callback(shutil.rmtree, root, True)
        base = cfg.url or stack.enter_context(RedisServer(root / "redis")).url
        res: dict = {"config": asdict(cfg)}
        rng = np.random.default_rng(cfg.seed)

        # 1. ingest: write calls of `batch` interactions, each acknowledged by EXEC.
        url = f"{base}?prefix=bench-ingest-{uuid.uuid4().hex[:8]}&partitions={cfg.partitions}"
        scfg = StreamConfig.from_url(url)
        sink = StreamSink(scfg)
        now = time.time()
        elapsed = 0.0
        for start in range(0, cfg.events, cfg.batch):
            n = min(cfg.batch, cfg.events - start)
            rows = _interaction_batch(rng, n, now, uuid7_batch(n, rng=rng))
            t = time.perf_counter()
            r = sink.write_interactions(rows)
            elapsed += time.perf_counter() - t
            assert r.inserted == n, r
        sink.close()
        res["ingest"] = {
            "events": cfg.events,
            "batch": cfg.batch,
            "partitions": cfg.partitions,
            "seconds": elapsed,
            "events_per_s": cfg.events / elapsed,
        }

        # 2. drain: the log writer empties that backlog into SQLite (in-process).
        log = SqliteEventLog(root / "drain.db")
        consumer = StreamConsumer(
            scfg, ConsumerConfig(consumer="drain", progress_every_s=0), LogWriter(log)
        )
        t = time.perf_counter()
        stats = consumer.run(until_idle=True)
        drain_s = time.perf_counter() - t
        res["drain"] = {
            "events": stats.events,
            "stored": log.count("interaction"),
            "seconds": drain_s,
            "events_per_s": stats.events / drain_s,
            "trimmed_entries": stats.trimmed,
        }
        consumer.close()
        log.close()

        # 3. fixed rate: a consumer process keeps up while this one offers `rate` ev/s.
        url = f"{base}?prefix=bench-rate-{uuid.uuid4().hex[:8]}&partitions={cfg.partitions}"
        scfg = StreamConfig.from_url(url)
        ctx = mp.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Event()
        sink = StreamSink(scfg)
        client = connect(scfg)
        proc = ctx.Process(
            target=_stream_consumer_proc, args=(url, str(root / "rate.db"), stop, ready)
        )
        proc.start()
        ready.wait(120)
        tick = 0.1
        per_tick = max(1, int(cfg.rate * tick))
        behind: list[int] = []
        age: list[float] = []
        sent = 0
        t0 = time.monotonic()
        next_t = t0
        while time.monotonic() - t0 < cfg.seconds:
            if len(behind) < (time.monotonic() - t0) / 0.5:
                # Sampled just before the next write: what the consumer has not caught up
                # with one tick (0.1 s) after the previous write.
                lag = [g for g in stream_lag(client, scfg) if g.group == "log"]
                behind.append(sum(g.events_behind for g in lag))
                age.append(max((g.oldest_unacked_age_s for g in lag), default=0.0))
            rows = _interaction_batch(rng, per_tick, time.time(), uuid7_batch(per_tick, rng=rng))
            sink.write_interactions(rows)
            sent += per_tick
            next_t += tick
            time.sleep(max(0.0, next_t - time.monotonic()))
        offered_s = time.monotonic() - t0
        t_end = time.monotonic()
        while time.monotonic() - t_end < 120:  # a bound on a hang
            if sum(g.events_behind for g in stream_lag(client, scfg) if g.group == "log") == 0:
                break
            time.sleep(0.05)
        catch_up_s = time.monotonic() - t_end
        stop.set()
        proc.join(60)
        sink.close()
        client.close()
        with SqliteEventLog(root / "rate.db") as rate_log:
            stored = rate_log.count("interaction")
        res["rate"] = {
            "offered_events_per_s": sent / offered_s,
            "events": sent,
            "stored": stored,
            "lag_events_p50": float(np.median(behind)) if behind else 0.0,
            "lag_events_max": max(behind, default=0),
            "oldest_unacked_s_p50": float(np.median(age)) if age else 0.0,
            "oldest_unacked_s_max": max(age, default=0.0),
            "catch_up_s": catch_up_s,
        }
        return res


def format_stream_bench(res: dict) -> str:
    i, d, r = res["ingest"], res["drain"], res["rate"]
    return "\n".join(
        [
            "figure                                        measured        target",
            f"stream ingest (XADD acked, fsync), batch {i['batch']:<5} {i['events_per_s']:>10,.0f} "
            f"ev/s   >= {INGEST_TARGET_EPS:,} ev/s  ({i['events']:,} events, "
            f"{i['partitions']} partitions)",
            f"log writer drain of that backlog              {d['events_per_s']:>10,.0f} ev/s   "
            f"({d['stored']:,} stored once)",
            f"fixed rate offered                            {r['offered_events_per_s']:>10,.0f} "
            f"ev/s   ({r['events']:,} events, {r['stored']:,} stored)",
            f"  lag (events behind) p50 / max               {r['lag_events_p50']:>10,.0f} / "
            f"{r['lag_events_max']:,}",
            f"  oldest unacked age p50 / max                {r['oldest_unacked_s_p50']:>10.2f} / "
            f"{r['oldest_unacked_s_max']:.2f} s",
            f"  caught up after the producer stopped        {r['catch_up_s']:>10.2f} s",
        ]
    )


def main_stream(cfg: StreamBenchConfig, out: str | None = None) -> dict:
    res = run_stream_bench(cfg)
    print(format_stream_bench(res))
    if out:
        Path(out).write_text(json.dumps(res, indent=1, default=str))
    return res
