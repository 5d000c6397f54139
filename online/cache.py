"""A small in-process cache in front of the store, and what serving does without Redis.

Per dynamic batch `read` asks Redis once (one pipelined round trip) for the users whose
cached copy is older than `ttl_s`; the rest come from memory. When Redis does not answer
(killed, restarting, unreachable, slow past the socket timeout):
  - users with a cached copy, however old, are served from it (last known features);
  - the others get an empty record flagged `degraded` (cold start), counted;
  - nothing raises, and Redis is not asked again for `retry_interval_s`, so a dead
    server costs one failed connect per interval, not one per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis

from common.redact import redacted
from online.config import OnlineStoreConfig
from online.state import ABSENT, RawUserState, UserRecord
from online.store import RedisFeatureStore

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    reads: int = 0  # batches
    users: int = 0  # user lookups
    hits: int = 0  # served from a fresh cached copy
    fetched: int = 0  # asked Redis for
    stale: int = 0  # served from an old copy because Redis did not answer
    degraded: int = 0  # no answer, no copy: cold start
    failures: int = 0  # round trips that failed
    skipped: int = 0  # batches that did not ask Redis: inside the retry interval


class CachedFeatures:
    def __init__(
        self,
        store: RedisFeatureStore,
        *,
        ttl_s: float = 0.2,
        max_users: int = 100_000,
        retry_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.ttl_s = ttl_s
        self.max_users = max_users
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.stats = CacheStats()
        self._entries: OrderedDict[int, tuple[float, UserRecord]] = OrderedDict()  # LRU
        self._lock = threading.Lock()  # Triton may call from more than one thread
        self._down_until = -float("inf")
        self.last_error: str | None = None

    @property
    def available(self) -> bool:
        """False while inside the retry interval after a failed read."""
        return self.clock() >= self._down_until

    def read(self, raw_user_ids: np.ndarray) -> RawUserState:
        raw = np.asarray(raw_user_ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(raw, return_inverse=True)
        now = self.clock()
        with self._lock:
            cached = [self._entries.get(u) for u in uniq.tolist()]
        fresh = [c is not None and now - c[0] < self.ttl_s for c in cached]
        want = [i for i, f in enumerate(fresh) if not f]
        records: list[UserRecord | None] = [
            c[1] if f else None for c, f in zip(cached, fresh, strict=True)
        ]
        degraded = np.zeros(len(uniq), dtype=bool)
        st = self.stats
        st.reads += 1
        st.users += len(raw)
        st.hits += len(uniq) - len(want)
        got = self._fetch(uniq[want], now) if want else None
        if got is not None:
            with self._lock:
                for i, rec in zip(want, got, strict=True):
                    records[i] = rec
                    self._put(int(uniq[i]), now, rec)
        else:
            for i in want:
                if cached[i] is not None:
                    records[i] = cached[i][1]
                    st.stale += 1
                else:
                    records[i] = ABSENT
                    degraded[i] = True
                    st.degraded += 1
        return RawUserState(raw, [records[i] for i in inverse], degraded[inverse])

    def _fetch(self, ids: np.ndarray, now: float) -> list[UserRecord] | None:
        if now < self._down_until:
            self.stats.skipped += 1
            return None
        self.stats.fetched += len(ids)
        try:
            got = self.store.read_records(ids)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self.stats.failures += 1
            self._down_until = now + self.retry_interval_s
            if self.last_error is None:  # log the transition, not every batch
                log.error(
                    "online store %s: %s; serving cached features",
                    redacted(self.store.config.url),
                    exc,
                )
            self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        if self.last_error is not None:
            log.warning("online store %s answers again", redacted(self.store.config.url))
            self.last_error = None
        return got

    def _put(self, user_id: int, now: float, rec: UserRecord) -> None:
        if self.max_users == 0:
            return
        self._entries[user_id] = (now, rec)
        self._entries.move_to_end(user_id)
        while len(self._entries) > self.max_users:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def open_cached(cfg: OnlineStoreConfig, *, check: bool = True) -> CachedFeatures:
    """The store and its cache as serving runs them, from one config. `check` PINGs at
    once: a wrong --online-store fails at start, with the URL in the message."""
    return CachedFeatures(
        RedisFeatureStore.from_config(cfg, check=check),
        ttl_s=cfg.cache_ttl_s,
        max_users=cfg.cache_max_users,
        retry_interval_s=cfg.retry_interval_s,
    )
