"""A sequence tower that reads time gaps, exported and served by a real tritonserver: its graph
takes a fourth input (`history_ts`), `recommend` feeds it from the snapshot on both paths to
`retrieval` (inline and BLS), and a direct `retrieval` call without it is refused with the
input's name while the server keeps serving."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from models.features import INPUT_HISTORY_TS, INPUT_NAMES, input_names
from models.onnx_session import onnx_session
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.client import RecommenderClient
from serving.publish import ExportConfig, export
from serving.recommender import select_unseen
from serving.server import ServerConfig, TritonServer
from serving.testing import TINY_TOWER, build_tiny_run

pytestmark = pytest.mark.integration

K = 5
TOWER = dataclasses.replace(TINY_TOWER, user_encoder="sequence", seq_heads=2, time_gaps=True)
COLD_USER = 10**12 + 7


@pytest.fixture(scope="module", params=["inline", "bls"])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"time-gaps-{request.param}")
    run = build_tiny_run(root / "run", tower=TOWER)
    repo = root / "model_repository"
    res = export(
        ExportConfig(
            run=str(run),
            repo=str(repo),
            k=K,
            overfetch=K,
            exporter="legacy",
            recommend=layout.RecommendServing(retrieval_call=request.param),
        )
    )
    server = TritonServer(
        ServerConfig.on_free_ports(str(repo), log_file=str(root / "tritonserver.log"))
    ).start()
    try:
        yield repo, res.version, server
    finally:
        server.stop()


def _expected(repo, version, users):
    snap = FeatureSnapshot.load(layout.features_path(repo, version))
    feats = snap.lookup(np.asarray(users))
    session = onnx_session(layout.version_dir(repo, version) / layout.ONNX_FILE)
    ids, scores = session.run(["item_ids", "scores"], feats.feeds(input_names(True)))
    return feats, ids, scores


def test_the_version_declares_and_the_config_serves_four_inputs(served):
    repo, version, _ = served
    assert list(layout.read_meta(repo, version)["inputs"]) == list(input_names(True))
    cfg = layout.read_config(repo / layout.RETRIEVAL / layout.CONFIG_FILE)
    assert [t.name for t in cfg.input] == [*INPUT_NAMES, INPUT_HISTORY_TS]
    assert layout.config_dims(cfg).history_ts


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_recommend_feeds_the_history_timestamps(served, protocol):
    repo, version, server = served
    snap = FeatureSnapshot.load(layout.features_path(repo, version))
    # Users with two or more items have gaps; the snapshot keeps their real timestamps.
    users = [int(u) for u in snap.user_ids[:10]] + [COLD_USER]
    feats, ids, scores = _expected(repo, version, users)
    assert (feats.history_ts[:, 1] > 0).sum() >= 5
    out_ids, out_scores, counts = select_unseen(ids, scores, feats.seen, np.full(len(users), K))
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with RecommenderClient(url, protocol) as client:
        recs = client.recommend(users, k=K)
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(r.item_ids, out_ids[i, : counts[i]])
        np.testing.assert_allclose(r.scores, out_scores[i, : counts[i]], rtol=0, atol=1e-6)
        assert r.model_version == version and r.cold_start == (not feats.known[i])
    # The timestamps matter: the same users with every gap erased score differently.
    flat = feats.feeds(input_names(True))
    flat[INPUT_HISTORY_TS] = np.zeros_like(flat[INPUT_HISTORY_TS])
    session = onnx_session(layout.version_dir(repo, version) / layout.ONNX_FILE)
    _, flat_scores = session.run(["item_ids", "scores"], flat)
    assert not np.allclose(flat_scores[:10], scores[:10], atol=1e-4)


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_retrieval_without_history_ts_is_refused_by_name_and_serving_goes_on(served, mod):
    repo, version, server = served
    users = [int(u) for u in FeatureSnapshot.load(layout.features_path(repo, version)).user_ids[:4]]
    feats, ids, _ = _expected(repo, version, users)
    url = server.grpc_url if mod is grpcclient else server.http_url
    client = mod.InferenceServerClient(url)

    def infer(names):
        feeds = feats.feeds(names)
        inputs = []
        for n in names:
            t = mod.InferInput(n, list(feeds[n].shape), "INT64")
            t.set_data_from_numpy(feeds[n])
            inputs.append(t)
        return client.infer(layout.RETRIEVAL, inputs, model_version=str(version))

    with pytest.raises(InferenceServerException, match="history_ts"):
        infer(INPUT_NAMES)
    r = infer(input_names(True))
    np.testing.assert_array_equal(r.as_numpy("item_ids"), ids)
    with RecommenderClient(server.grpc_url) as rc:  # the typed client passes it through
        got, _ = rc.retrieve(
            feats.user_index, feats.user_cats, feats.history, history_ts=feats.history_ts
        )
    np.testing.assert_array_equal(got, ids)
