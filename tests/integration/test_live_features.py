"""Live features end to end: a real tritonserver reading user features from a real
redis-server (serving/live.py), and the `feedback` model applying acknowledged clicks to it
(feedback/live.py). Nothing is mocked.

- a click reaches the user's seen set: the clicked item leaves their recommendations;
- a user the model never saw gets history-based answers after their first clicks;
- `kill -9` of redis-server under traffic fails no request (cached users keep their
  features, the rest are answered as cold starts and counted `degraded`), clicks are
  still acknowledged, and after Redis is back `northstar online rebuild` replays them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from canary.prom import fetch, parse_prometheus
from serving.client import RecommenderClient
from serving.ingest_client import send_interactions
from serving.metrics import ERRORS
from serving.seed import replay
from serving.server import ServerConfig, TritonServer
from serving.testing import seeded_store, wait_until, world_repo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("live-features")
    ds, _, repo = world_repo(root)
    redis = seeded_store(ds, root / "redis")
    events = root / "events.db"
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            event_log=str(events),
            online_store=redis.url,
            log_file=str(root / "tritonserver.log"),
        )
    )
    try:  # a server that fails to start must not leave redis-server running
        server.start()
        yield ds, server, redis, events
    finally:
        server.stop()
        redis.close()


def _click(server, user: int, items) -> None:
    items = np.asarray(items, dtype=np.int64)
    n = len(items)
    res = send_interactions(
        server.grpc_url,
        {
            "user_id": np.full(n, user, np.int64),
            "item_id": items,
            "type": np.array(["click"] * n, dtype=object),
            "value": np.ones(n, np.float32),
            "ts": np.full(n, time.time()),
        },
    )
    assert res.accepted.all(), res.reasons


def test_a_click_leaves_the_users_recommendations(live):
    ds, server, _, _ = live
    user = int(ds.users["user_id"].iloc[3])
    with RecommenderClient(server.grpc_url) as client:
        top = int(client.recommend([user], 5)[0].item_ids[0])
        _click(server, user, [top])
        wait_until(
            lambda: top not in client.recommend([user], 5)[0].item_ids,
            f"item {top} clicked by user {user} still recommended",
        )


def test_a_new_user_gets_history_based_answers_after_first_clicks(live):
    ds, server, _, _ = live
    user = int(ds.users["user_id"].max()) + 10_000
    items = ds.items["item_id"].to_numpy(np.int64)[:3]
    with RecommenderClient(server.grpc_url) as client:
        first = client.recommend([user], 5)[0]
        assert first.cold_start
        _click(server, user, items)

        def answered_from_history():
            r = client.recommend([user], 5)[0]
            return None if r.cold_start else r

        after = wait_until(answered_from_history, f"user {user} still a cold start after clicks")
    assert not set(items.tolist()) & set(after.item_ids.tolist())


def _degraded(server) -> float:
    samples = parse_prometheus(fetch(server.metrics_url))
    return sum(
        v for name, labels, v in samples if name == ERRORS and labels.get("reason") == "degraded"
    )


def test_redis_killed_under_traffic_fails_no_request_and_loses_no_click(live):
    ds, server, redis, events = live
    users = ds.users["user_id"].to_numpy(np.int64)
    warm, cold = users[:20], users[20:60]
    clicker = int(users[5])
    with RecommenderClient(server.grpc_url) as client:
        client.recommend(warm, 5)  # in every instance's cache, for its TTL
        redis.kill()
        answered = 0
        for chunk in np.array_split(cold, 8):  # not cached: served as cold starts
            got = client.recommend(chunk, 5)
            assert all(len(r.item_ids) == 5 for r in got)
            answered += len(got)
        assert answered == len(cold)
        wait_until(lambda: _degraded(server) > 0, "degraded answers counted")
        # One batch mixing users with a stale cached copy and users with none: the degraded
        # count must not be taken for the batch's size (it once failed every such batch).
        for w, c in zip(warm[:5], cold[:5], strict=True):
            got = client.recommend([int(w), int(c)], 5)
            assert [len(r.item_ids) for r in got] == [5, 5]
        # A click while the store is down is still acknowledged: it is in the event log.
        top = int(client.recommend([clicker], 5)[0].item_ids[0])
        _click(server, clicker, [top])

        redis.start()  # same data dir: what the AOF had acknowledged comes back
        _, rows = replay(redis.url, str(events))
        assert rows >= 1
        wait_until(
            lambda: top not in client.recommend([clicker], 5)[0].item_ids,
            "the click made while Redis was down reaches the user after the rebuild",
        )
