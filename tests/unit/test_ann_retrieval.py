"""ANN retrieval (models/ann.py): the search width is chosen by recall against exact search
at export, the prior rides inside the index, and a version below the floor is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models import ann
from models.compact_export import IndexConfig, write_ann
from models.export import ParityError, build_retrieval, parity_user_ids
from models.retrieval import TwoTowerRetrieval
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.inline import InlineRetrieval
from serving.publish import ExportConfig, export
from serving.recommender import Recommender
from serving.testing import build_tiny_run
from training.run import load_run

K = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_tiny_run(
        tmp_path_factory.mktemp("ann") / "run", n_items=1500, n_users=80, n_interactions=3000
    )


def _users(run):
    snap = FeatureSnapshot.load(run / "features.npz")
    users = parity_user_ids(snap, 64, 8)
    return snap.lookup(users), users


def _exact(module, feats):
    with torch.no_grad():
        ids, scores = module(
            *(torch.from_numpy(a) for a in (feats.user_index, feats.user_cats, feats.history))
        )
    return ids.numpy(), scores.numpy()


def _feeds(feats):
    return {"user_index": feats.user_index, "user_cats": feats.user_cats, "history": feats.history}


@pytest.mark.parametrize("mode", ["hnsw", "ivf"])
def test_search_width_is_the_smallest_that_meets_the_floor(run, tmp_path, mode):
    r = load_run(run)
    module = build_retrieval(r.model, r.vocab.item_ids, K)
    bias = torch.from_numpy(np.random.default_rng(1).random(len(module.raw_item_ids)) * 0.3)
    module = TwoTowerRetrieval(
        module.user_tower, module.item_embeddings, module.raw_item_ids, K, bias.float()
    ).eval()
    feats, users = _users(run)
    cfg = IndexConfig(min_recall=0.95, ef_search=(8, 16, 32, 64, 128), nprobe=(1, 2, 4, 8, 16, 32))
    info = write_ann(module, r.model.spec, tmp_path, feats, users, cfg, mode)
    assert info["recall"] >= 0.95 and info["with_bias"]
    tried = info["tried"]
    assert tried[-1][0] == info["search_value"] and all(rec < 0.95 for _, rec in tried[:-1])
    # Served through the files alone, as the stub does: the bias is part of the ranking.
    meta = {"graph_k": K, "index": info}
    ids, scores = ann.AnnSearch(tmp_path, meta).run(_feeds(feats))
    want_ids, want_scores = _exact(module, feats)
    recall = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids, want_ids, strict=True)])
    assert recall >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first, like the graph's TopK
    both = ids[:, :1] == want_ids[:, :1]  # where the best item agrees, so does its score
    np.testing.assert_allclose(scores[:, :1][both], want_scores[:, :1][both], atol=1e-5)


def test_recall_below_the_floor_names_the_widths_tried(run, tmp_path):
    r = load_run(run)
    module = build_retrieval(r.model, r.vocab.item_ids, K)
    feats, users = _users(run)
    cfg = IndexConfig(mode="ivf", nprobe=(1, 2), ivf_lists=64, min_recall=0.99)
    with pytest.raises(
        ParityError, match=r"ivf recall@20 .* \(nprobe=1: 0\.\d+, nprobe=2: 0\.\d+\)"
    ):
        write_ann(module, r.model.spec, tmp_path, feats, users, cfg, "ivf")


def test_export_refuses_a_low_recall_version_and_serves_a_good_one(run, tmp_path):
    repo = tmp_path / "repo"
    cfg = ExportConfig(run=str(run), repo=str(repo), k=10, overfetch=10, exporter="legacy")
    bad = IndexConfig(mode="ivf", nprobe=(1,), ivf_lists=64, min_recall=0.99)
    with pytest.raises(ParityError, match="refusing to write this version"):
        export(dataclasses.replace(cfg, index=bad))
    assert layout.list_versions(repo) == []
    assert not [p for p in layout.retrieval_dir(repo).iterdir() if p.name.startswith(".")]

    res = export(dataclasses.replace(cfg, index=IndexConfig(mode="hnsw")))
    vdir = layout.version_dir(repo, res.version)
    meta = layout.read_meta(repo, res.version)
    assert meta["index"]["mode"] == "hnsw" and meta["index"]["recall"] >= 0.95
    assert layout.incomplete_reasons(repo, res.version) == []
    (vdir / ann.INDEX_FILE).rename(vdir / "moved")
    assert layout.incomplete_reasons(repo, res.version) == [f"missing {vdir / ann.INDEX_FILE}"]
    (vdir / "moved").rename(vdir / ann.INDEX_FILE)

    # recommend, inline: the seen-item filter still applies to the ANN candidates.
    snap = FeatureSnapshot.load(layout.features_path(repo, res.version))
    users = snap.user_ids[:20]
    rec = Recommender(repo)
    rec.begin()
    parsed = [rec.parse(np.array([[u]], dtype=np.int64), None, rec.begin()) for u in users]
    out = rec.run(parsed, InlineRetrieval(repo))
    feats = snap.lookup(users)
    for i, result in enumerate(out.results):
        served = result.item_ids[0][result.item_ids[0] >= 0]
        assert len(served) == 10 and not set(served) & set(feats.seen[i].tolist())
        assert result.model_version[0, 0] == res.version


def test_a_probe_too_narrow_to_fill_a_row_is_searched_again_in_full():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    index = ann.build_index(items, "ivf", ivf_lists=50)
    ann.set_search_param(index, "ivf", 1)  # one list holds about 10 items, not 40
    labels, _scores = ann.search(index, "ivf", queries, 40)
    assert (labels >= 0).all()
    want = np.argsort(-(queries @ items.T), axis=1)[:, :40]
    np.testing.assert_array_equal(labels, want)  # the widened search is exhaustive
    assert ann._current(index, "ivf") == 1  # and the index keeps its tuned width
