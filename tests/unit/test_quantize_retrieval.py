"""int8 item tables (models/quantize.py): same answers as fp32 where the catalogue allows it,
and a version whose top-K the int8 pass scrambles is refused at export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.compact_export import IndexConfig, check_overlap, choose_mode, write_int8
from models.export import ParityError, build_retrieval, parity_user_ids
from models.onnx_session import onnx_session
from models.quantize import quantize_columns
from models.retrieval import TwoTowerRetrieval
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.backend import RetrievalRunner
from serving.publish import ExportConfig, export
from serving.testing import build_tiny_run
from training.run import load_run, save_run

K = 20  # the graph's k


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_tiny_run(
        tmp_path_factory.mktemp("q") / "run", n_items=1500, n_users=80, n_interactions=3000
    )


def _users(run):
    snap = FeatureSnapshot.load(run / "features.npz")
    users = parity_user_ids(snap, 64, 8)
    return snap.lookup(users), users


def _with_prior(module: TwoTowerRetrieval) -> TwoTowerRetrieval:
    bias = torch.from_numpy(np.random.default_rng(3).random(len(module.raw_item_ids)) * 0.2)
    return TwoTowerRetrieval(
        module.user_tower, module.item_embeddings, module.raw_item_ids, module.k, bias.float()
    ).eval()


def test_columns_round_trip_within_half_a_step():
    table = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    table[:, 3] = 0.0  # an all-zero column stays zero
    q, scale = quantize_columns(table)
    assert q.dtype == np.int8 and scale.shape == (16,)
    back = q.astype(np.float32) * scale[None, :]
    assert np.all(np.abs(back - table) <= scale[None, :] / 2 + 1e-7)
    assert not q[:, 3].any()


@pytest.mark.parametrize("prior", [False, True])
def test_planted_catalogue_passes_with_fp32_scores(run, tmp_path, prior):
    r = load_run(run)
    module = build_retrieval(r.model, r.vocab.item_ids, K)
    module = _with_prior(module) if prior else module
    feats, users = _users(run)
    report, info = write_int8(module, r.model.spec, tmp_path, feats, users, IndexConfig())
    assert info["mode"] == "int8" and info["overlap_mean"] >= 0.99
    assert report.max_score_diff <= 1e-4  # rescored in fp32: the scores are fp32's
    session = onnx_session(tmp_path / "model.onnx")
    ids, scores = session.run(
        ["item_ids", "scores"],
        {"user_index": feats.user_index, "user_cats": feats.user_cats, "history": feats.history},
    )
    with torch.no_grad():
        want_ids, want_scores = module(
            *(torch.from_numpy(a) for a in (feats.user_index, feats.user_cats, feats.history))
        )
    assert np.mean(ids == want_ids.numpy()) >= 0.99
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=1e-4)


def _near_identical_items(run, dest):
    """A run whose items all sit within 1e-4 of one vector: int8 cannot tell them apart."""
    r = load_run(run)
    last = r.model.item_tower.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(1e-4)
        last.bias.copy_(torch.linspace(-1, 1, last.bias.numel()))
    meta = json.loads((run / "run.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("tower", "spec", "popularity_prior")}
    save_run(dest, r.model, r.vocab, meta)
    (dest / "features.npz").write_bytes((run / "features.npz").read_bytes())
    return dest


def test_scrambled_top_k_names_the_overlap(run, tmp_path):
    bad = _near_identical_items(run, tmp_path / "bad")
    r = load_run(bad)
    module = build_retrieval(r.model, r.vocab.item_ids, K)
    feats, users = _users(bad)
    with pytest.raises(ParityError, match=r"mean top-20 overlap with fp32 0\.\d+ < 0\.99"):
        write_int8(module, r.model.spec, tmp_path, feats, users, IndexConfig(rerank=0))
    # The same graph, checked directly: the numbers come back in the message.
    with pytest.raises(ParityError, match="worst user"):
        check_overlap(module, tmp_path / "model.onnx", feats, users, exact_scores=False)


def test_export_refuses_the_version_and_leaves_nothing(run, tmp_path):
    bad = _near_identical_items(run, tmp_path / "bad")
    repo = tmp_path / "repo"
    cfg = ExportConfig(run=str(bad), repo=str(repo), k=10, overfetch=10, exporter="legacy")
    with pytest.raises(ParityError, match="refusing to write this version"):
        export(dataclasses.replace(cfg, index=IndexConfig(mode="int8", rerank=0)))
    assert layout.list_versions(repo) == []
    assert not [p for p in layout.retrieval_dir(repo).iterdir() if p.name.startswith(".")]
    # The good run exports as int8, and the cpu runners serve its graph as they serve fp32's.
    res = export(dataclasses.replace(cfg, run=str(run), index=IndexConfig(mode="int8")))
    meta = layout.read_meta(repo, res.version)
    assert meta["index"]["mode"] == "int8" and meta["index"]["overlap_mean"] >= 0.99
    feats, _ = _users(run)
    runner = RetrievalRunner(layout.version_dir(repo, res.version))
    ((ids, _scores),) = runner.run(
        [{"user_index": feats.user_index, "user_cats": feats.user_cats, "history": feats.history}]
    )
    assert ids.shape == (len(feats.known), 20)


def test_auto_picks_by_catalogue_size_and_target():
    cfg = IndexConfig(int8_from_items=1000, ann_from_items=5000)
    assert choose_mode(cfg, 999, "cpu") == "exact"
    assert choose_mode(cfg, 1000, "cpu") == "int8"
    assert choose_mode(cfg, 5000, "cpu") == "ivf"
    assert choose_mode(IndexConfig(ann_mode="hnsw", ann_from_items=10), 10**6, "cpu") == "hnsw"
    assert choose_mode(cfg, 10**7, "gpu") == "exact"
    with pytest.raises(ValueError, match="cpu target"):
        choose_mode(IndexConfig(mode="int8"), 10, "gpu")
    with pytest.raises(ValueError, match=r"index\.mode"):
        IndexConfig(mode="pq")
