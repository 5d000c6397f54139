"""Consumers of the feedback stream: a generic consumer-group loop and its handlers.

`StreamConsumer` reads every partition with XREADGROUP for one group, hands each batch of
decoded entries (`feedback.stream.Entry`) to a handler, and acknowledges (XACK) only after
the handler returned. So delivery is at least once, and each handler makes redelivery
harmless:

- `LogWriter` (group "log"): the durable event log the join reads. The whole batch goes
  into SQLite in ONE transaction (`SqliteEventLog.write_upstream`) together with the
  entries' keys, then XACK. Killed between the commit and the XACK, the restarted
  consumer is handed the same entries again and stores nothing twice (the keys are
  there; events are INSERT OR IGNORE on event_id anyway). Conflicting content under a
  stored event_id is quarantined by the log, as for direct writers.
- `LakeWriter` (group "log", `--log` a lake folder or URL): the same batch as ONE commit
  of partitioned Parquet files, whose record holds each stream's last entry id; a
  redelivered entry at or below it is skipped (see feedback/lake.py).
- `interactions_handler(fn)` (e.g. group "features", the online feature store): calls
  `fn(frame)` with the batch's interactions; see `InteractionFrameHandler`.

Handler protocol (`BatchHandler`): a callable taking `list[Entry]`, returning once its
effect is durable. Raising means "not done": the consumer logs, backs off, and re-reads
its own pending entries (same order) before anything new. Malformed entries never reach a
handler as an exception: `decode_entry` turns them into `kind == "quarantine"` entries
with a reason, which the log writer stores and other handlers skip, so a bad entry never
crashes the consumer nor blocks its partition.

Recovery: at start, a consumer first re-reads its OWN pending entries (XREADGROUP from id
0; its name must be stable across restarts, the host name by default), then, and every
`claim_every_s`, takes over other consumers' entries idle longer than `min_idle_ms`
(XAUTOCLAIM). Order: one user's events are in one partition and one consumer processes a
partition's entries in id order, so the log sees an impression before its click. Two live
consumers in one group could commit a partition's entries out of order, so run ONE
log-writer consumer (plus standbys that only take over): SQLite has one writer anyway.

Embedded (one host, no Redis): `EmbeddedStreamSink` writes the SQLite log directly (the
acknowledgement is still the commit) and then feeds the same handlers in-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from feedback.events import INTERACTION, validate
from feedback.lag import lag_metrics, serve_metrics, stream_lag
from feedback.lake import ParquetLake, is_lake
from feedback.sink import SqliteEventLog, UpstreamEntry
from feedback.sink_api import WriteResult
from feedback.stream import (
    QUARANTINE,
    Entry,
    StreamConfig,
    connect,
    decode_entry,
    ensure_groups,
    trim,
)

log = logging.getLogger(__name__)

# Test hook: SIGKILL this process after the N-th handled batch, between the handler's
# durable commit and the XACK (the crash window that redelivery must make harmless).
KILL_AFTER_COMMIT_ENV = "NORTHSTAR_STREAM_KILL_AFTER_COMMIT"

# The columns `interactions_handler` hands its callable, in this order.
INTERACTION_FRAME_COLUMNS = ("user_id", "item_id", "ts", "event_type", "event_id")


class BatchHandler(Protocol):
    """Takes one batch of decoded entries; returns when its effect is durable; raises if
    it is not done (the entries are then redelivered, in order). Must tolerate a replay
    of a batch it already handled (a crash between its return and the XACK)."""

    def __call__(self, entries: Sequence[Entry]) -> None: ...


@dataclass(frozen=True)
class ConsumerConfig:
    group: str = "log"
    consumer: str = ""  # "" = the host name: stable across restarts, so own pending is found
    count: int = 16  # entries per partition per read (an entry is one write call's slice)
    block_ms: int = 1000  # XREADGROUP BLOCK: also how soon a stop request is noticed
    min_idle_ms: int = 60_000  # take over another consumer's entries idle this long
    claim_every_s: float = 30.0
    trim_every_s: float = 10.0  # 0 = this consumer never trims
    retry_backoff_s: float = 1.0  # after a handler error, before re-reading own pending
    progress_every_s: float = 10.0

    def consumer_name(self) -> str:
        return self.consumer or socket.gethostname()


@dataclass
class ConsumerStats:
    batches: int = 0
    entries: int = 0
    events: int = 0  # rows of data entries acknowledged
    quarantine_entries: int = 0  # entries of kind quarantine (produce-time or malformed)
    claimed: int = 0  # entries taken over from other consumers
    trimmed: int = 0
    errors: int = 0  # handler errors (batches retried)
    started: float = field(default_factory=time.time)


class StreamConsumer:
    def __init__(
        self,
        stream: StreamConfig,
        cfg: ConsumerConfig,
        handler: BatchHandler,
        *,
        client=None,
    ) -> None:
        self.stream = stream
        self.cfg = cfg
        self.handler = handler
        self.name = cfg.consumer_name()
        self.client = client if client is not None else connect(stream)
        self.stats = ConsumerStats()
        self._keys = stream.stream_keys()
        self._kill_after = int(os.environ.get(KILL_AFTER_COMMIT_ENV, "0") or 0)
        ensure_groups(self.client, stream, (*stream.groups, cfg.group))

    # ------------------------------------------------------------------ one step each

    def recover(self) -> int:
        """Own pending entries (from id 0), then others' idle ones (XAUTOCLAIM)."""
        return self.read_own_pending() + self.claim_idle()

    def read_own_pending(self) -> int:
        done = 0
        start = dict.fromkeys(self._keys, "0")
        while start:
            reply = self.client.xreadgroup(self.cfg.group, self.name, start, count=self.cfg.count)
            batch = [(s, entries) for s, entries in reply or [] if entries]
            if not batch:
                break
            done += self._process(batch)
            for s, entries in batch:
                start[_text(s)] = _text(entries[-1][0])
            start = {k: v for k, v in start.items() if k in {_text(s) for s, _ in batch}}
        return done

    def claim_idle(self) -> int:
        done = 0
        for key in self._keys:
            cursor = "0-0"
            while True:
                reply = self.client.xautoclaim(
                    key,
                    self.cfg.group,
                    self.name,
                    self.cfg.min_idle_ms,
                    start_id=cursor,
                    count=self.cfg.count,
                )
                cursor, entries = _text(reply[0]), reply[1]
                if entries:
                    self.stats.claimed += len(entries)
                    log.info("claimed %d idle entries of %s", len(entries), key)
                    done += self._process([(key, entries)])
                if cursor == "0-0":
                    break
        return done

    def poll(self, block_ms: int | None = None) -> int:
        """Read new entries (">") once, handle and acknowledge them; entries handled."""
        block = self.cfg.block_ms if block_ms is None else block_ms
        reply = self.client.xreadgroup(
            self.cfg.group,
            self.name,
            dict.fromkeys(self._keys, ">"),
            count=self.cfg.count,
            block=block if block > 0 else None,
        )
        batch = [(s, entries) for s, entries in reply or [] if entries]
        return self._process(batch) if batch else 0

    def _process(self, batch: list[tuple[Any, list]]) -> int:
        entries = [
            decode_entry(_text(s), _text(i), fields) for s, items in batch for i, fields in items
        ]
        self.handler(entries)  # durable when it returns
        self.stats.batches += 1
        if self._kill_after and self.stats.batches >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: committed, not acknowledged
        # XACK and the group's event counter in one MULTI: lag in events stays exact.
        pipe = self.client.pipeline(transaction=True)
        for s, items in batch:
            key = _text(s)
            pipe.xack(key, self.cfg.group, *[_text(i) for i, _ in items])
            events = sum(e.events for e in entries if e.stream == key)
            if events:
                pipe.incrby(
                    self.stream.acked_key(self.cfg.group, int(key.rsplit(":", 1)[1])), events
                )
        pipe.execute()
        self.stats.entries += len(entries)
        self.stats.events += sum(e.events for e in entries)
        self.stats.quarantine_entries += sum(e.kind == QUARANTINE for e in entries)
        return len(entries)

    # ------------------------------------------------------------------ the loop

    def run(
        self, stop: threading.Event | None = None, *, until_idle: bool = False
    ) -> ConsumerStats:
        """Recover, then read until `stop` is set (or, with `until_idle`, until a read
        returns nothing). Handler errors are logged and retried, never raised; Redis
        connection errors are retried too (the server restarting is an outage, not a
        reason to die)."""
        # lazy: after ensure_ssl() (common/stub_python.py); the Triton stub loads this module
        import redis

        stop = stop or threading.Event()
        need_recover = True
        last_claim = last_trim = last_progress = time.monotonic()
        while not stop.is_set():
            try:
                if need_recover:
                    self.read_own_pending()
                    self.claim_idle()
                    need_recover = False
                    last_claim = time.monotonic()
                n = self.poll(block_ms=self.cfg.block_ms if not until_idle else 0)
                now = time.monotonic()
                if now - last_claim >= self.cfg.claim_every_s:
                    n += self.claim_idle()
                    last_claim = now
                if self.cfg.trim_every_s and now - last_trim >= self.cfg.trim_every_s:
                    self.stats.trimmed += sum(trim(self.client, self.stream).values())
                    last_trim = now
                if self.cfg.progress_every_s and now - last_progress >= self.cfg.progress_every_s:
                    self._log_progress()
                    last_progress = now
                if until_idle and n == 0:
                    break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.stats.errors += 1
                log.warning(
                    "redis unavailable (%s); retrying in %.1f s", exc, self.cfg.retry_backoff_s
                )
                need_recover = True
                stop.wait(self.cfg.retry_backoff_s)
            except Exception:
                # A handler failure (e.g. the disk under SQLite is full). Its entries stay
                # pending and are re-read first, in order: retried, never skipped.
                self.stats.errors += 1
                log.exception("handler failed; retrying in %.1f s", self.cfg.retry_backoff_s)
                need_recover = True
                stop.wait(self.cfg.retry_backoff_s)
        if self.cfg.trim_every_s:
            with contextlib.suppress(redis.RedisError):
                self.stats.trimmed += sum(trim(self.client, self.stream).values())
        self._log_progress()
        return self.stats

    def _log_progress(self) -> None:
        s = self.stats
        rate = s.events / max(time.time() - s.started, 1e-9)
        log.info(
            "consumer %s/%s: %d batches, %d entries, %d events (%.0f/s), %d quarantine "
            "entries, %d claimed, %d trimmed, %d errors",
            self.cfg.group,
            self.name,
            s.batches,
            s.entries,
            s.events,
            rate,
            s.quarantine_entries,
            s.claimed,
            s.trimmed,
            s.errors,
        )

    def close(self) -> None:
        self.client.close()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------- handlers


class LogWriter:
    """BatchHandler: store a batch in the SQLite event log exactly once (one transaction)."""

    def __init__(self, log: SqliteEventLog) -> None:
        self.log = log

    def __call__(self, entries: Sequence[Entry]) -> None:
        self.log.write_upstream(
            [UpstreamEntry(e.key, e.kind, e.rows, e.quarantine) for e in entries]
        )


class LakeWriter:
    """BatchHandler: store a batch in a Parquet lake (feedback.lake) as ONE commit that
    records each stream's last entry id; a redelivered entry at or below it is skipped."""

    def __init__(self, lake: ParquetLake) -> None:
        self.lake = lake

    def __call__(self, entries: Sequence[Entry]) -> None:
        self.lake.write_upstream(entries)


class InteractionFrameHandler:
    """BatchHandler adapter for a feature updater: `fn(frame)` once per batch that holds
    interactions, where `frame` is a pandas DataFrame with columns
    user_id (int64), item_id (int64), ts (float64, unix s), event_type (str: click|watch|
    like), event_id (str), in stream order within each partition (so per user).

    Rows are validated again (`feedback.events.validate`); invalid ones are dropped here
    (the log writer quarantines them). Impressions and quarantine entries are skipped.
    Delivery is at least once: after a crash `fn` may see rows again, so it must be
    idempotent per event_id (or tolerate the small overcount). `fn` raising leaves the
    batch unacknowledged; it is handed over again, in order.
    """

    def __init__(self, fn: Callable[[pd.DataFrame], None]) -> None:
        self.fn = fn

    def __call__(self, entries: Sequence[Entry]) -> None:
        frames = [interaction_frame(e.rows) for e in entries if e.kind == INTERACTION and e.rows]
        frames = [f for f in frames if len(f)]
        if frames:
            self.fn(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True))


def interactions_handler(fn: Callable[[pd.DataFrame], None]) -> InteractionFrameHandler:
    """The handler hook for the online feature consumer; see InteractionFrameHandler."""
    return InteractionFrameHandler(fn)


def interaction_frame(rows: Mapping[str, Any]) -> pd.DataFrame:
    """Valid interaction rows as the frame `interactions_handler` passes on."""
    v = validate(INTERACTION, rows)
    c = v.columns
    return pd.DataFrame(
        {
            "user_id": np.asarray(c["user_id"], dtype=np.int64),
            "item_id": np.asarray(c["item_id"], dtype=np.int64),
            "ts": np.asarray(c["ts"], dtype=np.float64),
            "event_type": np.asarray(c["type"], dtype=object),
            "event_id": np.asarray(c["event_id"], dtype=object),
        },
        columns=list(INTERACTION_FRAME_COLUMNS),
    )


# ---------------------------------------------------------------------------- embedded


class EmbeddedStreamSink:
    """EventSink for one host without Redis: the same handlers, fed in-process.

    Each write goes to the SQLite log exactly as `SqliteEventLog.write_*` (validation,
    quarantine, one fsync'd transaction: the acknowledgement), and returns its exact
    WriteResult; then the rows the log accepted are handed to `handlers` (e.g.
    `interactions_handler(store.apply)`) as one entry, as a stream consumer would.
    A handler error propagates after the commit: the events are durable, the caller
    sees the failure (and may retry: the log dedupes by event_id).
    """

    def __init__(self, log: SqliteEventLog, handlers: Sequence[BatchHandler] = ()) -> None:
        self.log = log
        self.handlers = list(handlers)
        self._seq = 0

    def write_impressions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write("impression", rows)

    def write_interactions(self, rows: Mapping[str, Any]) -> WriteResult:
        return self._write(INTERACTION, rows)

    def _write(self, kind: str, rows: Mapping[str, Any]) -> WriteResult:
        write = self.log.write_impressions if kind == "impression" else self.log.write_interactions
        result = write(rows)
        if self.handlers and result.inserted + result.duplicates:
            keep = np.asarray([r == "" for r in result.reasons], dtype=bool)
            cols = {f: np.asarray(v)[keep] for f, v in rows.items()}
            n = int(keep.sum())
            self._seq += 1
            entry = Entry(
                stream="embedded:0", id=f"0-{self._seq}", kind=kind, n=n, rows=cols, events=n
            )
            for h in self.handlers:
                h([entry])
        return result

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> EmbeddedStreamSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- CLI body


def run_log_writer(
    stream: StreamConfig,
    cfg: ConsumerConfig,
    log_path: str | None,
    *,
    stop: threading.Event | None = None,
    metrics_port: int | None = None,
    online_store: str | None = None,
) -> ConsumerStats:
    """`northstar feedback consume`: until `stop` (SIGTERM), either a log writer (`log_path`:
    the SQLite log the join reads) or, with `online_store`, the features consumer, which
    applies interactions to the online store. A store that fails raises: the batch stays
    pending and is retried, so no acknowledged click is skipped."""
    sink: SqliteEventLog | ParquetLake | None = None
    store = None
    if online_store is not None:
        # lazy: imports redis, after ensure_ssl(); the Triton stub loads this module
        from online.store import RedisFeatureStore

        store = RedisFeatureStore(online_store)
        handler: BatchHandler = interactions_handler(store.apply_interactions)
        log_path = online_store
    elif log_path is not None and is_lake(log_path):
        sink = ParquetLake(log_path)
        handler = LakeWriter(sink)
    elif log_path is not None:
        sink = SqliteEventLog(log_path)
        handler = LogWriter(sink)
    else:
        raise ValueError("consume: give the SQLite log to write (--log) or --online-store")
    consumer = StreamConsumer(stream, cfg, handler)
    server = None
    if metrics_port is not None:
        metrics_client = connect(stream)  # its own pool: scrapes come from another thread

        def render() -> str:
            s = consumer.stats
            return lag_metrics(
                stream_lag(metrics_client, stream),
                {
                    "northstar_consumer_events_total": ("Events acknowledged.", s.events),
                    "northstar_consumer_entries_total": ("Entries acknowledged.", s.entries),
                    "northstar_consumer_errors_total": ("Batches retried.", s.errors),
                },
            )

        server = serve_metrics(metrics_port, render)
        log.info("metrics on :%d/metrics", server.server_address[1])
    log.info(
        "consuming %s (%d partitions) as %s/%s into %s",
        stream.prefix,
        stream.partitions,
        cfg.group,
        consumer.name,
        log_path,
    )
    try:
        return consumer.run(stop)
    finally:
        if server is not None:
            server.shutdown()
        consumer.close()
        if sink is not None:
            sink.close()
        if store is not None:
            store.close()


__all__ = [
    "INTERACTION_FRAME_COLUMNS",
    "KILL_AFTER_COMMIT_ENV",
    "BatchHandler",
    "ConsumerConfig",
    "ConsumerStats",
    "EmbeddedStreamSink",
    "InteractionFrameHandler",
    "LakeWriter",
    "LogWriter",
    "StreamConsumer",
    "interaction_frame",
    "interactions_handler",
    "run_log_writer",
]
