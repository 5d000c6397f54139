"""The ranking-time popularity prior: beta = 0 is the old graph, beta > 0 is one Add that the
ONNX export carries with parity; beta is chosen on validation within the Gini gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models.export import build_retrieval, check_parity, export_onnx
from models.features import FeatureSpec
from models.prior import PopularityPrior
from models.retrieval import TwoTowerRetrieval
from models.snapshot import UserFeatures
from models.towers import TowerConfig, TwoTower
from training.popularity import choose_beta, plot_curve

SPEC = FeatureSpec(
    n_users=20,
    n_items=60,
    n_hash_buckets=4,
    history_len=5,
    user_cat_cardinalities=(3, 4),
    item_cat_cardinalities=(6, 3),
)
CFG = TowerConfig(id_dim=8, cat_dim=4, hidden_dim=16, out_dim=12)
RAW_IDS = np.arange(1000, 1000 + SPEC.n_items)
K = 10


def _model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(SPEC, CFG, item_cats=torch.randint(0, 3, (SPEC.n_items, 2))).eval()


def _inputs(b: int = 9) -> UserFeatures:
    g = torch.Generator().manual_seed(1)
    return UserFeatures(
        user_index=torch.randint(0, SPEC.user_rows, (b, 1), generator=g).numpy(),
        user_cats=torch.randint(0, 3, (b, 2), generator=g).numpy(),
        history=torch.randint(0, SPEC.n_items + 1, (b, SPEC.history_len), generator=g).numpy(),
        known=np.r_[np.ones(b - 2, bool), np.zeros(2, bool)],
        seen=[np.array([], np.int64)] * b,
    )


def _tensors(f: UserFeatures):
    return tuple(torch.from_numpy(a) for a in (f.user_index, f.user_cats, f.history))


def _bias(beta: float) -> torch.Tensor:
    counts = np.random.default_rng(2).lognormal(2.0, 1.5, SPEC.n_items).round()
    return torch.from_numpy((beta * np.log1p(counts)).astype(np.float32))


def _ops(path) -> list[str]:
    return sorted(n.op_type for n in onnx.load(str(path)).graph.node)


def test_beta_zero_is_the_old_graph(tmp_path):
    model = _model()
    model.set_prior(PopularityPrior(0.05), _bias(0.05))
    model.set_prior(PopularityPrior(0.0), _bias(0.05))  # beta 0: off, bias zeroed
    assert model.prior is None and not model.item_bias.any()
    module = build_retrieval(model, RAW_IDS, K)
    old = TwoTowerRetrieval(model.user_tower, model.item_embeddings(), torch.from_numpy(RAW_IDS), K)
    assert module.item_bias is None and "item_bias" not in module.state_dict()
    assert module.state_dict().keys() == old.state_dict().keys()
    x = _tensors(_inputs())
    with torch.no_grad():
        plain = model.user_embed(*x) @ model.item_embeddings().T
        ids, scores = module(*x)
        old_ids, old_scores = old(*x)
    assert torch.equal(module.scores(*x), plain)
    assert torch.equal(ids, old_ids) and torch.equal(scores, old_scores)
    export_onnx(module, SPEC, tmp_path / "new.onnx", exporter="legacy")
    export_onnx(old, SPEC, tmp_path / "old.onnx", exporter="legacy")
    assert _ops(tmp_path / "new.onnx") == _ops(tmp_path / "old.onnx")


def test_beta_above_zero_adds_the_bias_in_the_graph_and_passes_parity(tmp_path):
    model = _model()
    bias = _bias(0.5)
    model.set_prior(PopularityPrior(0.5, "7d"), bias)
    module = build_retrieval(model, RAW_IDS, K)
    f = _inputs()
    x = _tensors(f)
    with torch.no_grad():
        plain = model.user_embed(*x) @ model.item_embeddings().T
        assert torch.allclose(module.scores(*x), plain + bias)
        ids, _ = module(*x)
    plain_ids = RAW_IDS[plain.topk(K, dim=1).indices.numpy()]
    assert (ids.numpy() != plain_ids).any()  # the prior changes the lists
    path = tmp_path / "prior.onnx"
    export_onnx(module, SPEC, path, exporter="legacy")
    graph = onnx.load(str(path)).graph
    ops = _ops(path)
    plain_module = build_retrieval(_model(), RAW_IDS, K)
    export_onnx(plain_module, SPEC, tmp_path / "plain.onnx", exporter="legacy")
    assert len(ops) == len(_ops(tmp_path / "plain.onnx")) + 1 and "Add" in ops
    assert any(tuple(i.dims) == (SPEC.n_items,) for i in graph.initializer)
    report = check_parity(module, path, f, np.arange(len(f.known)))
    assert report.max_score_diff <= 1e-4 and report.cold_users == 2


def test_a_state_dict_from_before_the_prior_still_loads():
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k != "item_bias"}
    again = TwoTower(SPEC, CFG, item_cats=model.item_cats)
    again.item_bias.fill_(3.0)
    again.load_state_dict(state)
    assert not again.item_bias.any() and again.prior is None


def test_the_prior_bias_counts_only_the_recent_window():
    items = np.array([0, 0, 0, 1, 2, 2])
    ts = np.array([0, 1, 2, 10 * 86_400, 10 * 86_400 + 5, 10 * 86_400 + 9])
    bias = PopularityPrior(0.1, "1d").bias(items, ts, 4)
    np.testing.assert_allclose(bias, 0.1 * np.log1p([0, 1, 2, 0]), rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        PopularityPrior(-1.0)


def test_beta_is_the_best_validation_point_within_the_gini_gate(tmp_path):
    curve = [
        {"beta": 0.0, "ndcg@10": 0.10, "arp@10": 10.0, "exposure_gini@10": 0.70},
        {"beta": 0.01, "ndcg@10": 0.12, "arp@10": 20.0, "exposure_gini@10": 0.80},
        {"beta": 0.02, "ndcg@10": 0.12, "arp@10": 25.0, "exposure_gini@10": 0.85},
        {"beta": 0.05, "ndcg@10": 0.15, "arp@10": 40.0, "exposure_gini@10": 0.97},
    ]
    assert choose_beta(curve, None)[0] == 0.05
    assert choose_beta(curve, 0.95)[0] == 0.01  # 0.05 breaks the gate; the tie goes to 0.01
    beta, why = choose_beta(curve, 0.5)
    assert beta == 0.0 and "prior off" in why
    path = plot_curve(curve, 0.01, tmp_path / "curve.png", 0.95)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_keeps_its_prior(tmp_path):
    import pandas as pd

    from models.features import FeatureVocab
    from training.run import load_run, save_run

    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "gender": ["F", "M"],
            "age_bucket": ["25-34"] * 2,
            "activity": ["high"] * 2,
            "occupation": ["unknown"] * 2,
        }
    )
    items = pd.DataFrame({"item_id": [5, 6, 7], "genre": "g", "provider": "p"})
    inter = pd.DataFrame({"user_id": [1, 2, 2], "item_id": [5, 6, 7], "timestamp": [1, 2, 3]})
    vocab = FeatureVocab.fit(users, items, inter, n_hash_buckets=2, history_len=2)
    model = TwoTower(vocab.spec, CFG, torch.zeros(3, len(vocab.spec.item_cat_cardinalities)))
    model.set_prior(PopularityPrior(0.02, "10%"), torch.tensor([0.1, 0.0, 0.3]))
    save_run(tmp_path, model, vocab, {})
    run = load_run(tmp_path)
    assert run.model.prior == PopularityPrior(0.02, "10%")
    assert run.model.item_bias.tolist() == pytest.approx([0.1, 0.0, 0.3])
    assert build_retrieval(run.model, vocab.item_ids, 2).item_bias is not None
