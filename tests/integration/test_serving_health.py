"""Health that tells the truth, on a real tritonserver: `recommend`'s own per-version
metrics on the metrics endpoint; a torn state file under live traffic (the server keeps
answering from its last good copy and says so); a refused version that leaves readiness as
it was; and a server that never reports ready when production cannot be served."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from canary.prom import fetch, parse_prometheus, serving_metrics
from serving import repository as layout
from serving.client import RecommenderClient
from serving.control import ServerError, load_versions, ready_versions, switch_routing
from serving.metrics import STATE_ERRORS
from serving.routing import RoutingState
from serving.server import ServerConfig, TritonServer
from serving.testing import world_repo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-metrics")
    ds, _, repo = world_repo(root, versions=2)
    server = TritonServer(
        ServerConfig.on_free_ports(str(repo), log_file=str(root / "tritonserver.log"))
    ).start()
    try:
        yield ds, repo, server
    finally:
        server.stop()


def _users(ds, n):
    return ds.users["user_id"].to_numpy(np.int64)[:n]


def test_requests_errors_and_latency_are_counted_per_routed_version(two_versions):
    ds, repo, server = two_versions
    switch_routing(
        repo, RoutingState(production=1, canary=2, canary_percent=50), url=server.grpc_url
    )
    users = _users(ds, 120)
    routed = RoutingState.load(layout.routing_path(repo)).version_for(users)
    with RecommenderClient(server.grpc_url) as client:
        # recommend re-reads routing.json within a second: ask until both arms answer
        seen: set[int] = set()
        deadline = time.monotonic() + 120  # a bound on a hang, not a timing assertion
        while seen != {1, 2} and time.monotonic() < deadline:
            seen |= {r.model_version for r in client.recommend(users, 5)}
        assert seen == {1, 2}
        before = serving_metrics(fetch(server.metrics_url))
        got = client.recommend(users, 5)
        assert [r.model_version for r in got] == routed.tolist()
        for _ in range(3):  # bad input: refused with a name, counted with no version
            with pytest.raises(InferenceServerException, match="'k'"):
                client.recommend([int(users[0])], 0)
    after = serving_metrics(fetch(server.metrics_url))
    for v in (1, 2):
        n = int((routed == v).sum())
        assert after[str(v)].requests - before[str(v)].requests == n
        assert after[str(v)].answered - before[str(v)].answered > 0
        assert after[str(v)].latency_quantile(0.99) is not None
    bad_before = before.get("none")
    bad = after["none"].errors["bad_input"] - (bad_before.errors["bad_input"] if bad_before else 0)
    assert bad == 3


def test_a_torn_feature_file_under_traffic_keeps_serving_and_is_reported(two_versions):
    ds, repo, server = two_versions
    switch_routing(repo, RoutingState(production=1), url=server.grpc_url)
    users = _users(ds, 30)
    with RecommenderClient(server.grpc_url) as client:
        first = [r.item_ids.tolist() for r in client.recommend(users, 5)]
        path = layout.features_path(repo, 1)
        good = path.read_bytes()
        try:
            path.write_bytes(good[: len(good) // 3])  # torn while serving
            # every request is still answered, the same way, until recommend has re-read the
            # file (at most once a second) and reported it on the endpoint
            errs: list[float] = []
            deadline = time.monotonic() + 120  # a bound on a hang, not a timing assertion
            while not errs and time.monotonic() < deadline:
                again = [r.item_ids.tolist() for r in client.recommend(users, 5)]
                assert again == first
                errs = [
                    v
                    for name, labels, v in parse_prometheus(fetch(server.metrics_url))
                    if name == STATE_ERRORS and labels.get("file", "").endswith("features.npz")
                ]
            assert errs and errs[0] >= 1, "the torn file was never reported on the endpoint"
        finally:
            path.write_bytes(good)


def test_a_refused_version_leaves_readiness_as_it_was(two_versions):
    _, repo, server = two_versions
    switch_routing(repo, RoutingState(production=1), url=server.grpc_url, drain_s=0.0)
    assert _ready(server, "/v2/health/ready") == 200  # the switch waited for the unload
    onnx = layout.version_dir(repo, 2) / layout.ONNX_FILE
    good = onnx.read_bytes()
    try:
        onnx.write_bytes(good[:1000])  # truncated after export
        with pytest.raises(ServerError, match=r"version 2: .*model\.onnx does not load"):
            load_versions(server.grpc_url, repo, [1, 2])
        assert _ready(server, "/v2/health/ready") == 200  # the health check keeps passing
        assert ready_versions(server.grpc_url) == [1]
    finally:
        onnx.write_bytes(good)


def test_serve_refuses_to_be_ready_when_production_cannot_be_served(tmp_path):
    _, _, repo = world_repo(tmp_path, versions=1)
    layout.features_path(repo, 1).unlink()
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo), log_file=str(tmp_path / "tritonserver.log"), startup_timeout_s=300.0
        )
    )
    with pytest.raises(ServerError, match=r"cannot serve production.*features\.npz"):
        server.start()
    server.stop()


def _ready(server, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_autoscaler_metrics_are_what_this_triton_exports(two_versions):
    # deploy/monitoring's adapter rule divides these two (tests/unit/test_deploy_manifests.py)
    _, _, server = two_versions
    names = {n for n, _, _ in parse_prometheus(fetch(server.metrics_url))}
    assert {"nv_inference_queue_duration_us", "nv_inference_exec_count"} <= names
