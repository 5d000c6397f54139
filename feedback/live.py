"""The `feedback` ingest model's sink when an online store is configured.

One host, event log in SQLite: every acknowledged interaction is also applied to the
online store in-process (feedback.consume.EmbeddedStreamSink), so a click is in the user's
history and seen set as soon as its write returns. Event log on a Redis stream: the
stream's `features` consumer group applies them (`northstar feedback consume --group
features --online-store URL`), and the sink is the stream's.

A store that does not answer never fails an ingest: the events are durable in the log
before the store is touched, and the store is rebuilt from the log since its checkpoint
(`northstar online rebuild`). The failure is logged with the number of events behind.
"""

from __future__ import annotations

import logging

import pandas as pd

from feedback.consume import EmbeddedStreamSink, interactions_handler
from feedback.sink import SqliteEventLog, open_sink
from feedback.sink_api import EventSink
from online.config import OnlineStoreConfig
from online.store import RedisFeatureStore

log = logging.getLogger(__name__)


class FeatureUpdates:
    """apply(frame) for the consumer hook; never raises for a store that does not answer."""

    def __init__(self, store: RedisFeatureStore):
        self.store = store
        self.behind = 0  # interactions not applied since the store stopped answering

    def __call__(self, frame: pd.DataFrame) -> None:
        # lazy: after ensure_ssl() (common/stub_python.py); the Triton stub needs that order
        import redis

        try:
            self.store.apply_interactions(frame)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.behind += len(frame)
            log.error(
                "online store %s: %d interactions not applied (%s); they are in the event "
                "log: `northstar online rebuild` replays them",
                self.store.config.url,
                self.behind,
                exc,
            )


def ingest_sink(where: str, online_store: str | None) -> EventSink:
    """The event log at `where`, with live feature updates when `online_store` is set."""
    sink = open_sink(where)
    if online_store is None or not isinstance(sink, SqliteEventLog):
        return sink
    store = RedisFeatureStore.from_config(OnlineStoreConfig(url=online_store))
    return EmbeddedStreamSink(sink, [interactions_handler(FeatureUpdates(store))])
