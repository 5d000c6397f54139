"""Events as partitioned Parquet: the event log past one disk.

A *lake* is a folder on any filesystem pyarrow opens (a local or shared path, `file://`,
`s3://`, `gs://`, `hdfs://`, ...). It holds acknowledged events as Parquet files,
partitioned by event hour and user-hash bucket, plus one commit record per write:

    ROOT/_lake.json                                          format, bucket count
    ROOT/_commits/000000000042.json                          commit 42 (see below)
    ROOT/impression/hour=2026-12-07T21/bucket=0003/c000000000042.parquet
    ROOT/interaction/hour=…/bucket=…/c….parquet
    ROOT/quarantine/c000000000042.parquet                    rows refused by validation

**Commit = the record.** A write puts its data files first, then its commit record, each
atomically (temp file + fsync + rename on a local or shared path; one PUT on an object
store, which is atomic). The record names the data files, their row counts and ts range,
and the upstream offsets (stream -> last entry id) the write covers. Readers and the join
read only files named by a record, so a file written by a writer that died before its
record is invisible, and the retry (same commit number, same file names) overwrites it.
A consumer restarted after a crash skips entries at or below the committed offsets of
their stream, so an acknowledged event is never lost (XACK comes after the record) nor
stored twice (a redelivered entry is skipped).

**Stored once.** An event_id already stored is not stored again. An exact re-send has the
same ts and user, so it lands in the same (kind, hour, bucket) partition: the writer
checks a batch's ids against the ids committed in the partitions it touches (read once per
partition, then kept). Unlike SQLite, a re-used event_id with a different ts or user lands
in another partition and is not detected as a conflict.

**Buckets** are `feedback.stream.partition_of(user_id, buckets)`: one user's events are in
one bucket, so the distributed join (`feedback.engine_ray`) splits the work by bucket and
nothing it matches crosses buckets.

One writer per lake (the log-writer consumer, as for SQLite): commit numbers are taken
by that writer. On a local path a lock file refuses a second writer.

The lake is also an `EventSource` (snapshot = the last commit number, read = the rows of
commits after a cursor), so the single-process join (`feedback.join.run_join`) reads it
unchanged, and the reconciliation checks (acknowledged = stored once, quarantine counts)
read it as they read SQLite.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from common.files import atomic_write_bytes
from feedback.events import IMPRESSION, INTERACTION, SCHEMAS, validate
from feedback.sink import open_source
from feedback.sink_api import WriteResult
from feedback.stream import QUARANTINE, Entry, parse_id, partition_of

LAKE_FILE = "_lake.json"
COMMITS = "_commits"
_FORMAT = 1
# 64 buckets: enough tasks to spread a day over tens of workers; each bucket of a run is
# one task and one output file per date, so far more would make many tiny files.
DEFAULT_BUCKETS = 64
_KINDS = (IMPRESSION, INTERACTION)
# Schemes that are not a lake (the SQLite log, the streams).
_NOT_LAKE = ("sqlite", "redis", "rediss", "unix", "kafka")
_ARROW = {
    "id": pa.string(),
    "optional_id": pa.string(),
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
}
_NUMPY = {"int": np.int64, "float": np.float64, "str": object, "id": object, "optional_id": object}
ARROW_SCHEMAS = {
    kind: pa.schema([(f, _ARROW[k]) for f, k in SCHEMAS[kind].items()]) for kind in _KINDS
}
QUARANTINE_SCHEMA = pa.schema(
    [("kind", pa.string()), ("reason", pa.string()), ("payload", pa.string())]
)


def is_lake(path_or_url: str | os.PathLike[str]) -> bool:
    """A URL with a filesystem scheme, a folder, or a path ending in '/' is a lake;
    a file path (events.db) or sqlite:// is the SQLite log; redis:// is a stream."""
    s = os.fspath(path_or_url)
    if "://" in s:
        return s.split("://", 1)[0] not in _NOT_LAKE
    return s.endswith("/") or Path(s).is_dir()


def open_event_source(path_or_url: str | os.PathLike[str]):
    """What the join reads: a `ParquetLake` for a lake, else `feedback.sink.open_source`."""
    return ParquetLake(path_or_url) if is_lake(path_or_url) else open_source(path_or_url)


def filesystem(url: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, root path in it) for a path or URL."""
    s = os.fspath(url)
    if "://" in s:
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), os.path.abspath(s)


def hour_of(ts: np.ndarray) -> np.ndarray:
    """UTC hour of each unix ts as 'YYYY-MM-DDTHH' (formatted once per distinct hour)."""
    hours = np.floor(np.asarray(ts, np.float64) / 3600.0).astype(np.int64)
    uniq, inv = np.unique(hours, return_inverse=True)
    names = np.asarray([str(np.datetime64(int(h), "h")) for h in uniq], dtype=object)
    return names[inv]


@dataclass
class LakeWrite:
    """What one commit stored: per kind, rows stored and duplicates skipped."""

    seq: int | None  # None: nothing new to commit (every entry already committed)
    stored: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    skipped_entries: int = 0  # redelivered entries at or below the committed offsets


class ParquetLake:
    """Writer and reader of one lake. Thread-compatible, not thread-safe: one writer."""

    def __init__(
        self, url: str | os.PathLike[str], *, buckets: int | None = None, max_future_s=None
    ) -> None:
        self.url = os.fspath(url)
        self.fs, self.root = filesystem(self.url)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.max_future_s = max_future_s
        meta = self._read_json(LAKE_FILE)
        if meta is None:
            meta = {"format": _FORMAT, "buckets": int(buckets or DEFAULT_BUCKETS)}
            self.fs.create_dir(self.root, recursive=True)
            self._put(LAKE_FILE, json.dumps(meta).encode())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{self.url}: lake format {meta.get('format')!r}, not {_FORMAT}")
        if buckets is not None and int(buckets) != meta["buckets"]:
            raise ValueError(f"{self.url}: has {meta['buckets']} buckets, not {buckets}")
        self.buckets: int = int(meta["buckets"])
        self._commits: dict[int, dict] = {}  # seq -> record, read so far
        self._ids: dict[str, set[str]] = {}  # "kind/hour/bucket" -> event ids committed
        self._lock: FileLock | None = None

    # ------------------------------------------------------------------ files

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def _put(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: temp + fsync + rename locally, one PUT elsewhere."""
        if self.local:
            atomic_write_bytes(self._path(rel), data)
            return
        parent = self._path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def _read_json(self, rel: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def read_file(self, rel: str, *, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self._path(rel)) as f:
            return pq.read_table(f, columns=columns)

    # ------------------------------------------------------------------ commits

    def commits(self, after: int = 0, upto: int | None = None) -> list[dict]:
        """Commit records with after < seq <= upto, in order (re-lists the folder)."""
        sel = pafs.FileSelector(self._path(COMMITS), allow_not_found=True)
        for info in self.fs.get_file_info(sel):
            name = info.base_name
            if name.startswith(".") or not name.endswith(".json"):
                continue  # a temp file of a commit being written
            seq = int(name[: -len(".json")])
            if seq not in self._commits:
                rec = self._read_json(f"{COMMITS}/{name}")
                if rec is not None:
                    self._commits[seq] = rec
        hi = max(self._commits, default=0) if upto is None else upto
        return [self._commits[s] for s in sorted(self._commits) if after < s <= hi]

    def last_seq(self) -> int:
        recs = self.commits()
        return recs[-1]["seq"] if recs else 0

    def offsets(self) -> dict[str, str]:
        """Upstream stream -> last entry id committed (the consumer's restart point)."""
        out: dict[str, str] = {}
        for rec in self.commits():
            for stream, last in rec.get("offsets", {}).items():
                if stream not in out or parse_id(last) > parse_id(out[stream]):
                    out[stream] = last
        return out

    # ------------------------------------------------------------------ writing

    def write_impressions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write_direct(IMPRESSION, rows)

    def write_interactions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write_direct(INTERACTION, rows)

    def _write_direct(self, kind: str, rows: Mapping[str, Any]) -> WriteResult:
        v = validate(kind, rows, **self._validate_kw())
        reasons = v.reason_per_row()
        w = self._commit(
            {kind: [v.columns]},
            list(zip([kind] * len(v.bad), v.reasons, v.payloads, strict=True)),
            {},
        )
        return WriteResult(
            n=v.n,
            inserted=w.stored.get(kind, 0),
            duplicates=w.duplicates.get(kind, 0),
            quarantined=len(v.bad),
            reasons=reasons,
        )

    def write_upstream(self, entries: Sequence[Entry]) -> LakeWrite:
        """Store a consumer batch in ONE commit, with each stream's last entry id.

        Entries at or below their stream's committed offset were stored by an earlier
        commit (a redelivery after a crash between the commit and the XACK): skipped.
        """
        done = self.offsets()
        cols: dict[str, list[dict]] = {IMPRESSION: [], INTERACTION: []}
        bad: list[tuple[str, str, str]] = []
        offsets: dict[str, str] = {}
        skipped = 0
        for e in entries:
            last = offsets.get(e.stream, done.get(e.stream))
            if last is not None and parse_id(e.id) <= parse_id(last):
                skipped += 1
                continue
            offsets[e.stream] = e.id
            if e.kind == QUARANTINE:
                bad.extend(e.quarantine)
            elif e.rows is not None:
                v = validate(e.kind, e.rows, **self._validate_kw())
                cols[e.kind].append(v.columns)
                bad.extend(zip([e.kind] * len(v.bad), v.reasons, v.payloads, strict=True))
        if not offsets:
            return LakeWrite(seq=None, skipped_entries=skipped)
        w = self._commit(cols, bad, offsets)
        w.skipped_entries = skipped
        return w

    def _validate_kw(self) -> dict:
        return {} if self.max_future_s is None else {"max_future_s": self.max_future_s}

    def _commit(
        self, cols: dict[str, list[dict]], bad: list[tuple[str, str, str]], offsets: dict
    ) -> LakeWrite:
        self._take_writer_lock()
        seq = self.last_seq() + 1
        files, stored, dups, new_ids = [], {}, {}, {}
        for kind, parts in cols.items():
            parts = [p for p in parts if len(p["event_id"])]
            if not parts:
                continue
            table = pa.concat_tables(
                [
                    pa.table({f: pa.array(p[f], _ARROW[k]) for f, k in SCHEMAS[kind].items()})
                    for p in parts
                ]
            )
            df = table.to_pandas()
            n_in = len(df)
            df = df.drop_duplicates("event_id", keep="first")  # as INSERT OR IGNORE in a batch
            hours = hour_of(df["ts"].to_numpy())
            buckets = partition_of(df["user_id"].to_numpy(), self.buckets)
            keep = np.ones(len(df), bool)
            groups = pd.DataFrame({"h": hours, "b": buckets}).groupby(["h", "b"], sort=True).indices
            for (hour, bucket), idx in groups.items():
                key = f"{kind}/{hour}/{int(bucket)}"
                seen = self._partition_ids(key)
                ids = df["event_id"].to_numpy()[idx]
                # A set lookup per id: the cost is the batch's, not the partition's size.
                keep[idx] = np.fromiter((i not in seen for i in ids), bool, len(ids))
            stored[kind] = int(keep.sum())
            dups[kind] = n_in - stored[kind]
            for (hour, bucket), idx in groups.items():
                idx = idx[keep[idx]]
                if not len(idx):
                    continue
                part = df.iloc[idx]
                rel = f"{kind}/hour={hour}/bucket={int(bucket):04d}/c{seq:012d}.parquet"
                self._put(rel, _parquet_bytes(part, ARROW_SCHEMAS[kind]))
                ts = part["ts"].to_numpy()
                files.append(
                    {
                        "path": rel,
                        "kind": kind,
                        "hour": hour,
                        "bucket": int(bucket),
                        "rows": len(part),
                        "min_ts": float(ts.min()),
                        "max_ts": float(ts.max()),
                    }
                )
                new_ids[f"{kind}/{hour}/{int(bucket)}"] = set(part["event_id"].tolist())
        quarantine = None
        if bad:
            rel = f"{QUARANTINE}/c{seq:012d}.parquet"
            qdf = pd.DataFrame(bad, columns=QUARANTINE_SCHEMA.names)
            self._put(rel, _parquet_bytes(qdf, QUARANTINE_SCHEMA))
            quarantine = {"path": rel, "rows": len(bad)}
        record = {
            "seq": seq,
            "files": files,
            "quarantine": quarantine,
            "offsets": offsets,
            "committed_ts": time.time(),
        }
        # The record is the commit: before it lands, the files above are invisible.
        self._put(f"{COMMITS}/{seq:012d}.json", json.dumps(record, indent=1).encode())
        self._commits[seq] = record
        for key, ids in new_ids.items():
            self._ids[key] |= ids
        return LakeWrite(seq=seq, stored=stored, duplicates=dups, quarantined=len(bad))

    def _partition_ids(self, key: str) -> set[str]:
        """Event ids committed in one (kind, hour, bucket) partition (read once, then kept)."""
        if key not in self._ids:
            kind, hour, bucket = key.split("/")
            ids: set[str] = set()
            for rec in self.commits():
                for f in rec["files"]:
                    if f["kind"] == kind and f["hour"] == hour and f["bucket"] == int(bucket):
                        ids.update(
                            self.read_file(f["path"], columns=["event_id"])["event_id"].to_pylist()
                        )
            self._ids[key] = ids
        return self._ids[key]

    def _take_writer_lock(self) -> None:
        if self._lock is not None or not self.local:
            return
        lock = FileLock(self._path(f"{COMMITS}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout as exc:
            raise RuntimeError(f"{self.url}: another writer holds this lake") from exc
        self._lock = lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ParquetLake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading (EventSource)

    def snapshot(self) -> dict[str, int]:
        """The last commit number, for both kinds: one record commits both, so the cut is
        consistent (a click is never read without the impression committed before it)."""
        seq = self.last_seq()
        return {IMPRESSION: seq, INTERACTION: seq}

    def files(self, kind: str, *, after: int = 0, upto: int | None = None) -> list[dict]:
        return [f for rec in self.commits(after, upto) for f in rec["files"] if f["kind"] == kind]

    def read(self, kind: str, *, after: int = 0, upto: int | None = None) -> pd.DataFrame:
        """Rows of commits after < seq <= upto, in commit order, with canonical dtypes."""
        return self.read_files(kind, [f["path"] for f in self.files(kind, after=after, upto=upto)])

    def read_files(self, kind: str, paths: Sequence[str]) -> pd.DataFrame:
        schema = ARROW_SCHEMAS[kind]
        table = (
            pa.concat_tables([self.read_file(p).select(schema.names) for p in paths])
            if paths
            else schema.empty_table()
        )
        dtypes = {f: _NUMPY[k] for f, k in SCHEMAS[kind].items()}
        return table.to_pandas().astype(dtypes, copy=False)

    def count(self, kind: str) -> int:
        return sum(f["rows"] for f in self.files(kind))

    def quarantine_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for rec in self.commits():
            if rec.get("quarantine"):
                q = self.read_file(rec["quarantine"]["path"]).to_pandas()
                for (kind, reason), n in q.groupby(["kind", "reason"]).size().items():
                    out.setdefault(kind, {})[reason] = out.get(kind, {}).get(reason, 0) + int(n)
        return out


def _parquet_bytes(df: pd.DataFrame, schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False), buf)
    return buf.getvalue()


__all__ = [
    "ARROW_SCHEMAS",
    "DEFAULT_BUCKETS",
    "LakeWrite",
    "ParquetLake",
    "filesystem",
    "hour_of",
    "is_lake",
    "open_event_source",
]
