"""Which `retrieval` version answers which user: production, and optionally a canary.

The state is one small JSON file that the `recommend` model re-reads when it
changes (`model_repository/recommend/state/routing.json`):

    {"production": 3, "canary": 4, "canary_percent": 10, "salt": 0}

A user goes to the canary when `hash_bucket(user_id ^ salt, 100) < canary_percent`.
The hash is deterministic, so a user keeps seeing the same version for the
whole test, and changing `salt` reshuffles who is in the canary.

Past one machine (several `tritonserver` replicas on one repository) the routing lives
in the online store instead (online/routing_store.py: a record with an epoch, written by
compare-and-set, that names the instant it takes effect); `StoreRouting` below is how a
replica reads it, and routing.json is then a mirror the controller writes for people and
for servers started without the store. Which store a repository's routing lives in is
recorded next to routing.json (`routing_store.json`, written by `northstar serve
--online-store`), so every caller of serving.control.switch_routing finds it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.files import write_private
from common.redact import redacted
from models.features import hash_bucket
from online.config import ONLINE_STORE_ENV
from serving import repository as layout

if TYPE_CHECKING:
    from online.routing_store import RoutingRecord, RoutingStore

log = logging.getLogger(__name__)

ROUTING_FILE = "routing.json"
STORE_MARKER = "routing_store.json"  # next to routing.json: {"url": ..., "prefix": ...}
# Replicas re-read routing at most this often (OnlineState's check_interval_s).
REFRESH_S = 1.0
# A switch in the store takes effect this long after it is written (Redis's clock). It must
# exceed REFRESH_S plus a read's latency, so that every replica already holds the new record
# at the instant and all of them switch at that instant rather than whenever they re-read.
SWITCH_DELAY_S = 2.5


@dataclass(frozen=True)
class RoutingState:
    production: int
    canary: int | None = None
    canary_percent: int = 0  # 0..100; the hash has 100 buckets, so 1% is the step
    salt: int = 0

    def __post_init__(self) -> None:
        # Every field is an int64 on the request path (version ids, the hash's salt): a
        # value outside it would raise on every request rather than here, once.
        for name in ("production", "canary", "canary_percent", "salt"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ValueError(f"routing: {name}={v!r}; expected an integer")
        if not 1 <= self.production <= INT64_MAX:
            raise ValueError(f"routing: production={self.production}; expected a version >= 1")
        if self.canary is not None and not 1 <= self.canary <= INT64_MAX:
            raise ValueError(f"routing: canary={self.canary}; expected a version >= 1 or null")
        if not 0 <= self.canary_percent <= 100:
            raise ValueError(f"routing: canary_percent={self.canary_percent}; expected 0..100")
        if not 0 <= self.salt <= INT64_MAX:
            raise ValueError(f"routing: salt={self.salt}; expected 0..{INT64_MAX} (an int64)")

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions that can receive traffic, production first."""
        if self.canary is None or self.canary == self.production or self.canary_percent == 0:
            return (self.production,)
        return (self.production, self.canary)

    def version_for(self, user_ids: np.ndarray) -> np.ndarray:
        """(B,) int64 version per raw user id."""
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        out = np.full(len(user_ids), self.production, dtype=np.int64)
        if len(self.versions) > 1:
            bucket = hash_bucket(user_ids ^ np.int64(self.salt), 100)
            out[bucket < self.canary_percent] = self.canary
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> RoutingState:
        unknown = set(d) - {"production", "canary", "canary_percent", "salt"}
        if unknown:
            raise ValueError(f"routing: unknown key(s) {sorted(unknown)}")
        if "production" not in d:
            raise ValueError("routing: missing key 'production' (the serving version number)")
        canary = d.get("canary")
        return cls(
            production=_integer("production", d["production"]),
            canary=None if canary is None else _integer("canary", canary),
            canary_percent=_integer("canary_percent", d.get("canary_percent", 0)),
            salt=_integer("salt", d.get("salt", 0)),
        )

    @classmethod
    def load(cls, path: str | Path) -> RoutingState:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(read_regular(path)))
        except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: bad routing state ({exc})") from exc

    def save(self, path: str | Path) -> Path:
        """Atomic (`recommend` polls this file and must never read half of it) and
        owner-only: whoever can write it chooses the model every user sees."""
        return write_private(path, self.to_json())


INT64_MAX = 2**63 - 1
# routing.json is a few hundred bytes; anything far larger is not ours.
MAX_ROUTING_BYTES = 1 << 16


def _integer(name: str, v: object) -> int:
    """A JSON number that is a whole integer (3 or 3.0), else ValueError naming the key."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"routing: {name}={v!r}; expected an integer")
    if isinstance(v, float) and not (math.isfinite(v) and v == int(v)):
        raise ValueError(f"routing: {name}={v!r}; expected an integer")
    return int(v)


def read_regular(path: Path, limit: int = MAX_ROUTING_BYTES) -> str:
    """The text of `path`, which must be a regular file of at most `limit` bytes.

    Opened non-blocking and checked on the open descriptor: a FIFO (or a device) put in
    its place would otherwise block the reader forever, and `recommend` reads routing.json
    on its request path."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{path}: {st.st_size} bytes; a routing file is under {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path}: over {limit} bytes; a routing file is under {limit}")
    return data.decode("utf-8")


def unservable(repo: str | Path, routing: RoutingState, *, canary: bool = True) -> list[str]:
    """Why `routing` cannot be put in service on `repo`: each routed version (production,
    and the canary unless `canary=False`) must be a complete published version. [] when it
    can."""
    versions = routing.versions if canary else (routing.production,)
    out = []
    for v in versions:
        if why := layout.incomplete_reasons(repo, v):
            out.append(f"version {v} is not a complete published version ({'; '.join(why)})")
    return out


# ---------------------------------------------------------------------------- the store


def store_marker_path(repo: str | Path) -> Path:
    return layout.state_dir(repo) / STORE_MARKER


def write_store_marker(repo: str | Path, url: str, prefix: str = "northstar") -> Path:
    """Record that this repository's routing lives in the store at `url` (owner-only: the
    URL may carry a password)."""
    return write_private(store_marker_path(repo), json.dumps({"url": url, "prefix": prefix}))


def routing_store_of(repo: str | Path, explicit: str | None = None) -> tuple[str, str] | None:
    """(url, prefix) of the store holding `repo`'s routing, or None (routing.json only).

    `explicit` first, then $NORTHSTAR_ONLINE_STORE, then the repository's marker: a
    controller that forgot the store must not write a file the replicas no longer read.
    """
    url = (explicit or "").strip() or os.environ.get(ONLINE_STORE_ENV, "").strip()
    if url:
        return url, "northstar"
    return read_store_marker(repo)


def read_store_marker(repo: str | Path) -> tuple[str, str] | None:
    """(url, prefix) from the repository's routing_store.json, or None without one."""
    path = store_marker_path(repo)
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        return str(d["url"]), str(d.get("prefix", "northstar"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); fix it or delete it") from exc


def routing_of(d: dict, where: str) -> RoutingState:
    try:
        return RoutingState.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad routing ({exc})") from exc


class StoreRouting:
    """A replica's view of the routing record (online.routing_store), read at most once per
    `refresh` (the caller calls it at most once a second).

    `routing()` is the routing in force *now* on the wall clock: `previous` before the
    record's effective_at, `current` from then on. So replicas that read the record at
    different moments still switch at the same instant.

    A read that fails (Redis down, slow, a malformed record) keeps the last good record in
    service: nothing raises, `errors` counts it, `on_error(message)` is told each time, and
    the log says so once per outage. A record with a lower epoch than the one held (same
    generation) is stale (a lagging copy of Redis) and ignored.
    """

    def __init__(
        self,
        store: RoutingStore,
        *,
        wall: Callable[[], float] = time.time,
        on_error: Callable[[str], None] | None = None,
        check: Callable[[RoutingState], None] | None = None,
    ):
        self.store = store
        self.wall = wall
        self.on_error = on_error
        # Raises ValueError for a well-formed routing this replica cannot serve (a version
        # it does not have): such a record is refused like a malformed one.
        self.check = check
        self.record: RoutingRecord | None = None
        self._current: RoutingState | None = None
        self._previous: RoutingState | None = None
        self.errors = 0  # failed or refused reads since start
        self.last_error: str | None = None
        self.absent = False  # the store answered and has no record

    @classmethod
    def from_client(cls, client, *, prefix: str = "northstar", url: str = "", **kw):
        # lazy: redis (online.routing_store); `northstar --help` imports this module
        from online.routing_store import RoutingStore

        return cls(RoutingStore(client, prefix=prefix, url=url), **kw)

    @property
    def has_record(self) -> bool:
        return self.record is not None

    @property
    def epoch(self) -> int:
        return self.record.epoch if self.record is not None else 0

    def refresh(self) -> bool:
        """Read the record once; True when a record is in service (new or kept)."""
        # lazy: redis; `northstar --help` imports this module (through serving.client)
        import redis

        from online.routing_store import RoutingStoreError

        current = previous = None
        try:
            rec = self.store.read()
            if rec is not None:
                where = f"{self.store.key} epoch {rec.epoch}"
                current = routing_of(rec.current, where)
                if self.check is not None:
                    self.check(current)
                previous = self._previous_of(rec, where)
        except (redis.RedisError, OSError, RoutingStoreError, ValueError) as exc:
            self._failed(f"routing store {redacted(self.store.url) or self.store.key}: {exc}")
            return self.record is not None
        if self.last_error is not None:
            log.warning(
                "routing store %s answers again", redacted(self.store.url) or self.store.key
            )
            self.last_error = None
        if rec is None:
            if self.record is not None and not self.absent:
                log.error(
                    "routing store %s: the record %s is gone; keeping epoch %d",
                    redacted(self.store.url),
                    self.store.key,
                    self.record.epoch,
                )
            self.absent = True
            return self.record is not None
        self.absent = False
        held = self.record
        if held is not None and rec.generation == held.generation and rec.epoch < held.epoch:
            self.errors += 1
            log.warning(
                "routing store %s: epoch %d is older than the %d in service; ignored",
                redacted(self.store.url),
                rec.epoch,
                held.epoch,
            )
            return True
        if held is None or rec.epoch != held.epoch or rec.generation != held.generation:
            log.info(
                "routing epoch %d: %s from %.3f (before: %s)",
                rec.epoch,
                rec.current,
                rec.effective_at,
                rec.previous,
            )
        self.record, self._current, self._previous = rec, current, previous
        return True

    def _previous_of(self, rec: RoutingRecord, where: str) -> RoutingState | None:
        """The record's `previous`, in force until its instant; one this replica would refuse
        (it was refused when it was current) is replaced by the routing in service here."""
        if rec.previous is None:
            return None
        try:
            previous = routing_of(rec.previous, f"{where} previous")
            if self.check is not None:
                self.check(previous)
            return previous
        except ValueError:
            return self._current

    def _failed(self, message: str) -> None:
        self.errors += 1
        if self.last_error is None:
            kept = (
                f"keeping routing epoch {self.record.epoch}"
                if self.record is not None
                else "no routing record yet"
            )
            log.error("%s; %s", message, kept)
        self.last_error = message
        if self.on_error is not None:
            self.on_error(message)

    def routing(self) -> RoutingState:
        """The routing in force now (requires a record: see has_record)."""
        rec = self.record
        if rec is None or self._current is None:
            raise LookupError("no routing record read from the store yet")
        if self._previous is not None and rec.pending(self.wall()):
            return self._previous
        return self._current

    def versions(self) -> tuple[int, ...]:
        """Every version that may be routed to until the next refresh: both sides of a
        pending switch."""
        rec = self.record
        if rec is None or self._current is None:
            return ()
        if self._previous is not None and rec.pending(self.wall()):
            extra = [v for v in self._current.versions if v not in self._previous.versions]
            return (*self._previous.versions, *extra)
        return self._current.versions
