"""Settings of the online feature store, checked when they are made.

Errors name the field (or the URL) and what was expected: the person reading them is
usually looking at a command line (`--online-store`) or a deploy manifest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from common.redact import redacted

# How `northstar serve --online-store` tells the Triton models where the store is.
ONLINE_STORE_ENV = "NORTHSTAR_ONLINE_STORE"


def online_store_url(params: Mapping[str, str] | None = None) -> str | None:
    """The store's URL from the environment, else a model's parameters; None: no store."""
    url = os.environ.get(ONLINE_STORE_ENV, "").strip() or (params or {}).get("online_store", "")
    return url.strip() or None


# Keys are `{prefix}:...`; a prefix with spaces, braces or colons would break the layout
# (braces are Redis Cluster hash tags) or collide with another prefix's keys.
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SCHEMES = ("redis://", "rediss://", "unix://")


class OnlineStoreError(RuntimeError):
    """The store cannot be used as configured, or does not answer. The message says why."""


class OnlineConfigError(ValueError):
    """A bad setting. The message starts with the field's name."""


@dataclass(frozen=True)
class OnlineStoreConfig:
    url: str
    prefix: str = "northstar"
    # Items kept per user. Keep it above every served version's vocab.history_len: a
    # version drops the items outside its catalogue and takes its H newest of the rest,
    # so the margin is what lets a version with an older catalogue still fill its H.
    history_len: int = 50
    # A user's features younger than this are served from the process without asking
    # Redis. Freshness of a click = consumer lag + this, so it stays well under 1 s.
    cache_ttl_s: float = 0.2
    cache_max_users: int = 100_000
    # Short: a Redis that hangs must cost a batch milliseconds, not the client's default
    # timeout of seconds.
    socket_timeout_s: float = 0.25
    connect_timeout_s: float = 0.25
    # After a failed read, serve from the cache (or cold start) without trying Redis for
    # this long: a dead server is asked once per interval, not once per batch.
    retry_interval_s: float = 1.0
    seed_chunk_users: int = 2000  # users per pipelined round trip when seeding

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(_SCHEMES):
            raise OnlineConfigError(
                f"url: {redacted(self.url)!r} is not a Redis URL; expected redis://host:port/db "
                "(or rediss://, unix://)"
            )
        if not isinstance(self.prefix, str) or not _PREFIX.match(self.prefix):
            raise OnlineConfigError(
                f"prefix: {self.prefix!r}; expected 1-64 characters from A-Z a-z 0-9 _ . -"
            )
        _positive_int("history_len", self.history_len)
        _positive_int("cache_max_users", self.cache_max_users, allow_zero=True)
        _positive_int("seed_chunk_users", self.seed_chunk_users)
        _seconds("cache_ttl_s", self.cache_ttl_s, allow_zero=True)
        _seconds("socket_timeout_s", self.socket_timeout_s)
        _seconds("connect_timeout_s", self.connect_timeout_s)
        _seconds("retry_interval_s", self.retry_interval_s, allow_zero=True)


def _positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OnlineConfigError(f"{name}: {value!r}; expected an integer >= {low}")


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and value == value and value != float("inf")  # NaN and inf are not timeouts
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise OnlineConfigError(f"{name}: {value!r}; expected a finite number of seconds {bound}")
