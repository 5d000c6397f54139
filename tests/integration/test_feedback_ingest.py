"""The `feedback` ingest model on a real tritonserver: gRPC and HTTP, acks, quarantine."""

import time

import numpy as np
import pytest

from feedback.events import INTERACTION
from feedback.sink import open_source
from serving.client import RecommenderClient
from serving.ingest_client import send_interactions
from serving.testing import ingest_only_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ingest_server(tmp_path_factory):
    with ingest_only_server(tmp_path_factory.mktemp("feedback-ingest")) as (server, log):
        yield server, log


def _events(prefix, n, **over):
    now = time.time()
    cols = {
        "event_id": np.array([f"{prefix}-{i}" for i in range(n)], dtype=object),
        "user_id": np.arange(n) + 1,
        "item_id": np.arange(n) + 100,
        "type": np.array(["click", "watch", "like"] * n, dtype=object)[:n],
        "value": np.ones(n),
        "ts": np.full(n, now),
        "request_id": np.array([""] * n, dtype=object),
    }
    cols.update(over)
    return cols


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_acknowledged_events_are_in_the_log_once(ingest_server, protocol):
    server, log = ingest_server
    url = server.grpc_url if protocol == "grpc" else server.http_url
    ev = _events(protocol, 300)
    first = send_interactions(url, ev, protocol=protocol, batch_size=64)
    with RecommenderClient(url, protocol) as client:  # a full retry, via the client method
        again = client.send_feedback(ev, batch_size=100)
    assert first.accepted.all() and again.accepted.all()
    assert (first.batches, first.failed_batches) == (5, 0)
    stored = open_source(log).read(INTERACTION)["event_id"]
    mine = stored[stored.str.startswith(f"{protocol}-")]
    assert len(mine) == 300 and not mine.duplicated().any()


def test_malformed_events_are_quarantined_with_reasons(ingest_server):
    server, log = ingest_server
    types = np.array(["click", "purchase", "watch", "click"], dtype=object)
    users = np.array([1, 2, 3, -1])
    res = send_interactions(server.grpc_url, _events("q", 4, type=types, user_id=users))
    assert res.accepted.tolist() == [True, False, True, False]
    assert res.reasons[1] == "type: not one of click|watch|like"
    assert res.reasons[3] == "user_id: negative"
    counts = open_source(log).quarantine_counts()[INTERACTION]
    assert counts["type: not one of click|watch|like"] >= 1
    assert counts["user_id: negative"] >= 1


def test_concurrent_clients_are_batched_and_all_acknowledged(ingest_server):
    from concurrent.futures import ThreadPoolExecutor

    server, log = ingest_server
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda k: send_interactions(server.grpc_url, _events(f"c{k}", 50), batch_size=10),
                range(8),
            )
        )
    assert all(r.accepted.all() for r in results)
    stored = open_source(log).read(INTERACTION)["event_id"]
    assert stored.str.match(r"c\d-").sum() == 400
