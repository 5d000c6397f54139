"""Feedback events on Redis Streams: the wire format, the producer (`StreamSink`), trimming.

Layout. `partitions` streams `{prefix}:events:{p}`; an event goes to partition
`partition_of(user_id)`, so one user's impressions and interactions stay in order in one
stream (the join needs an impression before the click that refers to it).

One entry per (write call, partition), not one per event. An entry carries the columns of
that slice of the batch as one Arrow IPC stream (`data`), plus `kind`, `n` (rows) and `v`
(format version). Why:
- Throughput: Redis costs ~a few µs per entry and per field; 5,000 events as one entry
  are one XADD, one AOF write and one fsync (appendfsync always) instead of 5,000.
- The consumer decodes a batch into numpy columns in one call, which is what the SQLite
  log's `executemany` and the feature store want. Arrow keeps dtypes exact (int64 ids,
  float64 timestamps) where JSON would need per-value parsing; zstd halves memory again.
- The cost: an entry is the unit of delivery and acknowledgement, so a redelivered entry
  replays its whole slice. That is harmless: the log writer dedupes (INSERT OR IGNORE on
  event_id, plus the entry key in the `upstream` table, see SqliteEventLog.write_upstream).

Producing. `StreamSink` implements `feedback.sink.EventSink`. It validates with the same
`validate` as the SQLite log, so `WriteResult.reasons` refuses bad rows synchronously, with
the same "field: problem" reasons. Bad rows travel as one `kind=quarantine` entry (JSON
[kind, reason, payload] triples) that the log writer stores in the SQLite quarantine table.
All entries of one write call (and the event counters used for lag) go in ONE MULTI/EXEC,
so a call is appended entirely or not at all. The call returns once EXEC returned; with
appendonly + appendfsync always (common/redis_server.py, deploy/) that is on disk, so the
return is the acknowledgement.

What WriteResult means here: `inserted` = valid rows appended to the stream;
`duplicates` = 0 (whether an event_id is already stored is only known at the log writer,
which stores it once, and quarantines a reused event_id with other content);
`quarantined` = rows refused by validation; `reasons` exactly as the SQLite sink.

Consumer groups are created at id 0 by the producer (and by every consumer) for each name
in `StreamConfig.groups`, so entries written before a consumer first starts are kept for
it: `trim` never drops an entry some group has not acknowledged.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa

from common import config as config_mod
from common.stub_python import ensure_ssl
from feedback.events import (
    DEFAULT_MAX_FUTURE_S,
    IMPRESSION,
    INTERACTION,
    SCHEMAS,
    validate,
)
from feedback.sink_api import WriteResult

# Before redis is imported (lazily, below), inside the Triton stub: common/stub_python.py.
ensure_ssl()

FORMAT_VERSION = b"1"
QUARANTINE = "quarantine"  # the entry kind that carries rows refused at produce time
KINDS = (IMPRESSION, INTERACTION, QUARANTINE)
# A malformed entry's fields are kept in its quarantine payload up to this many characters.
MAX_PAYLOAD_CHARS = 4096
_ARROW_TYPES = {
    "id": pa.string(),
    "optional_id": pa.string(),
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
}


@dataclass(frozen=True)
class StreamConfig:
    """Where the stream is and how it is laid out. Producers and consumers must agree on
    `prefix` and `partitions`; in a URL they are query parameters
    (`redis://host:6379/0?prefix=northstar&partitions=4`)."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "northstar"
    partitions: int = 4
    # Groups created at id 0 by producers and consumers: they keep every entry until they
    # acknowledge it, even before their first consumer starts.
    groups: tuple[str, ...] = ("log",)
    compression: str = "zstd"  # Arrow IPC buffers: zstd | lz4 | none
    # Acknowledged (by every group) entries are kept while among the newest
    # `retain_entries` of their partition AND younger than `retain_s`; unacknowledged
    # entries are always kept. An entry holds one write call's slice (~thousands of events).
    retain_entries: int = 100
    retain_s: float = 3600.0
    max_future_s: float = DEFAULT_MAX_FUTURE_S
    socket_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions={self.partitions}: expected >= 1")
        if self.compression not in ("zstd", "lz4", "none"):
            raise ValueError(f"compression={self.compression!r}: expected zstd, lz4 or none")
        if not self.groups:
            raise ValueError("groups: expected at least one consumer group (e.g. log)")

    def stream_key(self, partition: int) -> str:
        return f"{self.prefix}:events:{partition}"

    def stream_keys(self) -> list[str]:
        return [self.stream_key(p) for p in range(self.partitions)]

    def produced_key(self, partition: int) -> str:
        """Counter of events appended to a partition (for lag in events)."""
        return f"{self.prefix}:produced:{partition}"

    def acked_key(self, group: str, partition: int) -> str:
        """Counter of events a group acknowledged on a partition."""
        return f"{self.prefix}:acked:{group}:{partition}"

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> StreamConfig:
        """Query parameters naming StreamConfig fields are taken out of the URL (the rest,
        e.g. `socket_keepalive`, stay for redis-py); `overrides` win over both."""
        parts = urllib.parse.urlsplit(url)
        names = {f.name for f in fields(cls)} - {"url"}
        ours: dict[str, Any] = {}
        rest = []
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if k in names:
                ours[k] = v
            else:
                rest.append((k, v))
        clean = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
        return config_mod.build(cls, {**ours, **overrides, "url": clean})


def connect(cfg: StreamConfig):
    """A redis-py client for the stream (bytes replies: entries carry binary Arrow data)."""
    import redis  # lazy: after ensure_ssl() (module top); the Triton stub needs that order

    return redis.Redis.from_url(
        cfg.url,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
        health_check_interval=30,
    )


def ensure_groups(client, cfg: StreamConfig, groups: tuple[str, ...] | None = None) -> None:
    """Create each partition's stream and consumer groups (at id 0) if missing."""
    import redis  # lazy: after ensure_ssl() (module top); the Triton stub needs that order

    for key in cfg.stream_keys():
        for group in groups or cfg.groups:
            try:
                client.xgroup_create(key, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise


# ---------------------------------------------------------------------------- partitioning


def partition_of(user_id: np.ndarray, partitions: int) -> np.ndarray:
    """(n,) int64 partition per event from its user id (int64 >= 0 after validation).

    The splitmix64 finaliser spreads ids first, so ids with structure (all even, blocks
    per tenant) still spread over partitions; it is a few lines in any language, which a
    non-Python producer needs to agree with this one.
    """
    x = np.asarray(user_id, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(partitions)).astype(np.int64)


# ---------------------------------------------------------------------------- wire format


def encode_rows(kind: str, columns: Mapping[str, np.ndarray], compression: str = "zstd") -> bytes:
    """Validated columns of one kind -> Arrow IPC stream bytes (schema + one batch)."""
    schema = SCHEMAS[kind]
    batch = pa.record_batch(
        [pa.array(columns[f], type=_ARROW_TYPES[k]) for f, k in schema.items()],
        names=list(schema),
    )
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


class MalformedEntry(ValueError):
    """A stream entry that cannot be decoded. The message is a fixed reason (countable)."""


def decode_rows(kind: str, data: bytes) -> dict[str, np.ndarray]:
    """Arrow IPC bytes -> columns with exactly the kind's fields and Arrow types, so that
    `validate` can only find row-level problems (never a batch-level EventError)."""
    try:
        table = pa.ipc.open_stream(data).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise MalformedEntry("stream entry: data is not an Arrow IPC stream") from exc
    schema = SCHEMAS[kind]
    want = pa.schema([(f, _ARROW_TYPES[k]) for f, k in schema.items()])
    got = table.schema.remove_metadata()
    if not got.equals(want):
        raise MalformedEntry(f"stream entry: columns do not match the {kind} schema")
    return {f: table.column(f).to_numpy(zero_copy_only=False) for f in schema}


@dataclass(frozen=True)
class Entry:
    """One decoded stream entry: what every consumer handler receives.

    kind "impression"/"interaction": `rows` holds its columns (n rows, not yet
    re-validated). kind "quarantine": `quarantine` holds (kind, reason, payload) rows, either
    refused at produce time or this entry itself when it could not be decoded.
    """

    stream: str
    id: str
    kind: str
    n: int
    rows: dict[str, np.ndarray] | None = None
    quarantine: tuple[tuple[str, str, str], ...] = ()
    events: int = field(default=0)  # events this entry counts for lag (rows of a data entry)

    @property
    def key(self) -> str:
        """Unique per entry: the log writer's idempotency key for it."""
        return f"{self.stream}/{self.id}"

    @property
    def partition(self) -> int:
        return int(self.stream.rsplit(":", 1)[1])


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="backslashreplace") if isinstance(v, bytes) else str(v)


def decode_entry(stream: str, entry_id: str, raw: Mapping[bytes, bytes] | None) -> Entry:
    """Never raises: an entry that cannot be decoded becomes a one-row quarantine entry
    whose reason says why and whose payload keeps its fields, so a consumer quarantines
    it, acknowledges it and moves on (it never blocks the partition)."""
    try:
        return _decode(stream, entry_id, raw)
    except MalformedEntry as exc:
        reason = str(exc)
    fields_ = (
        {} if raw is None else {_text(k): _text(v)[:MAX_PAYLOAD_CHARS] for k, v in raw.items()}
    )
    kind = fields_.get("kind", "")
    payload = json.dumps({"stream": stream, "id": entry_id, "fields": fields_}, sort_keys=True)
    return Entry(
        stream=stream,
        id=entry_id,
        kind=QUARANTINE,
        n=1,
        quarantine=((kind if kind in SCHEMAS else "stream", reason, payload),),
    )


def _decode(stream: str, entry_id: str, raw: Mapping[bytes, bytes] | None) -> Entry:
    if raw is None:  # XREADGROUP of a pending entry that was deleted (XDEL) meanwhile
        raise MalformedEntry("stream entry: deleted before it was processed")
    kind = raw.get(b"kind", b"").decode("utf-8", errors="replace")
    if kind not in KINDS:
        raise MalformedEntry("stream entry: kind is not impression|interaction|quarantine")
    if raw.get(b"v") != FORMAT_VERSION:
        raise MalformedEntry("stream entry: unknown format version")
    try:
        n = int(raw.get(b"n", b""))
    except ValueError as exc:
        raise MalformedEntry("stream entry: n is not an integer") from exc
    data = raw.get(b"data", b"")
    if kind == QUARANTINE:
        try:
            rows = json.loads(data)
            rows = tuple((str(k), str(r), str(p)) for k, r, p in rows)
        except (ValueError, TypeError) as exc:
            raise MalformedEntry(
                "stream entry: quarantine data is not [kind, reason, payload]s"
            ) from exc
        if len(rows) != n:
            raise MalformedEntry("stream entry: n does not match the rows")
        return Entry(stream=stream, id=entry_id, kind=kind, n=n, quarantine=rows)
    cols = decode_rows(kind, data)
    if len(cols["event_id"]) != n:
        raise MalformedEntry("stream entry: n does not match the rows")
    return Entry(stream=stream, id=entry_id, kind=kind, n=n, rows=cols, events=n)


# ---------------------------------------------------------------------------- producer


class StreamSink:
    """`EventSink` on Redis Streams. Thread-safe (redis-py pools connections)."""

    def __init__(self, cfg: StreamConfig, *, client=None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else connect(cfg)
        self._groups_ready = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> StreamSink:
        return cls(StreamConfig.from_url(url, **options))

    def write_impressions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write(IMPRESSION, rows)

    def write_interactions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write(INTERACTION, rows)

    def _write(self, kind: str, rows: Mapping[str, Any]) -> WriteResult:
        v = validate(kind, rows, now=time.time(), max_future_s=self.cfg.max_future_s)
        if not self._groups_ready:
            ensure_groups(self.client, self.cfg)
            self._groups_ready = True
        pipe = self.client.pipeline(transaction=True)
        if len(v.ok):
            parts = partition_of(v.columns["user_id"], self.cfg.partitions)
            for p in np.unique(parts).tolist():
                mask = parts == p  # a boolean mask keeps the batch's order inside a partition
                cols = {f: c[mask] for f, c in v.columns.items()}
                n = int(mask.sum())
                pipe.xadd(self.cfg.stream_key(p), _data_fields(kind, n, cols, self.cfg))
                pipe.incrby(self.cfg.produced_key(p), n)
        if len(v.bad):
            # Refused rows have no trustworthy user id; their order does not matter.
            q = [[kind, r, p] for r, p in zip(v.reasons, v.payloads, strict=True)]
            pipe.xadd(
                self.cfg.stream_key(0),
                {b"kind": QUARANTINE, b"v": FORMAT_VERSION, b"n": len(q), b"data": json.dumps(q)},
            )
        if len(pipe):
            pipe.execute()  # MULTI/EXEC returned: appended (and fsync'd by the server)
        return WriteResult(
            n=v.n,
            inserted=len(v.ok),
            duplicates=0,
            quarantined=len(v.bad),
            reasons=v.reason_per_row(),
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> StreamSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _data_fields(kind: str, n: int, cols: Mapping[str, np.ndarray], cfg: StreamConfig) -> dict:
    return {
        b"kind": kind,
        b"v": FORMAT_VERSION,
        b"n": n,
        b"data": encode_rows(kind, cols, cfg.compression),
    }


# ---------------------------------------------------------------------------- trimming


# Lua, so that only ids cross the wire, never the entries' data.
_NTH_NEWEST_ID = """
local r = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
if #r == 0 then return false end
return r[#r][1]
"""


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def format_id(i: tuple[int, int]) -> str:
    return f"{i[0]}-{i[1]}"


def acknowledged_floor(client, key: str) -> tuple[int, int] | None:
    """The lowest id some group of `key` has not acknowledged; every entry below it is
    acknowledged by every group. None when the stream has no group (then nothing is
    known to be acknowledged, and nothing may be trimmed)."""
    import redis  # lazy: after ensure_ssl() (module top); the Triton stub needs that order

    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:  # no such key
        return None
    if not groups:
        return None
    floors = []
    for g in groups:
        if g["pending"]:
            # The oldest delivered-but-unacknowledged entry (whichever consumer holds it).
            floors.append(parse_id(client.xpending(key, g["name"])["min"]))
        else:
            ms, seq = parse_id(g["last-delivered-id"])
            floors.append((ms, seq + 1))  # the next entry not yet delivered to this group
    return min(floors)


def trim(client, cfg: StreamConfig, *, now: float | None = None) -> dict[int, int]:
    """Trim each partition (XTRIM MINID) below min(retention, acknowledged floor).

    Retention keeps the newest `retain_entries` entries younger than `retain_s`; the floor
    (see `acknowledged_floor`) is applied last, so an entry some group has not
    acknowledged is never dropped: a lagging group keeps the stream long. Exact trimming
    (not `~`): entries are batches, so streams stay small and exactness is cheap, and it
    makes the bound testable. Returns partition -> entries removed.

    A group created later at an old id (XGROUP CREATE ... 0) cannot get back what was
    trimmed before it existed; list it in `StreamConfig.groups` so it exists from the start.
    """
    now = time.time() if now is None else now
    out: dict[int, int] = {}
    for p in range(cfg.partitions):
        key = cfg.stream_key(p)
        floor = acknowledged_floor(client, key)
        if floor is None:
            continue
        by_age = (max(0, int((now - cfg.retain_s) * 1000)), 0) if cfg.retain_s < 1e15 else (0, 0)
        by_len = (0, 0)
        if cfg.retain_entries <= 0:
            by_len = (2**64 - 1, 0)
        elif client.xlen(key) > cfg.retain_entries:
            # Server-side, so the entries' data (batches of events) never cross the wire.
            by_len = parse_id(client.eval(_NTH_NEWEST_ID, 1, key, cfg.retain_entries))
        minid = min(max(by_age, by_len), floor)
        if minid > (0, 0):
            removed = client.xtrim(key, minid=format_id(minid), approximate=False)
            if removed:
                out[p] = int(removed)
    return out


__all__ = [
    "QUARANTINE",
    "Entry",
    "MalformedEntry",
    "StreamConfig",
    "StreamSink",
    "acknowledged_floor",
    "connect",
    "decode_entry",
    "decode_rows",
    "encode_rows",
    "ensure_groups",
    "partition_of",
    "trim",
]
