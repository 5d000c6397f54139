"""The serving side of the event log: what the `recommend` model calls once per batch.

`ImpressionLogger` is a drop-in for `serving.recommender.ImpressionSink`: its `write`
takes the batch's served rows (a `feedback.events.ServedImpressions`) and returns only
when they are durable in the log. `recommend` answers after that, so every item a client
receives is in the log first.

Where the log is: the env var NORTHSTAR_EVENT_LOG (set by whoever starts tritonserver),
else the model's `event_log` config parameter. Neither set: logging is off (None).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

import numpy as np

from feedback.events import ServedImpressions
from feedback.sink import EVENT_LOG_ENV, open_sink
from feedback.sink_api import EventSink, WriteResult

log = logging.getLogger(__name__)

EVENT_LOG_PARAM = "event_log"


def event_log_location(params: Mapping[str, str] | None = None) -> str | None:
    """NORTHSTAR_EVENT_LOG if set and non-empty, else params["event_log"], else None."""
    env = os.environ.get(EVENT_LOG_ENV, "").strip()
    if env:
        return env
    value = (params or {}).get(EVENT_LOG_PARAM, "")
    return value.strip() or None


def impression_event_ids(request_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """event_id = "<request_id>:<position>": logging one response twice stores it once."""
    req = np.asarray(
        [r.decode() if isinstance(r, bytes) else str(r) for r in request_id], dtype=object
    )
    return req + ":" + np.asarray(position).astype(str).astype(object)


class ImpressionLogger:
    """Writes one batch of served rows as impressions; raises if the log cannot take them.

    Raising is deliberate: `recommend` then fails the batch and the client retries, so an
    item is never shown without its impression in the log.
    """

    def __init__(self, sink: EventSink, *, clock: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.clock = clock

    def write(self, impressions: ServedImpressions) -> WriteResult:
        n = len(impressions.item_id)
        prop = impressions.propensity  # None: a deterministic policy, 1.0 everywhere
        position = np.asarray(impressions.position, dtype=np.int64)
        rows = {
            "event_id": impression_event_ids(impressions.request_id, position),
            "request_id": np.asarray(
                [r.decode() if isinstance(r, bytes) else str(r) for r in impressions.request_id],
                dtype=object,
            ),
            "user_id": np.asarray(impressions.user_id, dtype=np.int64),
            "item_id": np.asarray(impressions.item_id, dtype=np.int64),
            "position": position,
            "score": np.asarray(impressions.score, dtype=np.float64),
            "model_version": np.asarray(impressions.model_version, dtype=np.int64),
            "propensity": np.ones(n) if prop is None else np.asarray(prop, dtype=np.float64),
            "ts": np.full(n, self.clock()),
        }
        result = self.sink.write_impressions(rows)
        if result.quarantined:
            reasons = sorted({r for r in result.reasons if r})
            log.warning("%d of %d impressions quarantined: %s", result.quarantined, n, reasons)
        return result

    def close(self) -> None:
        self.sink.close()


def impression_logger(params: Mapping[str, str] | None = None) -> ImpressionLogger | None:
    """An ImpressionLogger on the configured log, or None when none is configured."""
    where = event_log_location(params)
    if where is None:
        return None
    log.info("logging impressions to %s", where)
    return ImpressionLogger(open_sink(where))
