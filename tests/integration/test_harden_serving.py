"""Issue 31's input attacks on a real tritonserver, each with good traffic beside it.

Good clients ask `recommend` for slates and post feedback for them the whole time; an
attacker sends a request past the per-request caps, out-of-bound event values, and breaks
routing.json (an unknown version, a salt past int64, a FIFO in its place). At the end:
0 failed good requests, every item a good client was served is in the impression log,
and every acknowledged good event is in the log exactly once.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from canary.prom import fetch, parse_prometheus
from feedback.events import IMPRESSION, INTERACTION
from feedback.sink import open_source
from models.snapshot import FeatureSnapshot
from online.routing_store import RoutingStore
from serving import repository as layout
from serving.client import RecommenderClient
from serving.ingest_client import send_interactions
from serving.metrics import STATE_ERRORS
from serving.recommender import RequestLimits
from serving.server import ServerConfig, TritonServer
from serving.testing import seeded_store, tiny_export, wait_until, world_repo

pytestmark = pytest.mark.integration

IMPRESSION_CAP = 50
USER_CAP = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    _, repo, res = tiny_export(root / "model_repository", k=10, overfetch=10)
    # The tiny world's k is 10, so a cap below 128 users x 10 shows the impressions bound.
    rec = layout.read_config(repo / layout.RECOMMEND / layout.CONFIG_FILE)
    rec.parameters["max_impressions_per_request"].string_value = str(IMPRESSION_CAP)
    rec.parameters["max_users_per_request"].string_value = str(USER_CAP)
    layout.write_config(repo, rec)
    srv = TritonServer(
        ServerConfig.on_free_ports(
            str(repo), event_log=str(root / "events.db"), log_file=str(root / "triton.log")
        )
    ).start()
    try:
        yield srv, repo, root / "events.db", res.version
    finally:
        srv.stop()


class GoodTraffic:
    """Threads that ask for slates and click on them until stopped; every failure kept."""

    def __init__(self, url: str, users: list[int], threads: int = 3):
        self.url, self.users = url, users
        self.failures: list[str] = []
        self.served: dict[str, int] = {}  # request_id -> items returned
        self.acked: list[str] = []  # event ids acknowledged
        self.requests = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with RecommenderClient(self.url, "grpc") as client:
            while not self._stop.is_set():
                user = int(rng.choice(self.users))
                try:
                    (rec,) = client.recommend([user], 5)
                    ev = {
                        "event_id": np.array([uuid.uuid4().hex], dtype=object),
                        "user_id": np.array([user]),
                        "item_id": np.array([int(rec.item_ids[0])]),
                        "type": np.array(["click"], dtype=object),
                        "value": np.ones(1),
                        "ts": np.array([time.time()]),
                        "request_id": np.array([rec.request_id], dtype=object),
                    }
                    sent = send_interactions(client, ev)
                except Exception as exc:  # a failed good request: the test's verdict
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    self.requests += 1
                    self.served[rec.request_id] = int((rec.item_ids >= 0).sum())
                    if sent.accepted.all():
                        self.acked.append(str(ev["event_id"][0]))
                    else:
                        self.failures.append(f"feedback refused: {sent.reasons}")

    def wait_for(self, more: int) -> None:
        """Until `more` further good requests were answered (traffic ran beside an attack)."""
        start = self.requests
        wait_until(lambda: self.requests >= start + more, f"{more} more good requests")


def _state_errors(metrics_url: str, suffix: str) -> float:
    return sum(
        v
        for name, labels, v in parse_prometheus(fetch(metrics_url))
        if name == STATE_ERRORS and labels.get("file", "").endswith(suffix)
    )


def test_attacks_fail_alone_while_good_traffic_flows(server):
    srv, repo, log, version = server
    snap = FeatureSnapshot.load(layout.features_path(repo, version))
    users = [int(u) for u in snap.user_ids[:20]]
    routing = layout.routing_path(repo)
    good_routing = routing.read_text()
    with GoodTraffic(srv.grpc_url, users) as good:
        good.wait_for(20)
        imps_before = open_source(log).count(IMPRESSION)

        # defect 3: impression amplification, refused whole, naming the field and the limit
        with RecommenderClient(srv.grpc_url, "grpc") as attacker:
            with pytest.raises(InferenceServerException, match="max_users_per_request"):
                attacker.recommend(list(range(USER_CAP + 1)), 1)
            assert RequestLimits().max_impressions_per_request < 256 * 100  # the attack
            with pytest.raises(InferenceServerException, match="max_impressions_per_request"):
                attacker.recommend(users[: IMPRESSION_CAP // 10 + 1], 10)
        good.wait_for(20)
        # Only good clients' slates were logged since: none of the attacker's rows.
        assert open_source(log).count(IMPRESSION) - imps_before <= sum(good.served.values())

        # defect 4: out-of-bound values refused with the field, the good events go on
        forged = {
            "event_id": np.array(["forged-0", "forged-1"], dtype=object),
            "user_id": np.array([users[0], users[0]]),
            "item_id": np.array([1, 2]),
            "type": np.array(["click", "watch"], dtype=object),
            "value": np.array([3e38, 1e9]),
            "ts": np.full(2, time.time()),
            "request_id": np.array(["", ""], dtype=object),
        }
        res = send_interactions(srv.grpc_url, forged)
        assert not res.accepted.any()
        assert res.reasons[0] == "value: above 1 for a click or like"
        assert res.reasons[1].startswith("value: above 86400 s for a watch")

        # defect 9: an input with "shape": [] is refused, on both protocols, as documented
        for model, name in (("recommend", "user_id"), ("recommend", "k"), ("feedback", "ts")):
            code, body = _no_shape_http(srv.http_url, model, name)
            assert code == 400 and f"input '{name}' has no shape" in body, (model, body)
            assert f"input '{name}' has no shape" in _no_shape_grpc(srv.grpc_url, model, name)

        # defect 6: a well-formed routing naming an unknown version, then a salt past
        # int64, then a FIFO: each is refused and counted, the last good routing serves.
        for i, bad in enumerate(
            ['{"production": 99}', '{"production": 1, "salt": 1180591620717411303424}', None]
        ):
            before = _state_errors(srv.metrics_url, "routing.json")
            tmp = routing.with_name(f".bad-{i}")
            if bad is None:
                os.mkfifo(tmp)
            else:
                tmp.write_text(bad)
            os.replace(tmp, routing)
            try:
                wait_until(
                    lambda b=before: _state_errors(srv.metrics_url, "routing.json") > b,
                    "the bad routing counted on the metrics endpoint",
                )
                good.wait_for(20)
                assert _ready(srv)
            finally:
                tmp.write_text(good_routing)
                os.replace(tmp, routing)
        good.wait_for(20)

    assert good.failures == [], good.failures[:5]
    assert good.requests > 0
    src = open_source(log)
    imps = src.read(IMPRESSION)["request_id"].value_counts()
    for request_id, items in good.served.items():  # every served item is in the log once
        assert int(imps.get(request_id, 0)) == items, request_id
    stored = src.read(INTERACTION)["event_id"]
    mine = stored[stored.isin(good.acked)]
    assert len(mine) == len(good.acked) and not mine.duplicated().any()  # 0 lost, 0 doubled
    assert not stored.isin(["forged-0", "forged-1"]).any()


def _ready(srv) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://{srv.http_url}/v2/health/ready", timeout=10) as r:
        return r.status == 200


_INPUTS = {  # model -> [(name, datatype, one value)]
    "recommend": [("user_id", "INT64", 5), ("k", "INT32", 3)],
    "feedback": [
        ("event_id", "BYTES", "shape-0"),
        ("user_id", "INT64", 1),
        ("item_id", "INT64", 1),
        ("type", "BYTES", "click"),
        ("value", "FP32", 1.0),
        ("ts", "FP64", 1.8e9),
        ("request_id", "BYTES", ""),
    ],
}


def _no_shape_http(http_url: str, model: str, bare: str) -> tuple[int, str]:
    """Every input of `model` as one row [1, 1], except `bare`, sent with "shape": []."""
    import urllib.error
    import urllib.request

    body = {
        "inputs": [
            {"name": n, "shape": [] if n == bare else [1, 1], "datatype": d, "data": [v]}
            for n, d, v in _INPUTS[model]
        ]
    }
    req = urllib.request.Request(
        f"http://{http_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


_NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64}


def _no_shape_grpc(grpc_url: str, model: str, bare: str) -> str:
    """The same over gRPC, built by hand (tritonclient's InferInput checks shapes itself)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name=model)
    for n, d, v in _INPUTS[model]:
        req.inputs.add(name=n, datatype=d, shape=[] if n == bare else [1, 1])
        raw = (
            len(v.encode()).to_bytes(4, "little") + v.encode()
            if d == "BYTES"
            else np.array([v], dtype=_NUMPY[d]).tobytes()
        )
        req.raw_input_contents.append(raw)
    with grpc.insecure_channel(grpc_url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
        except grpc.RpcError as exc:
            return exc.details()
    return "answered"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden-live")
    ds, _, repo = world_repo(root)
    redis = seeded_store(ds, root / "redis")
    srv = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            event_log=str(root / "events.db"),
            online_store=redis.url,
            log_file=str(root / "triton.log"),
        )
    )
    try:  # a server that fails to start must not leave redis-server running
        srv.start()
        yield ds, srv, redis, root / "events.db"
    finally:
        srv.stop()
        redis.close()


def test_a_bad_routing_record_in_the_store_keeps_the_last_good_one(live):
    ds, srv, redis, log = live
    users = [int(u) for u in ds.users["user_id"].to_numpy()[:20]]
    rs = RoutingStore.from_url(redis.url)
    try:
        rec = rs.initialize({"production": 1})
        with GoodTraffic(srv.grpc_url, users) as good:
            good.wait_for(20)
            # Past every writer's check, as `redis-cli HSET` would: an unknown version,
            # then a salt past int64; each refused by every replica and counted.
            for i, bad in enumerate(
                ['{"production": 99}', '{"production": 1, "salt": 1180591620717411303424}']
            ):
                before = _state_errors(srv.metrics_url, "routing.store")
                rs.redis.hset(rs.key, mapping={"current": bad, "epoch": rec.epoch + 1 + i})
                wait_until(
                    lambda b=before: _state_errors(srv.metrics_url, "routing.store") > b,
                    "the bad record counted on the metrics endpoint",
                )
                good.wait_for(20)
                assert _ready(srv)
            rs.redis.delete(rs.key)  # deleting the bad record leaves the good one serving
            good.wait_for(20)
    finally:
        rs.close()
    assert good.failures == [], good.failures[:5]
    src = open_source(log)
    imps = src.read(IMPRESSION)["request_id"].value_counts()
    assert all(int(imps.get(r, 0)) == n for r, n in good.served.items())
    stored = src.read(INTERACTION)["event_id"]
    mine = stored[stored.isin(good.acked)]
    assert len(mine) == len(good.acked) and not mine.duplicated().any()
