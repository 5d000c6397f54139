"""The routing record in the store (online/routing_store.py) and a replica's view of it
(serving.routing.StoreRouting), on a real redis-server: compare-and-set on the epoch, one
pending switch at a time, the switch instant, and a replica that loses Redis."""

from __future__ import annotations

import json

import pytest

from online.routing_store import (
    RoutingStore,
    StaleEpochError,
    SwitchPendingError,
)
from serving.control import replica_urls
from serving.routing import (
    RoutingState,
    StoreRouting,
    routing_store_of,
    write_store_marker,
)

pytestmark = pytest.mark.integration  # a real redis-server

PROD1 = RoutingState(production=1).to_dict()
CANARY = RoutingState(production=1, canary=2, canary_percent=50).to_dict()
PROD2 = RoutingState(production=2).to_dict()


@pytest.fixture
def rs(redis_server):
    store = RoutingStore.from_url(redis_server.url)
    yield store
    store.close()


def test_epoch_only_grows_and_a_stale_writer_is_refused(rs):
    assert rs.read() is None
    first = rs.initialize(PROD1)
    assert (first.epoch, first.current, first.previous) == (1, PROD1, None)
    assert rs.initialize(PROD2) == first  # an existing record wins
    second = rs.write(CANARY, expect_epoch=1, delay_s=0.0)
    assert (second.epoch, second.current, second.previous) == (2, CANARY, PROD1)
    assert second.generation == first.generation
    # a controller that read epoch 1 and decided on that basis is refused; nothing written
    with pytest.raises(StaleEpochError, match="epoch 2, not 1") as err:
        rs.write(PROD2, expect_epoch=1, delay_s=0.0)
    assert (err.value.expected, err.value.found) == (1, 2)
    assert rs.read() == second
    third = rs.write(PROD2, expect_epoch=2, delay_s=0.0)
    assert third.epoch == 3 > second.epoch > first.epoch


def test_one_switch_at_a_time(rs):
    rs.initialize(PROD1)
    pending = rs.write(CANARY, expect_epoch=1, delay_s=30.0)
    assert pending.effective_at > pending.written_at + 29
    with pytest.raises(SwitchPendingError, match="epoch 2 takes effect"):
        rs.write(PROD2, expect_epoch=2, delay_s=0.0)
    assert rs.read() == pending


def test_a_replica_switches_at_the_records_instant(rs):
    rs.initialize(PROD1)
    rec = rs.write(CANARY, expect_epoch=1, delay_s=5.0)
    now = [rec.effective_at - 1.0]
    view = StoreRouting(rs, wall=lambda: now[0])
    assert view.refresh() and view.epoch == 2
    assert view.routing() == RoutingState(production=1)  # before the instant: previous
    assert view.versions() == (1, 2)  # both sides stay servable while it is pending
    now[0] = rec.effective_at
    assert view.routing() == RoutingState(production=1, canary=2, canary_percent=50)
    assert view.versions() == (1, 2)


def test_a_replica_keeps_its_last_good_routing_while_redis_is_down(redis_server, rs):
    rs.initialize(CANARY)
    errors: list[str] = []
    view = StoreRouting(rs, on_error=errors.append)
    assert view.refresh()
    redis_server.kill()
    for _ in range(3):
        assert view.refresh()  # keeps serving: never raises
        assert view.routing() == RoutingState(production=1, canary=2, canary_percent=50)
    assert view.errors == 3 and len(errors) == 3 and view.last_error
    redis_server.start()
    assert view.refresh() and view.last_error is None


def test_a_stale_epoch_of_the_same_generation_is_ignored(rs):
    rs.initialize(PROD1)
    rs.write(PROD2, expect_epoch=1, delay_s=0.0)
    view = StoreRouting(rs)
    view.refresh()
    # a lagging copy of Redis (or a restored backup) shows an older epoch
    rs.redis.hset(rs.key, mapping={"epoch": 1, "current": json.dumps(PROD1)})
    assert view.refresh()
    assert view.epoch == 2 and view.routing() == RoutingState(production=2)
    # a re-created record (new generation) is taken
    rs.redis.delete(rs.key)
    rs.initialize(PROD1)
    assert view.refresh() and view.epoch == 1 and view.routing() == RoutingState(production=1)


def test_the_store_of_a_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("NORTHSTAR_ONLINE_STORE", raising=False)
    (tmp_path / "recommend" / "state").mkdir(parents=True)
    assert routing_store_of(tmp_path) is None
    write_store_marker(tmp_path, "redis://10.0.0.9:6379/0")
    assert routing_store_of(tmp_path) == ("redis://10.0.0.9:6379/0", "northstar")
    monkeypatch.setenv("NORTHSTAR_ONLINE_STORE", "redis://env:6379/0")
    assert routing_store_of(tmp_path)[0] == "redis://env:6379/0"
    assert routing_store_of(tmp_path, "redis://given:1/0")[0] == "redis://given:1/0"


def test_replica_urls():
    assert replica_urls("a:1, b:2") == ["a:1", "b:2"]
    assert replica_urls("a:1", ["b:2", "a:1"]) == ["a:1", "b:2"]
    assert replica_urls(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert replica_urls(None) == []
