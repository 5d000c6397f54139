"""The label join on Ray Data: the same labels as `feedback.join`, one task per user bucket.

Why Ray Data and not Spark: Ray is already a dependency (the Ray Serve peer), so the
join needs no JVM, no second cluster manager and no second image; and the join's rules
live in pandas code (`feedback.join.join_step`) that a Ray task runs as it is, where
Spark would run them through a pandas UDF with Arrow conversions both ways.

**What is split, and why nothing crosses buckets.** The lake (feedback.lake) already
stores events partitioned by user-hash bucket. One user's impressions, interactions and
pending labels are all in one bucket, and every match the join makes is within a user
(by (user, item), or by request id, which belongs to one user). So the driver lists the
run's new files per bucket from the commit records, and one task per bucket reads only
its own files and its own pending labels and runs `join_step`. No shuffle: Ray Data maps
a dataset of one row per bucket (`groupby().map_groups()` would re-partition the rows
over the network to build groups the files already are).

**What stays global, and is computed once by the driver**: the cursor (the last commit
read), the watermark (the largest event ts; the commit records carry each file's max
ts, so no data is read for it), the run number and the totals. The driver commits the
state last, as `feedback.join.run_join` does.

**The rules are `feedback.join`'s.** Attribution, finality, watermark, late and
unattributed statuses are `join_step` and `_finalized`, called per bucket. Two places
look past one bucket:

- *user_mismatch*: an interaction carrying another user's request id. That impression
  is in another bucket. A task whose interaction carries a request id found neither in
  its own bucket nor in the written labels looks it up in the other buckets' new
  impression files and pending labels of this run (a filtered read of the request_id
  column, only for such interactions, which are rare). Found, it is a user_mismatch as
  in the single-process join.
- *late lookback*: labels written earlier are searched from the earliest unplaced
  interaction minus the lookback. Per bucket, "earliest" is the bucket's own, so an
  interaction whose impression is older than the lookback can be classified late here
  and unattributed in the single-process join (or the reverse) when the two earliest
  differ across a day boundary. Inside the lookback both agree.

**Idempotent and crash-safe.** Run r writes `part-{r:08d}-b{bucket:04d}.parquet` (each
atomically) and `_state/pending-{r:08d}-b{bucket:04d}.parquet`. A task retried after
its worker died rewrites the same names. A run that fails removes nothing and commits
nothing; the next attempt (the same r) deletes run r's leftovers first. So a worker
killed mid-run never duplicates a label. The output layout is `feedback.join`'s, so
`read_labels`, `feedback metrics` and `feedback positives` read it unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from common.files import atomic_write_text
from feedback.events import IMPRESSION, INTERACTION
from feedback.join import (
    LABEL_SCHEMA,
    LOCK_FILE,
    STATE_DIR,
    STATE_FILE,
    STATUS_DIR,
    STATUS_SCHEMA,
    JoinConfig,
    JoinReport,
    _empty_impressions,
    _exclusive,
    _finalized,
    _nanmax,
    _write_partitioned,
    _write_table,
    join_step,
    new_labels,
)
from feedback.lake import ParquetLake, is_lake

log = logging.getLogger(__name__)

ENGINE = "ray"
_FORMAT = "ray-1"  # not feedback.join's format: a folder is joined by one engine only
# Test hook: a folder. Each bucket task drops `started-b{bucket}-{pid}` there, then waits
# while `hold` exists, so a test can kill a worker while tasks are running.
HOLD_ENV = "NORTHSTAR_RAY_JOIN_HOLD"
HOLD_MAX_S = 120.0
# Columns of an impression/label read to explain another bucket's request id.
_LOOKUP = ["event_id", "request_id", "user_id", "item_id", "position", "impression_ts"]


def run_join_ray(
    cfg: JoinConfig,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    node_ip: str | None = None,
) -> JoinReport:
    """One incremental pass over the lake's new commits, one Ray task per user bucket.

    `address`: a running cluster (`ray start --head` prints it). None: the cluster this
    process is connected to, else $RAY_ADDRESS (set for a `ray job submit` entrypoint),
    else a local one with `num_cpus`. `node_ip`: this driver's address on the cluster's
    network, where Ray's guess is wrong (a host with several addresses).
    """
    if not is_lake(cfg.log):
        raise ValueError(f"{cfg.log}: the ray engine reads a Parquet lake (a folder or URL)")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with _exclusive(out / STATE_DIR / LOCK_FILE):
        state = _load_state(out, cfg)
        run = state["run"] + 1
        lake = ParquetLake(cfg.log)
        commits = lake.commits(after=state["cursor"])
        snap = commits[-1]["seq"] if commits else state["cursor"]
        files = [f for rec in commits for f in rec["files"]]
        n_imps = sum(f["rows"] for f in files if f["kind"] == IMPRESSION)
        n_inter = sum(f["rows"] for f in files if f["kind"] == INTERACTION)
        max_ts = _nanmax(state["max_event_ts"], max((f["max_ts"] for f in files), default=None))
        watermark = max_ts if cfg.as_of is None else cfg.as_of
        watermark = _nanmax(state["watermark"], watermark)
        report = JoinReport(
            run=run,
            new_impressions=n_imps,
            new_interactions=n_inter,
            watermark=watermark,
            totals=dict(state["totals"]),
        )
        if not files and watermark == state["watermark"]:
            report.noop, report.pending = True, state["pending_count"]
            report.seconds = time.perf_counter() - t0
            return report

        _remove_run_files(out, run)
        pending = {int(b): f for b, f in state["pending_files"].items()}
        buckets = sorted({f["bucket"] for f in files} | set(pending))
        tasks = [
            {
                "bucket": b,
                "job": json.dumps(
                    {
                        "impressions": [
                            f["path"] for f in files if f["bucket"] == b and f["kind"] == IMPRESSION
                        ],
                        "interactions": [
                            f["path"]
                            for f in files
                            if f["bucket"] == b and f["kind"] == INTERACTION
                        ],
                        "pending": pending.get(b),
                    }
                ),
            }
            for b in buckets
        ]
        shared = {
            "lake_url": lake.url,
            "out": str(out),
            "run": run,
            "window_s": cfg.window_s,
            "watermark": watermark,
            "lookback_s": cfg.late_lookback_s,
            # For the cross-bucket request-id lookup: every bucket's new impressions
            # and pending labels of this run (paths only).
            "all_impressions": [(f["bucket"], f["path"]) for f in files if f["kind"] == IMPRESSION],
            "all_pending": sorted(pending.items()),
            "hold": os.environ.get(HOLD_ENV, ""),
        }
        results = _run_tasks(tasks, shared, address=address, num_cpus=num_cpus, node_ip=node_ip)

        pending_files = {}
        statuses: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for r in results:
            if r["pending_file"]:
                pending_files[str(r["bucket"])] = r["pending_file"]
            report.labels_written += r["labels"]
            report.positives_written += r["positives"]
            report.pending += r["pending"]
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
            for k, v in r["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        report.statuses, report.reasons = statuses, reasons
        totals = report.totals
        for key, n in [
            ("impressions", n_imps),
            ("interactions", n_inter),
            ("labels", report.labels_written),
            ("positives", report.positives_written),
            *statuses.items(),
            *((f"reason:{k}", v) for k, v in reasons.items()),
        ]:
            totals[key] = int(totals.get(key, 0) + n)
        new_state = {
            **state,
            "run": run,
            "cursor": int(snap),
            "watermark": watermark,
            "max_event_ts": max_ts,
            "pending_files": pending_files,
            "pending_count": report.pending,
            "totals": totals,
            "workers": _worker_peaks(state.get("workers", {}), results),
        }
        atomic_write_text(out / STATE_DIR / STATE_FILE, json.dumps(new_state, indent=1))
        keep = set(pending_files.values())
        for f in (out / STATE_DIR).glob("pending-*.parquet"):  # superseded by the commit
            if f.name not in keep:
                f.unlink(missing_ok=True)
        report.seconds = time.perf_counter() - t0
        return report


def _run_tasks(
    tasks: list[dict],
    shared: dict,
    *,
    address: str | None,
    num_cpus: int | None,
    node_ip: str | None,
) -> list[dict]:
    started = not ray.is_initialized()
    if started and (address or os.environ.get("RAY_ADDRESS")):
        # A running cluster: the address given, or the one `ray job submit` sets.
        ray.init(
            address=address,
            _node_ip_address=node_ip,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    elif started:
        # A local cluster for this process's lifetime; the dashboard serves nothing here.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
            join_bucket,
            fn_kwargs=shared,
            # One CPU per bucket task. A task whose worker died is run again elsewhere
            # (Ray's default: 3 retries on system failure); its files have fixed names,
            # so the retry overwrites what the dead attempt wrote.
            num_cpus=1,
        )
        return [json.loads(r["result"]) for r in ds.take_all()]
    finally:
        if started:
            ray.shutdown()


def join_bucket(
    row: dict,
    *,
    lake_url: str,
    out: str,
    run: int,
    window_s: float,
    watermark: float,
    lookback_s: float,
    all_impressions: list,
    all_pending: list,
    hold: str,
) -> dict:
    """One bucket's share of a run, on a Ray worker: read, `join_step`, write; counts back."""
    bucket, job = int(row["bucket"]), json.loads(row["job"])
    if hold:
        _wait_while_held(Path(hold), bucket)
    outp = Path(out)
    lake = ParquetLake(lake_url)
    imps = lake.read_files(IMPRESSION, job["impressions"])
    inter = lake.read_files(INTERACTION, job["interactions"])
    pending = _read_pending(outp, job["pending"])

    def finalized(x: pd.DataFrame) -> pd.DataFrame | None:
        fin = _finalized(outp, x, lookback_s)
        reqs = set(x["request_id"][x["request_id"] != ""])
        if fin is not None:
            reqs -= set(fin["request_id"])
        reqs -= set(imps["request_id"]) | set(pending["request_id"])
        if not reqs:
            return fin
        other = _other_buckets(lake, outp, bucket, reqs, all_impressions, all_pending)
        frames = [f for f in (fin, other) if f is not None and len(f)]
        return pd.concat(frames, ignore_index=True) if frames else None

    done, still, status = join_step(
        pending, imps, inter, window_s=window_s, watermark=watermark, finalized=finalized
    )
    suffix = f"-b{bucket:04d}"
    _write_partitioned(outp, done, "impression_ts", LABEL_SCHEMA, run, suffix)
    _write_partitioned(outp / STATUS_DIR, status, "ts", STATUS_SCHEMA, run, suffix)
    pending_file = None
    if len(still):
        pending_file = f"pending-{run:08d}{suffix}.parquet"
        _write_table(outp / STATE_DIR / pending_file, still, LABEL_SCHEMA)
    result = {
        "bucket": bucket,
        "pending_file": pending_file,
        "labels": len(done),
        "positives": int(done["clicked"].sum()) if len(done) else 0,
        "pending": len(still),
        "statuses": status["status"].value_counts().to_dict() if len(status) else {},
        "reasons": status["reason"].value_counts().to_dict() if len(status) else {},
        "rows": len(imps) + len(inter),
        "worker": f"{ray.get_runtime_context().get_node_id()[:8]}/{os.getpid()}",
        # Linux reports ru_maxrss in KiB: the worker process's peak so far.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return {"result": json.dumps(result)}


def _read_pending(out: Path, name: str | None) -> pd.DataFrame:
    if not name:
        return new_labels(_empty_impressions())
    return pq.read_table(out / STATE_DIR / name).to_pandas().astype({"event_type": object})


def _other_buckets(
    lake: ParquetLake,
    out: Path,
    bucket: int,
    reqs: set[str],
    all_impressions: list,
    all_pending: list,
) -> pd.DataFrame | None:
    """Impressions of other buckets (new this run, or pending) that carry `reqs`."""
    want = pa.array(sorted(reqs), pa.string())
    tables = []
    for b, path in all_impressions:
        if int(b) != bucket:
            t = lake.read_file(
                path, columns=["request_id", "event_id", "user_id", "item_id", "position", "ts"]
            )
            t = t.filter(pc.is_in(t["request_id"], value_set=want))
            tables.append(
                t.rename_columns([c if c != "ts" else "impression_ts" for c in t.column_names])
            )
    for b, name in all_pending:
        if int(b) != bucket:
            t = pq.read_table(out / STATE_DIR / name, columns=_LOOKUP)
            tables.append(t.filter(pc.is_in(t["request_id"], value_set=want)))
    tables = [t.select(_LOOKUP) for t in tables if t.num_rows]
    return pa.concat_tables(tables).to_pandas() if tables else None


def _wait_while_held(hold: Path, bucket: int) -> None:
    (hold / f"started-b{bucket:04d}-{os.getpid()}").touch()
    deadline = time.monotonic() + HOLD_MAX_S
    while (hold / "hold").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _worker_peaks(before: dict, results: list[dict]) -> dict:
    peaks = dict(before)
    for r in results:
        peaks[r["worker"]] = max(peaks.get(r["worker"], 0), r["peak_rss_bytes"])
    return peaks


def _load_state(out: Path, cfg: JoinConfig) -> dict:
    path = out / STATE_DIR / STATE_FILE
    if not path.exists():
        return {
            "format": _FORMAT,
            "engine": ENGINE,
            "log": str(cfg.log),
            "window_s": cfg.window_s,
            "run": 0,
            "cursor": 0,
            "watermark": None,
            "max_event_ts": None,
            "pending_files": {},
            "pending_count": 0,
            "totals": {},
        }
    state = json.loads(path.read_text())
    if state.get("format") != _FORMAT:
        raise ValueError(
            f"{path}: written by another engine (format {state.get('format')!r}); "
            "a labels folder is joined by one engine only: use a fresh --out"
        )
    if state["window_s"] != cfg.window_s:
        raise ValueError(
            f"{path}: these labels were built with window_s={state['window_s']}, not "
            f"{cfg.window_s}; a window change needs a fresh --out (labels would mix windows)"
        )
    return state


def _remove_run_files(out: Path, run: int) -> None:
    """Leftovers of an attempt at this run that never committed (a failed run)."""
    pattern = f"part-{run:08d}-b*.parquet"
    for f in [
        *out.glob(f"date=*/{pattern}"),
        *out.glob(f"{STATUS_DIR}/date=*/{pattern}"),
        *(out / STATE_DIR).glob(f"pending-{run:08d}-b*.parquet"),
    ]:
        log.warning("removing %s, left by an interrupted join run", f)
        f.unlink(missing_ok=True)


def read_worker_peaks(out: str | Path) -> dict[str, int]:
    """Peak resident memory (bytes) each worker process reported, over every run."""
    path = Path(out) / STATE_DIR / STATE_FILE
    return json.loads(path.read_text()).get("workers", {}) if path.exists() else {}


__all__ = ["ENGINE", "HOLD_ENV", "join_bucket", "read_worker_peaks", "run_join_ray"]
