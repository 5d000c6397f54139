"""Store URLs are printed without their password (deploy/ puts it in every client's URL)."""

from __future__ import annotations

import logging

import pytest

from common.redact import redacted
from online.config import OnlineConfigError, OnlineStoreConfig
from online.routing_store import RoutingStore
from serving.routing import StoreRouting


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://northstar:s3cret@redis:6379/0", "redis://***@redis:6379/0"),
        ("rediss://u:p@h/1", "rediss://***@h/1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redacted_hides_user_and_password_only(url, shown):
    assert redacted(url) == shown


def test_a_bad_url_error_does_not_echo_the_password():
    with pytest.raises(OnlineConfigError) as err:
        OnlineStoreConfig(url="http://:s3cret@redis:6379/0")
    assert "s3cret" not in str(err.value) and "url:" in str(err.value)


def test_routing_store_errors_do_not_log_the_password(caplog):
    seen: list[str] = []
    # A real client of a port nobody listens on: the read fails as when Redis is gone.
    store = RoutingStore.from_url("redis://:s3cret@127.0.0.1:1/0")
    routing = StoreRouting(store, on_error=seen.append)
    with caplog.at_level(logging.DEBUG):
        routing.refresh()
    assert seen and all("s3cret" not in m for m in seen)
    assert "s3cret" not in caplog.text and "***@127.0.0.1" in caplog.text
