"""`northstar feedback bench --engine ray`: the distributed join beside the local one.

    northstar feedback bench --engine ray [--impressions 1000000] [--out ray-bench.json]

Writes a lake (feedback.lake) of `impressions` impression rows (requests of k items over
2 h) and their clicks, then joins it (every window closed) three ways into fresh folders:
the local join (`feedback.join.run_join`, one process) and the Ray join
(`feedback.engine_ray`) on a local Ray cluster of 1 and of 2 worker CPUs. It reports
rows per second per worker, the peak resident memory of each worker process, whether
the Ray labels equal the local ones row by row, and the workers a day of 10 billion
impression rows would need at the measured rate. It prints, never asserts: figures vary
with the machine's load, and tests do not time things.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import ray

from feedback.bench import synthetic_log
from feedback.engine_ray import read_worker_peaks, run_join_ray
from feedback.join import JoinConfig, read_labels, read_statuses, run_join
from feedback.lake import ParquetLake

# The scale: 1e9 requests a day, 10 items each.
DAY_ROWS = 10_000_000_000
DAY_S = 86_400.0


def workers_per_day(rows_per_s_per_worker: float, rows_per_day: float = DAY_ROWS) -> int:
    """Workers that join `rows_per_day` within the day at the given rate per worker."""
    return math.ceil(rows_per_day / (rows_per_s_per_worker * DAY_S))


@dataclass(frozen=True)
class RayBenchConfig:
    impressions: int = 1_000_000  # impression rows; clicks come on top (click_rate)
    k: int = 10  # items per request
    click_rate: float = 0.05
    buckets: int = 16  # user-hash buckets of the lake: tasks per run
    workers: tuple[int, ...] = (1, 2)  # local cluster sizes (CPUs, so concurrent tasks)
    compare: bool = True  # check the Ray labels equal the local ones, row by row
    seed: int = 0
    dir: str | None = None  # default: a temp folder, removed afterwards


def write_lake(root: Path, cfg: RayBenchConfig) -> dict:
    """Requests over 2 h with clicks (some late, 30% without a request id), in commits of
    50k requests, as a log-writer consumer would commit them."""
    n_req = cfg.impressions // cfg.k
    lake = ParquetLake(root, buckets=cfg.buckets)
    t = time.perf_counter()
    clicks = synthetic_log(
        lake,
        impressions=cfg.impressions,
        k=cfg.k,
        click_rate=cfg.click_rate,
        seed=cfg.seed,
        step=50_000,
    )
    lake.close()
    return {
        "impressions": n_req * cfg.k,
        "clicks": clicks,
        "commits": lake.last_seq(),
        "write_seconds": time.perf_counter() - t,
    }


def _same(a: Path, b: Path) -> bool:
    la = read_labels(a).sort_values("event_id").reset_index(drop=True)
    lb = read_labels(b).sort_values("event_id").reset_index(drop=True)
    sa = read_statuses(a).sort_values("event_id").reset_index(drop=True)
    sb = read_statuses(b).sort_values("event_id").reset_index(drop=True)
    try:
        pd.testing.assert_frame_equal(la, lb)
        pd.testing.assert_frame_equal(sa, sb)
    except AssertionError:
        return False
    return True


def run_ray_bench(cfg: RayBenchConfig) -> dict:
    root = Path(cfg.dir) if cfg.dir else Path(tempfile.mkdtemp(prefix="ray-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        data = write_lake(root / "lake", cfg)
        rows = data["impressions"] + data["clicks"]
        join = JoinConfig(log=str(root / "lake"), out=str(root / "local"), as_of=math.inf)
        local = run_join(join)
        res: dict = {
            "config": asdict(cfg),
            "data": data,
            "rows": rows,
            "local": {
                "seconds": local.seconds,
                "rows_per_s": rows / local.seconds,
                "labels": local.labels_written,
                "statuses": local.statuses,
            },
            "ray": [],
        }
        for w in cfg.workers:
            t = time.perf_counter()
            ray.init(num_cpus=w, include_dashboard=False, logging_level=logging.WARNING)
            start_s = time.perf_counter() - t
            try:
                out = root / f"ray-{w}"
                rep = run_join_ray(JoinConfig(log=str(root / "lake"), out=str(out), as_of=math.inf))
            finally:
                ray.shutdown()
            peaks = read_worker_peaks(out)
            rate = rows / rep.seconds / w
            imp_rate = data["impressions"] / rep.seconds / w
            res["ray"].append(
                {
                    "workers": w,
                    "cluster_start_seconds": start_s,
                    "seconds": rep.seconds,
                    "rows_per_s": rows / rep.seconds,
                    "rows_per_s_per_worker": rate,
                    "impressions_per_s_per_worker": imp_rate,
                    "peak_rss_bytes_per_worker": max(peaks.values(), default=0),
                    "worker_processes": len(peaks),
                    "labels": rep.labels_written,
                    "same_labels_as_local": _same(root / "local", out) if cfg.compare else None,
                    # A day of DAY_ROWS impression rows, joined within the day.
                    "workers_per_day_10b": workers_per_day(imp_rate),
                }
            )
        res["local"]["workers_per_day_10b"] = workers_per_day(data["impressions"] / local.seconds)
        return res
    finally:
        if not cfg.dir:
            shutil.rmtree(root, ignore_errors=True)


def format_ray_bench(res: dict) -> str:
    d, loc = res["data"], res["local"]
    lines = [
        f"lake: {d['impressions']:,} impressions + {d['clicks']:,} clicks in "
        f"{d['commits']} commits, {res['config']['buckets']} buckets "
        f"(written in {d['write_seconds']:.1f} s)",
        "",
        "| engine | workers | join s | rows/s | rows/s per worker | peak RSS per worker "
        "| same labels | workers for 10B rows/day | vs local per worker |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| local (one process) | 1 | {loc['seconds']:.1f} | {loc['rows_per_s']:,.0f} "
        f"| {loc['rows_per_s']:,.0f} | – | – | {loc['workers_per_day_10b']:,} | 1.00 |",
    ]
    for r in res["ray"]:
        lines.append(
            f"| ray | {r['workers']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} "
            f"| {r['rows_per_s_per_worker']:,.0f} "
            f"| {r['peak_rss_bytes_per_worker'] / 2**20:,.0f} MiB "
            f"| {'yes' if r['same_labels_as_local'] else 'NO'} "
            f"| {r['workers_per_day_10b']:,} "
            f"| {r['rows_per_s_per_worker'] / loc['rows_per_s']:.2f} |"
        )
    return "\n".join(lines)


def render_results(paths: list[str | Path]) -> str:
    """The results page's tables, one per saved `--out` JSON, in the order given."""
    parts = []
    for path in paths:
        res = json.loads(Path(path).read_text())
        parts.append(f"`{Path(path).name}`:\n\n{format_ray_bench(res)}")
    return "\n\n".join(parts) + "\n"


def main_ray(cfg: RayBenchConfig, out: str | None = None) -> dict:
    res = run_ray_bench(cfg)
    print(format_ray_bench(res))
    if out:
        Path(out).write_text(json.dumps(res, indent=1, default=str))
    return res
