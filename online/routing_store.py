"""Routing in the store: one record every replica reads, changed by compare-and-set.

Key (`p` = prefix, as online/store.py):

    p:routing   HASH   epoch, generation, current, previous, effective_at, written_at, writer

`current` and `previous` are routing dicts as JSON ({"production": 3, "canary": 4,
"canary_percent": 10, "salt": 0}); this module does not interpret them (`online` sits
below `serving`, which owns serving.routing.RoutingState).

Why each field:
- **epoch** grows by one with every write, and a write names the epoch it read: a Lua
  script refuses it when the record moved on since (compare-and-set), so two controllers
  cannot interleave and a stale one cannot put an old routing back.
- **effective_at** (seconds since the epoch, Redis's own clock + a delay) is when `current`
  takes over from `previous`. Replicas re-read the record at most once a second, so each
  sees it at another moment; if they switched when they saw it, one user could get the new
  version from one replica and the old from another for up to a second. With the delay
  above the re-read interval, every replica holds the record before the instant and they
  all switch at that instant, to the precision of their clocks (one host: exactly).
- **previous** is what is in force until then. A write is refused while another switch is
  still pending (now < effective_at), so the record never holds more than one pending step.
- **generation** is drawn when the record is first written (`initialize`). A replica keeps
  the epoch it last used and ignores a lower one of the same generation (a lagging Redis
  replica, a restored backup); a new generation means the record was re-created.
"""

from __future__ import annotations

import json
import math
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from online.config import OnlineStoreConfig

ROUTING_SUFFIX = "routing"

# KEYS[1] record; ARGV: expected epoch, current JSON, delay s, writer, generation (used only
# when the record does not exist yet). Returns {code, epoch, effective_at as text}:
# code 1 written, 0 stale epoch, 2 a switch is still pending (effective_at in the future).
_CAS = """
local key = KEYS[1]
local cur = tonumber(redis.call('HGET', key, 'epoch') or '0')
if cur ~= tonumber(ARGV[1]) then
  return {0, cur, redis.call('HGET', key, 'effective_at') or '0'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local old_eff = tonumber(redis.call('HGET', key, 'effective_at') or '0')
if old_eff > now then
  return {2, cur, tostring(old_eff)}
end
local previous = redis.call('HGET', key, 'current') or ''
local generation = redis.call('HGET', key, 'generation') or ARGV[5]
local eff = string.format('%.6f', now + tonumber(ARGV[3]))
local new = cur + 1
redis.call('HSET', key, 'epoch', new, 'generation', generation, 'current', ARGV[2],
  'previous', previous, 'effective_at', eff, 'written_at', string.format('%.6f', now),
  'writer', ARGV[4])
return {1, new, eff}
"""


class RoutingStoreError(RuntimeError):
    """The routing record cannot be read or written as asked. The message says why."""


class StaleEpochError(RoutingStoreError):
    """A compare-and-set named an epoch the record has moved past: someone else switched."""

    def __init__(self, expected: int, found: int):
        self.expected, self.found = expected, found
        super().__init__(
            f"routing record is at epoch {found}, not {expected}: another controller switched "
            "routing since it was read; nothing was written (read it again and decide again)"
        )


class SwitchPendingError(RoutingStoreError):
    """A write while the previous switch has not taken effect yet."""

    def __init__(self, epoch: int, effective_at: float):
        self.epoch, self.effective_at = epoch, effective_at
        super().__init__(
            f"routing epoch {epoch} takes effect at {effective_at:.3f} (not yet): one switch "
            "at a time; wait for it and try again"
        )


@dataclass(frozen=True)
class RoutingRecord:
    epoch: int
    generation: str
    current: dict
    previous: dict | None  # in force before effective_at; None: nothing before (initialized)
    effective_at: float  # wall-clock seconds (Redis's clock when written, plus the delay)
    written_at: float
    writer: str

    def pending(self, now: float) -> bool:
        """True while `previous` is still the routing in force."""
        return self.previous is not None and now < self.effective_at

    def in_force(self, now: float) -> dict:
        return self.previous if self.pending(now) else self.current  # type: ignore[return-value]

    @classmethod
    def from_hash(cls, h: Mapping[bytes, bytes]) -> RoutingRecord | None:
        if not h:
            return None
        m = {k.decode(): v.decode() for k, v in h.items()}
        try:
            previous = json.loads(m["previous"]) if m.get("previous") else None
            return cls(
                epoch=int(m["epoch"]),
                generation=m.get("generation", ""),
                current=json.loads(m["current"]),
                previous=previous,
                effective_at=float(m.get("effective_at", 0.0)),
                written_at=float(m.get("written_at", 0.0)),
                writer=m.get("writer", ""),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise RoutingStoreError(f"routing record: unreadable ({exc!r}): {m}") from exc


INT64_MAX = 2**63 - 1
# key -> (lowest, highest, may be null): every replica reads these as int64s.
_ROUTING_KEYS = {
    "production": (1, INT64_MAX, False),
    "canary": (1, INT64_MAX, True),
    "canary_percent": (0, 100, False),
    "salt": (0, INT64_MAX, False),
}


def check_routing_dict(current: Mapping) -> None:
    """ValueError naming the key unless `current` is a routing every replica can read.

    The shape only (serving.routing.RoutingState is the full type; it sits above this
    layer): a record that every replica would refuse must not be written, since the
    replicas would keep the last good one while the record says otherwise. Whether the
    versions exist is the writer's check (serving.control.switch_routing)."""
    if not isinstance(current, Mapping):
        raise ValueError(f"routing record: {current!r} is not a mapping")
    unknown = sorted(set(current) - set(_ROUTING_KEYS))
    if unknown:
        raise ValueError(f"routing record: unknown key(s) {unknown}")
    if "production" not in current:
        raise ValueError("routing record: missing key 'production'")
    for key, (low, high, nullable) in _ROUTING_KEYS.items():
        v = current.get(key)
        if v is None and (nullable or key not in current):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"routing record: {key}={v!r}; expected an integer in {low}..{high}")


def default_writer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RoutingStore:
    """The routing record in Redis: `read` for replicas, `write` (compare-and-set) for the
    controller, `initialize` once from the single-host routing.json."""

    def __init__(self, client: redis.Redis, *, prefix: str = "northstar", url: str = ""):
        self.redis = client
        self.prefix = prefix
        self.url = url
        self.key = f"{prefix}:{ROUTING_SUFFIX}"
        self._cas = client.register_script(_CAS)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "northstar", timeout_s: float = 1.0
    ) -> RoutingStore:
        """Its own connection (the controller, `serve`); no client-side retries: a call that
        fails says so at once, and the caller decides."""
        cfg = OnlineStoreConfig(url=url, prefix=prefix)  # checks the URL and the prefix
        client = redis.Redis.from_url(
            cfg.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, prefix=cfg.prefix, url=cfg.url)

    def close(self) -> None:
        self.redis.close()

    def read(self) -> RoutingRecord | None:
        """One HGETALL; None when there is no record. Raises redis errors when Redis does
        not answer: the caller keeps what it had."""
        return RoutingRecord.from_hash(self.redis.hgetall(self.key))

    def write(
        self,
        current: Mapping,
        *,
        expect_epoch: int,
        delay_s: float,
        writer: str | None = None,
    ) -> RoutingRecord:
        """Make `current` the routing from Redis's now + `delay_s`, if the record is still
        at `expect_epoch` (0: no record yet) and no other switch is pending.

        Raises StaleEpochError or SwitchPendingError and writes nothing otherwise."""
        if not (isinstance(delay_s, (int, float)) and math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay_s={delay_s!r}; expected a finite number of seconds >= 0")
        check_routing_dict(current)
        code, epoch, eff = self._cas(
            keys=[self.key],
            args=[
                int(expect_epoch),
                json.dumps(dict(current), sort_keys=True),
                repr(float(delay_s)),
                writer or default_writer(),
                uuid.uuid4().hex,
            ],
        )
        code, epoch = int(code), int(epoch)
        if code == 0:
            raise StaleEpochError(int(expect_epoch), epoch)
        if code == 2:
            raise SwitchPendingError(epoch, float(eff))
        rec = self.read()
        if rec is None or rec.epoch < epoch:  # only a flush between the two calls does this
            raise RoutingStoreError(f"routing record epoch {epoch} vanished after the write")
        return rec

    def initialize(self, current: Mapping, *, writer: str | None = None) -> RoutingRecord:
        """The record, written from `current` with no delay if there is none yet; an existing
        record is returned as it is (the store is the source of truth once it has one)."""
        try:
            return self.write(current, expect_epoch=0, delay_s=0.0, writer=writer)
        except StaleEpochError:
            rec = self.read()
            if rec is None:  # deleted between the two calls: try once more
                return self.write(current, expect_epoch=0, delay_s=0.0, writer=writer)
            return rec
