"""The event log: a sink interface, and its embedded implementation on SQLite in WAL mode.

Writers (each Triton `recommend` instance, the `feedback` ingest model, tests) call
`write_impressions` / `write_interactions` with one batch of columns. The call validates,
stores the good rows and quarantines the bad ones in ONE transaction, and returns only
after that transaction is durable: that return is the acknowledgement.

Why SQLite (WAL, synchronous=FULL) rather than Parquet segments: see feedback/README.md.
In short, SQLite gives the three hard requirements (durable acknowledgement, one row per
event_id, several writer processes) as primitives: a fsync'd commit, a UNIQUE constraint
with `INSERT OR IGNORE`, and a file lock with a busy timeout. Parquet segments would need
each of those rebuilt by hand (fsync of file and directory, read-time dedupe, a
per-writer segment naming scheme).

`seq` (the rowid) is the log offset: writers are serialised by SQLite's write lock, so seq
grows in commit order and every reader snapshot is a contiguous prefix. The join keeps a
cursor per table, exactly like a Kafka consumer keeps an offset per partition.

The reader side (`EventSource`) is also an interface, so the join does not care what sits
behind it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common.files import PRIVATE_FILE
from feedback.events import (
    DEFAULT_MAX_FUTURE_S,
    DEFAULT_MAX_WATCH_S,
    IMPRESSION,
    IMPRESSION_FIELDS,
    INTERACTION,
    INTERACTION_FIELDS,
    SCHEMAS,
    Columns,
    validate,
)
from feedback.sink_api import EventSink, EventSource, WriteResult

if TYPE_CHECKING:
    from feedback.stream import StreamSink

# The env var through which serving/server.py tells Triton models where the log is.
EVENT_LOG_ENV = "NORTHSTAR_EVENT_LOG"

_TABLES = {IMPRESSION: "impressions", INTERACTION: "interactions"}
_SQL_TYPES = {"id": "TEXT", "optional_id": "TEXT", "str": "TEXT", "int": "INTEGER", "float": "REAL"}
_SCHEMA_VERSION = 1
# The values `PRAGMA synchronous` reads back as. NORMAL (1) and OFF (0) are not accepted.
_SYNCHRONOUS = {"FULL": 2, "EXTRA": 3}


@dataclass(frozen=True)
class UpstreamEntry:
    """One record of an upstream log for `SqliteEventLog.write_upstream`.

    `key` is unique per upstream record (for a Redis stream: "<stream key>/<entry id>").
    `rows` are the columns of one batch of `kind` events (None for none); `quarantine`
    holds (kind, reason, payload) rows to store in the quarantine table as they are.
    """

    key: str
    kind: str
    rows: Mapping[str, Any] | None = None
    quarantine: Sequence[tuple[str, str, str]] = ()


def open_sink(path_or_url: str | os.PathLike[str], **options: Any) -> SqliteEventLog | StreamSink:
    """Open (creating if needed) the event log at a path or URL.

    `events.db`, `/abs/events.db` and `sqlite:///abs/events.db` are the embedded log.
    `redis://host:port/db?prefix=northstar&partitions=4` is the Redis Stream sink
    (feedback/stream.py); a log-writer consumer (`northstar feedback consume`) moves its
    entries into the SQLite log. `kafka://...` is the documented place for a Kafka
    backend (see feedback/README.md).
    """
    s = os.fspath(path_or_url)
    if s.startswith(("redis://", "rediss://", "unix://")):
        # lazy: the embedded log never loads pyarrow or redis
        from feedback.stream import StreamSink

        return StreamSink.from_url(s, **options)
    if s.startswith("kafka://"):
        raise NotImplementedError(
            f"{s}: no Kafka sink in this build; implement EventSink with an idempotent "
            "producer keyed by event_id (see feedback/README.md)"
        )
    if s.startswith("sqlite://"):
        s = s[len("sqlite://") :]
    if not s:
        raise ValueError(f"event log: empty path; set {EVENT_LOG_ENV} or pass a path")
    return SqliteEventLog(s, **options)


def open_source(path_or_url: str | os.PathLike[str]) -> SqliteEventLog:
    """The reading side of `open_sink`; same URLs, except a stream: the join reads the
    SQLite log that the stream's log-writer consumer fills."""
    s = os.fspath(path_or_url)
    if s.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            f"{s}: a stream is not readable by the join; read the SQLite log that "
            "`northstar feedback consume --log PATH` writes"
        )
    sink = open_sink(s)
    assert isinstance(sink, SqliteEventLog)
    return sink


class SqliteEventLog:
    """Embedded event log. Safe to use from several threads and several processes.

    synchronous=FULL on every connection: in WAL mode each commit fsyncs the WAL, so an
    acknowledged batch survives kill -9 *and* power loss. NORMAL would survive kill -9
    only (the OS still has the pages), so it is refused: batching already amortises the
    fsync. EXTRA (FULL, plus a directory sync in rollback-journal mode) is accepted too.
    Each new connection reads the setting back and refuses to write without it.
    busy_timeout makes a writer wait for another process's transaction instead of
    failing; writes take the lock up front (BEGIN IMMEDIATE) so two writers cannot
    deadlock on a read->write upgrade.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 60_000,
        max_future_s: float = DEFAULT_MAX_FUTURE_S,
        max_watch_s: float = DEFAULT_MAX_WATCH_S,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous={synchronous!r}: expected FULL or EXTRA (an acknowledged "
                "event must survive power loss)"
            )
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.max_future_s = float(max_future_s)
        self.max_watch_s = float(max_watch_s)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()

    # ------------------------------------------------------------------ connection

    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross fork(): a child reconnects on first use.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Events are user data: create the file owner-only before SQLite does (its -wal
        # and -shm files copy the main file's mode).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise OSError(f"{self.path}: could not enable WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        got = conn.execute("PRAGMA synchronous").fetchone()[0]
        if got != _SYNCHRONOUS[self.synchronous]:  # SQLite ignores a pragma it cannot apply
            conn.close()
            raise OSError(f"{self.path}: PRAGMA synchronous is {got}, not {self.synchronous}")
        conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: keeps the event_id index hot
        conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL back to 64 MiB
        self._create_schema(conn)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] == _SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")  # several processes may open a fresh log at once
        try:
            for kind, table in _TABLES.items():
                cols = ",\n".join(
                    f"  {f} {_SQL_TYPES[k]} NOT NULL" + (" UNIQUE" if f == "event_id" else "")
                    for f, k in SCHEMAS[kind].items()
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (\n  seq INTEGER PRIMARY KEY,\n"
                    f"{cols},\n  received_ts REAL NOT NULL\n)"
                )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS quarantine (seq INTEGER PRIMARY KEY, "
                "kind TEXT NOT NULL, reason TEXT NOT NULL, payload TEXT NOT NULL, "
                "received_ts REAL NOT NULL)"
            )
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> SqliteEventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def write_impressions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write(IMPRESSION, rows)

    def write_interactions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write(INTERACTION, rows)

    def _write(self, kind: str, rows: Mapping[str, Any]) -> WriteResult:
        now = time.time()
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = self._write_in(conn, kind, rows, now)
                conn.execute("COMMIT")  # durable here: this is the acknowledgement
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return result

    def _write_in(
        self, conn: sqlite3.Connection, kind: str, rows: Mapping[str, Any], now: float
    ) -> WriteResult:
        """Validate and store one batch inside the caller's open transaction."""
        v = validate(
            kind, rows, now=now, max_future_s=self.max_future_s, max_watch_s=self.max_watch_s
        )
        table = _TABLES[kind]
        names = list(SCHEMAS[kind])
        good = list(zip(*(v.columns[f].tolist() for f in names), [now] * len(v.ok), strict=True))
        bad = [(kind, r, p, now) for r, p in zip(v.reasons, v.payloads, strict=True)]
        reasons = v.reason_per_row()
        sql = (
            f"INSERT OR IGNORE INTO {table} ({', '.join(names)}, received_ts) "
            f"VALUES ({', '.join('?' * (len(names) + 1))})"
        )
        # A replay of a stored event is acknowledged (a retry); an event that reuses
        # a stored event_id with other content is refused, never silently dropped.
        conflicts = _conflicts(conn, table, names, good)
        if conflicts:
            for j in sorted(conflicts, reverse=True):
                row = good.pop(j)
                reason = "event_id: already stored with different content"
                reasons[int(v.ok[j])] = reason
                payload = json.dumps(dict(zip(names, row[:-1], strict=True)), default=str)
                bad.append((kind, reason, payload, now))
        inserted = conn.executemany(sql, good).rowcount if good else 0
        if bad:
            conn.executemany(
                "INSERT INTO quarantine (kind, reason, payload, received_ts) VALUES (?, ?, ?, ?)",
                bad,
            )
        return WriteResult(
            n=v.n,
            inserted=inserted,
            duplicates=len(good) - inserted,
            quarantined=len(bad),
            reasons=reasons,
        )

    def write_upstream(self, entries: Sequence[UpstreamEntry]) -> dict[str, WriteResult | None]:
        """Store entries read from an upstream log (a stream partition) exactly once.

        All entries go in ONE transaction (one fsync per consumer batch), and each entry's
        key is recorded in the `upstream` table in that same transaction; an entry whose
        key is already recorded is skipped. So a consumer that dies after this commit but
        before it acknowledges upstream, and is handed the batch again, stores nothing
        twice: events are idempotent anyway (INSERT OR IGNORE on event_id), and this makes
        quarantine rows, which are plain receipts, idempotent too.

        Returns key -> WriteResult for the entries stored now (None for a quarantine-only
        entry); keys already stored are absent.
        """
        now = time.time()
        out: dict[str, WriteResult | None] = {}
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Created lazily, not in _create_schema: logs that never see a stream
                # keep schema version 1 byte for byte.
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS upstream "
                    "(key TEXT PRIMARY KEY, received_ts REAL NOT NULL)"
                )
                for e in entries:
                    if (
                        e.key in out
                        or conn.execute("SELECT 1 FROM upstream WHERE key = ?", (e.key,)).fetchone()
                    ):
                        continue
                    result = None
                    if e.rows is not None:
                        result = self._write_in(conn, e.kind, e.rows, now)
                    if e.quarantine:
                        conn.executemany(
                            "INSERT INTO quarantine (kind, reason, payload, received_ts) "
                            "VALUES (?, ?, ?, ?)",
                            [(k, r, p, now) for k, r, p in e.quarantine],
                        )
                    conn.execute(
                        "INSERT INTO upstream (key, received_ts) VALUES (?, ?)", (e.key, now)
                    )
                    out[e.key] = result
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return out

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> dict[str, int]:
        """Highest committed seq per kind, read in ONE transaction: a consistent cut.

        Two separate reads could see an interaction but not the impression committed just
        before it, and the join would call that click unattributed.
        """
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN")
            try:
                return {
                    kind: conn.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {t}").fetchone()[0]
                    for kind, t in _TABLES.items()
                }
            finally:
                conn.execute("COMMIT")

    def read(
        self, kind: str, *, after: int = 0, upto: int | None = None, with_meta: bool = False
    ) -> pd.DataFrame:
        """Rows with after < seq <= upto, in seq order, with canonical dtypes.

        `with_meta` adds `seq` and `received_ts` (the commit time of the row's batch).
        """
        schema = SCHEMAS[kind]
        names = [*(["seq"] if with_meta else []), *schema, *(["received_ts"] if with_meta else [])]
        upto = 2**63 - 1 if upto is None else upto
        with self._lock:
            conn = self._connect()
            rows = conn.execute(
                f"SELECT {', '.join(names)} FROM {_TABLES[kind]} "
                "WHERE seq > ? AND seq <= ? ORDER BY seq",
                (after, upto),
            ).fetchall()
        kinds = {"seq": "int", **schema, "received_ts": "float"}
        dtypes = {n: _DTYPES[kinds[n]] for n in names}
        if not rows:
            return pd.DataFrame({n: np.zeros(0, dtype=d) for n, d in dtypes.items()})
        # from_records builds the columns in C, where zip(*rows) loops in Python per row.
        return pd.DataFrame.from_records(rows, columns=names).astype(dtypes, copy=False)

    def count(self, kind: str) -> int:
        with self._lock:
            conn = self._connect()
            return conn.execute(f"SELECT COUNT(*) FROM {_TABLES[kind]}").fetchone()[0]

    def quarantine_counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            conn = self._connect()
            rows = conn.execute(
                "SELECT kind, reason, COUNT(*) FROM quarantine GROUP BY kind, reason "
                "ORDER BY kind, COUNT(*) DESC, reason"
            ).fetchall()
        out: dict[str, dict[str, int]] = {}
        for kind, reason, n in rows:
            out.setdefault(kind, {})[reason] = n
        return out

    def quarantined(self) -> pd.DataFrame:
        with self._lock:
            conn = self._connect()
            return pd.read_sql_query(
                "SELECT seq, kind, reason, payload, received_ts FROM quarantine ORDER BY seq", conn
            )


_DTYPES = {"int": np.int64, "float": np.float64, "str": object, "id": object, "optional_id": object}


# ---------------------------------------------------------------------------- serving helper


def impression_rows(
    *,
    request_ids: Sequence[str],
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    scores: np.ndarray,
    model_version: int | np.ndarray,
    propensity: np.ndarray | None = None,
    ts: float | np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> Columns:
    """Columns for `write_impressions` from one ranked batch, one row per shown item.

    request_ids: (B,); user_ids: (B,); item_ids, scores, propensity: (B, K);
    model_version: scalar or (B,); ts: scalar or (B,), default now; valid: (B, K) bool,
    default item_ids >= 0 (padding slots are not impressions; positions count only valid
    slots, left to right). Propensity defaults to 1
    (a deterministic policy). event_id = f"{request_id}:{position}", so logging the same
    response twice stores it once.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if item_ids.ndim != 2:
        raise ValueError(f"item_ids: shape {item_ids.shape}; expected (B, K)")
    b, k = item_ids.shape
    req = np.asarray([str(r) for r in request_ids], dtype=object)
    if req.shape != (b,):
        raise ValueError(f"request_ids: {len(req)} ids for a batch of {b}")
    valid = item_ids >= 0 if valid is None else np.asarray(valid, dtype=bool)
    scores = np.broadcast_to(np.asarray(scores, dtype=np.float64), (b, k))
    prop = np.ones((b, k)) if propensity is None else np.asarray(propensity, np.float64)
    prop = np.broadcast_to(prop, (b, k))
    ts = time.time() if ts is None else ts
    ts_bk = np.broadcast_to(np.asarray(ts, np.float64).reshape(-1, 1), (b, k))
    ver = np.broadcast_to(np.asarray(model_version, np.int64).reshape(-1, 1), (b, k))
    users = np.broadcast_to(np.asarray(user_ids, np.int64).reshape(-1, 1), (b, k))
    # Invalid slots are not shown, so a slot's position is its rank among the valid ones.
    pos = np.cumsum(valid, axis=1, dtype=np.int64) - 1
    req_bk = np.broadcast_to(req.reshape(-1, 1), (b, k))
    ev = np.char.add(np.char.add(req_bk.astype(str), ":"), pos.astype(str)).astype(object)
    return {
        "event_id": ev[valid],
        "request_id": req_bk[valid],
        "user_id": users[valid],
        "item_id": item_ids[valid],
        "position": pos[valid],
        "score": scores[valid],
        "model_version": ver[valid],
        "propensity": prop[valid],
        "ts": ts_bk[valid],
    }


__all__ = [
    "EVENT_LOG_ENV",
    "IMPRESSION_FIELDS",
    "INTERACTION_FIELDS",
    "EventSink",
    "EventSource",
    "SqliteEventLog",
    "UpstreamEntry",
    "WriteResult",
    "impression_rows",
    "open_sink",
    "open_source",
]


def _conflicts(conn, table: str, names: list[str], good: list[tuple]) -> set[int]:
    """Indices into `good` whose event_id is stored (or earlier in the batch) with other
    content. Compared field by field after validation, so a replay matches exactly.

    Each row is compared with the stored copy when there is one, else with the batch's
    first copy: a batch holding a changed and an unchanged copy of a stored event refuses
    only the changed one (the unchanged one is a retry)."""
    key = names.index("event_id")
    ids = list(dict.fromkeys(row[key] for row in good))
    cols = ", ".join(names)
    reference: dict[str, tuple] = {}
    for s in range(0, len(ids), 500):  # SQLite's parameter limit
        chunk = ids[s : s + 500]
        stored = conn.execute(
            f"SELECT {cols} FROM {table} WHERE event_id IN ({', '.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        reference.update((srow[key], tuple(srow)) for srow in stored)
    out: set[int] = set()
    for j, row in enumerate(good):
        content = row[:-1]  # without received_ts
        if reference.setdefault(row[key], content) != content:
            out.add(j)
    return out
