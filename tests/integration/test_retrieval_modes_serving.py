"""int8 and HNSW versions on a real tritonserver: `recommend` answers over gRPC and HTTP what
exact search answers in-process, the seen-item filter included, and `retrieval` (the Python
model batched clients call) serves the HNSW version from its faiss index in the stub."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.compact_export import IndexConfig
from models.export import build_retrieval
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.client import RecommenderClient
from serving.control import switch_routing
from serving.inline import InlineRetrieval
from serving.publish import ExportConfig, export
from serving.recommender import select_unseen
from serving.routing import RoutingState
from serving.server import ServerConfig, TritonServer
from serving.testing import build_tiny_run
from training.run import load_run

pytestmark = pytest.mark.integration

K = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    run = build_tiny_run(root / "run", n_items=1500, n_users=80, n_interactions=3000)
    repo = root / "model_repository"
    cfg = ExportConfig(run=str(run), repo=str(repo), k=10, overfetch=10, exporter="legacy")
    int8 = export(dataclasses.replace(cfg, index=IndexConfig(mode="int8")))
    hnsw = export(dataclasses.replace(cfg, index=IndexConfig(mode="hnsw"), promote=False))
    # Half the users on each: one server answers from both kinds of version.
    switch_routing(
        repo, RoutingState(production=int8.version, canary=hnsw.version, canary_percent=50)
    )
    server = TritonServer(
        ServerConfig.on_free_ports(str(repo), log_file=str(root / "tritonserver.log"))
    )
    server.start()
    try:
        yield run, repo, server, {int8.version: "int8", hnsw.version: "hnsw"}
    finally:
        server.stop()


def _exact(run, repo, users, k):
    """Exact fp32 search in-process (PyTorch), then the same unseen filter."""
    r = load_run(run)
    snap = FeatureSnapshot.load(layout.features_path(repo, 1))
    feats = snap.lookup(np.asarray(users))
    module = build_retrieval(r.model, r.vocab.item_ids, 20)
    with torch.no_grad():
        ids, scores = module(
            *(torch.from_numpy(a) for a in (feats.user_index, feats.user_cats, feats.history))
        )
    ks = np.full(len(users), k, dtype=np.int64)
    out_ids, out_scores, counts = select_unseen(ids.numpy(), scores.numpy(), feats.seen, ks)
    return feats, out_ids, out_scores, counts


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_compact_versions_answer_what_exact_search_answers(served, protocol):
    run, repo, server, kinds = served
    snap = FeatureSnapshot.load(layout.features_path(repo, 1))
    users = [int(u) for u in snap.user_ids[:40]]
    feats, want_ids, want_scores, counts = _exact(run, repo, users, K)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with RecommenderClient(url, protocol) as client:
        recs = client.recommend(users, k=K)
    inline = InlineRetrieval(repo)
    by_kind = {"int8": 0, "hnsw": 0}
    overlaps = []
    for i, r in enumerate(recs):
        by_kind[kinds[r.model_version]] += 1
        assert not set(r.item_ids) & set(feats.seen[i].tolist()), "a seen item was served"
        # What this version's own runner answers in-process, exactly.
        one = snap.lookup(np.array([users[i]]))
        ids, scores = inline(r.model_version, one)
        mine, mine_scores, n = select_unseen(ids, scores, one.seen, np.array([K]))
        np.testing.assert_array_equal(r.item_ids, mine[0, : n[0]])
        np.testing.assert_allclose(r.scores, mine_scores[0, : n[0]], rtol=0, atol=1e-5)
        # Against exact search: the same items, and the fp32 score for every shared item.
        exact = dict(zip(want_ids[i, : counts[i]], want_scores[i, : counts[i]], strict=True))
        overlaps.append(len(set(r.item_ids) & set(exact)) / K)
        for item, score in zip(r.item_ids, r.scores, strict=True):
            if item in exact:
                assert abs(score - exact[item]) <= 1e-5
    assert by_kind["int8"] and by_kind["hnsw"], by_kind
    assert np.mean(overlaps) >= 0.95


def test_retrieval_model_serves_the_hnsw_version_from_its_index(served):
    _run, repo, server, kinds = served
    hnsw = next(v for v, kind in kinds.items() if kind == "hnsw")
    snap = FeatureSnapshot.load(layout.features_path(repo, hnsw))
    feats = snap.lookup(snap.user_ids[:16])
    with RecommenderClient(server.grpc_url) as client:
        ids, scores = client.retrieve(
            feats.user_index, feats.user_cats, feats.history, version=hnsw
        )
    want_ids, want_scores = InlineRetrieval(repo)(hnsw, feats)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
