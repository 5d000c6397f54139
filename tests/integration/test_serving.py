"""The served path on a real tritonserver: answers, batching, bad input, versions, and
NaN where it can arrive (the `feedback` model's float inputs)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from feedback.events import INTERACTION
from feedback.sink import open_source
from models.onnx_session import onnx_session
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.client import AsyncRecommenderClient, RecommenderClient
from serving.control import ServerError, load_versions, switch_routing
from serving.core_slots import CoreSlots, server_folder
from serving.ingest_client import send_interactions
from serving.inline import available_cores, resolve_retrieval_call
from serving.publish import ExportConfig, export
from serving.recommender import select_unseen
from serving.routing import RoutingState
from serving.testing import build_tiny_run, ingest_only_server

pytestmark = pytest.mark.integration

COLD_USER = 10**12 + 7  # no snapshot row: hashed user row, empty history


def _expected(served, user_ids, k, version=None):
    """What `recommend` must answer, computed in-process with onnxruntime."""
    version = version or served.version
    snap = FeatureSnapshot.load(layout.features_path(served.repo, version))
    feats = snap.lookup(np.asarray(user_ids))
    session = onnx_session(layout.version_dir(served.repo, version) / layout.ONNX_FILE)
    ids, scores = session.run(
        ["item_ids", "scores"],
        {"user_index": feats.user_index, "user_cats": feats.user_cats, "history": feats.history},
    )
    ks = np.full(len(user_ids), k, dtype=np.int64)
    out_ids, out_scores, counts = select_unseen(ids, scores, feats.seen, ks)
    return feats, (ids, scores), out_ids, out_scores, counts


def _users(served, n=12):
    snap = FeatureSnapshot.load(layout.features_path(served.repo, served.version))
    return [int(u) for u in snap.user_ids[:n]] + [COLD_USER]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_recommend_matches_in_process_onnx(served_each, protocol):
    served = served_each
    users = _users(served)
    feats, _, ids, scores, counts = _expected(served, users, k=5)
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with RecommenderClient(url, protocol) as client:
        recs = client.recommend(users, k=5)
    assert [r.user_id for r in recs] == users
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(r.item_ids, ids[i, : counts[i]])
        np.testing.assert_allclose(r.scores, scores[i, : counts[i]], rtol=0, atol=1e-6)
        assert r.model_version == served.version
        assert r.cold_start == (not feats.known[i])
        assert len(r.request_id) == 32 and int(r.request_id, 16) >= 0
        assert not set(r.item_ids) & set(feats.seen[i].tolist()), "a seen item was served"
    assert len({r.request_id for r in recs}) == len(recs)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_retrieve_matches_in_process_onnx(served, protocol):
    users = _users(served)
    feats, (ids, scores), *_ = _expected(served, users, k=served.exported.k)
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with RecommenderClient(url, protocol, retrieval_batch_size=5) as client:  # 3 requests
        got_ids, got_scores = client.retrieve(feats.user_index, feats.user_cats, feats.history)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=0, atol=1e-6)


def test_cold_start_user_is_answered_and_marked(served):
    with RecommenderClient(served.grpc_url) as client:
        cold, warm = client.recommend([COLD_USER, _users(served)[0]], k=served.exported.k)
    assert cold.cold_start and not warm.cold_start
    assert len(cold.item_ids) == served.exported.k and cold.model_version == served.version


def test_k_defaults_to_ten_and_varies_per_row(served):
    uid = np.array([[_users(served)[0]], [COLD_USER]], dtype=np.int64)
    client = grpcclient.InferenceServerClient(served.grpc_url)
    r = client.infer("recommend", [_inp(grpcclient, "user_id", uid, "INT64")])
    assert r.as_numpy("item_ids").shape == (2, 10)  # default_k, capped by K=10 here
    k = np.array([[1], [3]], dtype=np.int32)
    r = client.infer(
        "recommend", [_inp(grpcclient, "user_id", uid, "INT64"), _inp(grpcclient, "k", k, "INT32")]
    )
    ids = r.as_numpy("item_ids")
    assert ids.shape == (2, 3)
    assert ids[0, 1:].tolist() == [layout.PAD_ITEM] * 2 and (ids[1] >= 0).all()
    assert r.as_numpy("request_id").shape == (2, 1)
    assert r.as_numpy("cold_start")[:, 0].tolist() == [False, True]


def test_dynamic_batching_batches_concurrent_requests(served_each):
    served = served_each
    users = _users(served)
    bls = _retrieval_call(served) == "bls"

    async def fire():
        async with AsyncRecommenderClient(served.grpc_url) as client:
            before = {
                m: (await client.statistics(m))[str(v)]
                for m, v in (("recommend", 1), ("retrieval", served.version))
            }
            recs = await asyncio.gather(
                *(client.recommend(users[i % len(users)], k=3) for i in range(64))
            )
            # Triton records a Python-backend batch's statistics after execute()
            # returns, which can be after the client already holds its response:
            # poll until the counters settle instead of reading them once.
            deadline = time.monotonic() + 120.0  # a bound on a hang, not a timing assertion
            while True:
                after = {
                    m: (await client.statistics(m))[str(v)]
                    for m, v in (("recommend", 1), ("retrieval", served.version))
                }
                settled = after["recommend"].inference_count - before[
                    "recommend"
                ].inference_count >= 64 and (
                    not bls
                    or after["retrieval"].inference_count - before["retrieval"].inference_count
                    >= 64
                )
                if settled or time.monotonic() > deadline:
                    return recs, before, after
                await asyncio.sleep(0.1)

    recs, before, after = asyncio.run(fire())
    assert all(len(r) == 1 and len(r[0].item_ids) == 3 for r in recs)
    rec_inf = after["recommend"].inference_count - before["recommend"].inference_count
    rec_exe = after["recommend"].execution_count - before["recommend"].execution_count
    assert rec_inf == 64
    assert rec_exe < rec_inf, f"recommend ran {rec_exe} executions for {rec_inf} requests"
    ret_inf = after["retrieval"].inference_count - before["retrieval"].inference_count
    ret_exe = after["retrieval"].execution_count - before["retrieval"].execution_count
    if bls:  # one BLS call per recommend batch (one version), never one per user
        assert ret_inf == 64 and ret_exe <= rec_exe
    else:  # inline: recommend ran the graph itself, and Triton's retrieval saw nothing
        assert ret_inf == 0 and ret_exe == 0


@pytest.mark.skipif(available_cores() < 2, reason="one core: no instance can borrow another's")
def test_recommend_instances_hold_their_core_slots(served):
    # Both inline instances claimed a slot at start (serving/core_slots.py), so a third
    # claimant gets none: the wide sessions are live in the real server.
    folder = server_folder(layout.RECOMMEND, served.server.process.pid)
    assert sorted(p.name for p in folder.glob("claim-*")) == ["claim-0", "claim-1"]
    assert CoreSlots.claim(folder, 2).mine is None
    # Lone requests (the tests above) run wide; test_recommend_matches_in_process_onnx
    # checks that they answer what the graph answers.


def _retrieval_call(served) -> str:
    cfg = layout.read_config(served.repo / layout.RECOMMEND / layout.CONFIG_FILE)
    return resolve_retrieval_call(cfg.parameters["retrieval_call"].string_value, served.repo)


def _inp(mod, name, arr, dtype):
    t = mod.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _uid(n=1):
    return np.full((n, 1), 1000, dtype=np.int64)


# Cases named "(dtype)" send FP32 where the config declares an integer type: Triton refuses
# them before `recommend` runs, so a NaN (a float) can never reach `recommend` through
# user_id (INT64) or k (INT32, integer only: serving/repository.py). Where NaN can really
# arrive, the feedback model's FP32/FP64 inputs, see test_nan_in_*_is_quarantined_* below.
BAD_RECOMMEND = {
    "user_id as FP32 (dtype)": (
        "user_id",
        [("user_id", np.array([[1000.0]], np.float32), "FP32")],
    ),
    "user_id as FP32 NaN (dtype)": (
        "user_id",
        [("user_id", np.array([[np.nan]], np.float32), "FP32")],
    ),
    "k as FP32 (dtype)": (
        "'k'",
        [("user_id", _uid(), "INT64"), ("k", np.array([[3.0]], np.float32), "FP32")],
    ),
    "k as FP32 NaN (dtype)": (
        "'k'",
        [("user_id", _uid(), "INT64"), ("k", np.array([[np.nan]], np.float32), "FP32")],
    ),
    # no batch dimension: Triton refuses it ("has no shape but model requires batch dimension")
    "user_id scalar": ("user_id", [("user_id", np.array(1000, np.int64), "INT64")]),
    "wrong shape": ("user_id", [("user_id", np.array([[1000, 1001]], np.int64), "INT64")]),
    "missing input": ("user_id", [("k", np.array([[3]], np.int32), "INT32")]),
    "k zero": ("'k'", [("user_id", _uid(), "INT64"), ("k", np.array([[0]], np.int32), "INT32")]),
    "k negative": (
        "'k'",
        [("user_id", _uid(), "INT64"), ("k", np.array([[-2]], np.int32), "INT32")],
    ),
    "k above K": ("'k'", [("user_id", _uid(), "INT64"), ("k", None, "INT32")]),  # K + 1
    "k rows differ": (
        "user_id",
        [("user_id", _uid(2), "INT64"), ("k", np.array([[3]], np.int32), "INT32")],
    ),
    "empty batch": ("user_id", [("user_id", np.zeros((0, 1), np.int64), "INT64")]),
    # negative ids are refused at request time: the event log could not log the slate
    "user_id negative": ("user_id", [("user_id", np.array([[-1]], np.int64), "INT64")]),
    "user_id int64 min": (
        "user_id",
        [("user_id", np.array([[np.iinfo(np.int64).min]], np.int64), "INT64")],
    ),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(BAD_RECOMMEND))
def test_bad_recommend_input_names_the_input_and_server_keeps_serving(served, case, protocol):
    name, tensors = BAD_RECOMMEND[case]
    k_above = np.array([[served.exported.k + 1]], np.int32)
    tensors = [(n, k_above if a is None else a, d) for n, a, d in tensors]
    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(served.grpc_url if protocol == "grpc" else served.http_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("recommend", [_inp(mod, n, a, d) for n, a, d in tensors])
    assert name in err.value.message(), err.value.message()
    if case.endswith("(dtype)"):  # refused for its type, by Triton, not for its value
        assert "FP32" in err.value.message(), err.value.message()
    good = client.infer("recommend", [_inp(mod, "user_id", _uid(), "INT64")])
    assert (good.as_numpy("item_ids") >= 0).all()


def _post_json(served, body: bytes) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    url = f"http://{served.http_url}/v2/models/recommend/infer"
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_what_triton_and_recommend_decide_for_raw_http_json(served):
    """Pinned so a Triton upgrade that changes them is noticed (docs/operating.md, "The
    front proxy"): a k past INT32 arrives wrapped and recommend's message says so; malformed JSON is
    Triton's 500, which recommend never sees."""
    k_big = (
        b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":[1000]},'
        b'{"name":"k","shape":[1,1],"datatype":"INT32","data":[2147483648]}]}'
    )
    status, text = _post_json(served, k_big)
    assert status == 400 and "'k'" in text and "arrive wrapped" in text, text
    status, text = _post_json(served, b'{"inputs":[{"name":"user_id",')
    assert status == 500 and "JSON" in text, text
    status, _ = _post_json(
        served, b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":[1000]}]}'
    )
    assert status == 200


# ---------------------------------------------------------------------------- NaN at ingest


@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    """The `feedback` ingest model alone, on its own event log."""
    with ingest_only_server(tmp_path_factory.mktemp("ingest-nan")) as (server, log):
        yield server, log


# value is FP32 and ts FP64 on the wire (feedback.ingest.INPUTS): a float input carries NaN
# and ±inf to the model, so the model itself must refuse them, naming the field.
NON_FINITE = {
    "value NaN": ("value", np.nan, "value: missing"),
    "value +inf": ("value", np.inf, "value: not finite"),
    "value -inf": ("value", -np.inf, "value: not finite"),
    "ts NaN": ("ts", np.nan, "ts: missing"),
    "ts +inf": ("ts", np.inf, "ts: not finite"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_nan_in_a_feedback_float_is_quarantined_naming_the_field(ingest, case, protocol):
    server, log = ingest
    field, bad, reason = NON_FINITE[case]
    tag = f"{protocol}-{case.replace(' ', '_')}"
    ids = np.array([f"{tag}-ok-0", f"{tag}-bad", f"{tag}-ok-1"], dtype=object)
    values = np.array([1.0, 1.0, 1.0])
    ts = np.full(3, time.time())
    (values if field == "value" else ts)[1] = bad
    events = {
        "event_id": ids,
        "user_id": np.array([1, 2, 3]),
        "item_id": np.array([10, 20, 30]),
        "type": np.array(["click", "watch", "like"], dtype=object),
        "value": values,
        "ts": ts,
    }
    url = server.grpc_url if protocol == "grpc" else server.http_url
    res = send_interactions(url, events, protocol=protocol)
    assert res.failed_batches == 0, res.errors
    assert res.accepted.tolist() == [True, False, True]  # its batch-mates are stored
    assert res.reasons[1] == reason and res.reasons[1].startswith(f"{field}: ")
    source = open_source(log)
    stored = set(source.read(INTERACTION)["event_id"])
    assert {ids[0], ids[2]} <= stored and ids[1] not in stored  # never into the log
    q = source.quarantined()
    mine = q[q["payload"].str.contains(ids[1], regex=False)]
    assert mine["reason"].tolist() == [reason]


BAD_RETRIEVAL = {
    "user_index out of range": ("user_index", {"user_index": [[10**6]]}),
    "negative user_index": ("user_index", {"user_index": [[-1]]}),
    "history out of range": ("history", {"history": [[10**6] * 6]}),
    "negative category": ("user_cats", {"user_cats": [[0, -1, 0, 0]]}),
    "wrong user_cats width": ("user_cats", {"user_cats": [[0, 0, 0]]}),
}


@pytest.mark.parametrize("case", sorted(BAD_RETRIEVAL))
def test_bad_retrieval_input_fails_only_its_request(served, case):
    name, override = BAD_RETRIEVAL[case]
    good = {"user_index": [[0]], "user_cats": [[0, 0, 0, 0]], "history": [[0] * 6]}
    bad = {**good, **override}
    client = grpcclient.InferenceServerClient(served.grpc_url)

    def call(feeds):
        inputs = [
            _inp(grpcclient, n, np.asarray(v, dtype=np.int64), "INT64") for n, v in feeds.items()
        ]
        return client.infer("retrieval", inputs).as_numpy("item_ids")

    # Fired together so they share dynamic batches: the bad one must not sink the others.
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, bad if i == 3 else good) for i in range(16)]
    for i, f in enumerate(futures):
        if i == 3:
            with pytest.raises(InferenceServerException) as err:
                f.result()
            assert name in err.value.message(), err.value.message()
        else:
            assert f.result().shape == (
                1,
                layout.RetrievalDims.from_meta(layout.read_meta(served.repo, served.version)).k,
            )


def test_corrupt_version_fails_to_load_and_previous_keeps_serving(served):
    users = _users(served)
    with RecommenderClient(served.grpc_url) as client:
        before = client.recommend(users, k=5)
        good = layout.version_dir(served.repo, served.version)
        bad_version = max(layout.list_versions(served.repo)) + 1
        bad = layout.version_dir(served.repo, bad_version)
        staging = layout.make_staging_dir(bad.parent, "corrupt")
        for f in good.iterdir():
            if f.is_file():  # not the stub's __pycache__
                shutil.copyfile(f, staging / f.name)
        (staging / layout.ONNX_FILE).write_bytes(b"this is not an onnx graph" * 100)
        layout.publish_dir(staging, bad)
        # Complete otherwise (its online features too), so that Triton is what refuses it.
        shutil.copytree(
            layout.features_dir(served.repo, served.version),
            layout.features_dir(served.repo, bad_version),
        )
        try:
            with pytest.raises(ServerError, match="retrieval"):
                load_versions(served.grpc_url, served.repo, [served.version, bad_version])
            assert client.model_ready("retrieval", served.version)
            assert not client.model_ready("retrieval", bad_version)
            after = client.recommend(users, k=5)
        finally:
            shutil.rmtree(bad)
            shutil.rmtree(layout.features_dir(served.repo, bad_version))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.model_version == b.model_version == served.version


def test_canary_serves_a_hashed_share_of_users_without_downtime(served_each, tmp_path):
    served = served_each
    run2 = build_tiny_run(tmp_path / "run2", seed=1)
    res = export(
        ExportConfig(
            run=str(run2),
            repo=str(served.repo),
            k=served.exported.k,
            overfetch=served.exported.graph_k - served.exported.k,
            exporter="legacy",
            promote=False,
        )
    )
    prod = RoutingState.load(layout.routing_path(served.repo))
    assert prod.production == served.version and res.routing == prod
    canary = RoutingState(production=served.version, canary=res.version, canary_percent=50)
    users = np.arange(5000, 5200, dtype=np.int64)  # cold users: any id routes
    want = canary.version_for(users)
    assert 0 < (want == res.version).sum() < len(users)
    with _traffic(served) as errors:  # Triton reloads `retrieval` under load: nobody notices
        try:
            switch_routing(served.repo, canary, url=served.grpc_url)
            with RecommenderClient(served.grpc_url) as client:
                got = _versions_when(client, users, want)
            np.testing.assert_array_equal(got, want)
        finally:
            switch_routing(served.repo, prod, url=served.grpc_url)
        with RecommenderClient(served.grpc_url) as client:
            back = _versions_when(client, users, np.full(len(users), served.version))
    assert set(back.tolist()) == {served.version}
    assert errors == []
    config = layout.read_config(served.repo / "retrieval" / layout.CONFIG_FILE)
    assert layout.served_versions(config) == [served.version]


@contextlib.contextmanager
def _traffic(served):
    """Single-user requests in the background; yields the list of errors they hit."""
    errors, stop = [], threading.Event()

    def loop():
        with RecommenderClient(served.grpc_url) as client:
            while not stop.is_set():
                try:
                    client.recommend([1000], k=3)
                except Exception as exc:
                    errors.append(str(exc))
                time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(timeout=30)


def _versions_when(client, users, want, timeout_s=120.0):
    """recommend re-reads routing.json at most once a second: poll until it has (the
    timeout bounds a hang; on a loaded machine the re-read can take a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = np.array([r.model_version for r in client.recommend(users, k=2)])
        if np.array_equal(got, want) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_async_http_client_and_health(served):
    async def go():
        async with AsyncRecommenderClient(served.http_url, "http") as client:
            assert await client.is_live() and await client.is_ready()
            assert await client.model_ready("retrieval", served.version)
            (rec,) = await client.recommend(COLD_USER, k=4)
            stats = await client.statistics("recommend")
            return rec, stats

    rec, stats = asyncio.run(go())
    assert len(rec.item_ids) == 4 and rec.cold_start
    assert stats["1"].inference_count >= 1


def test_cli_recommend_prints_a_table_and_writes_parquet(served, tmp_path, capsys):
    import pandas as pd

    from northstar.cli import main

    assert (
        main(
            [
                "recommend",
                "--user",
                "1000",
                "--user",
                str(COLD_USER),
                "--k",
                "3",
                "--url",
                served.grpc_url,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1000" in out and str(COLD_USER) in out and "yes" in out
    assert main(["recommend", "--user", "1000", "--k", "0", "--url", served.grpc_url]) == 2
    assert "'k'" in capsys.readouterr().err
    out_file = tmp_path / "recs.parquet"
    assert (
        main(
            [
                "recommend",
                "--all-users",
                "--out",
                str(out_file),
                "--repo",
                str(served.repo),
                "--url",
                served.grpc_url,
                "--batch-size",
                "16",
                "--k",
                "4",
            ]
        )
        == 0
    )
    df = pd.read_parquet(out_file)
    snap = FeatureSnapshot.load(layout.features_path(served.repo, served.version))
    assert list(df.columns) == ["user_id", "rank", "item_id", "score"]
    assert set(df["user_id"]) == set(snap.user_ids.tolist())
    assert df.groupby("user_id")["rank"].max().max() == 4
    first = df[df["user_id"] == 1000].sort_values("rank")
    with RecommenderClient(served.grpc_url) as client:
        (rec,) = client.recommend(1000, k=4)
    np.testing.assert_array_equal(first["item_id"].to_numpy(), rec.item_ids)
