"""The sequential user tower (`TowerConfig.user_encoder = "sequence"`): one ONNX graph with a
dynamic batch that passes the parity check, finite for a cold user's empty history, blind to
padding, and causal (a position never reads a newer item)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from common import config as config_mod
from models.export import build_retrieval, check_parity, export_onnx, run_onnx
from models.features import INPUT_HISTORY, INPUT_NAMES, FeatureSpec
from models.onnx_session import onnx_session
from models.snapshot import UserFeatures
from models.towers import TowerConfig, TwoTower

SPEC = FeatureSpec(
    n_users=20,
    n_items=60,
    n_hash_buckets=4,
    history_len=6,
    user_cat_cardinalities=(3, 4),
    item_cat_cardinalities=(6, 3),
)
CFG = TowerConfig(id_dim=8, cat_dim=4, hidden_dim=16, out_dim=12, user_encoder="sequence")
RAW_IDS = np.arange(1000, 1000 + SPEC.n_items)
K = 10


def _model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(SPEC, CFG, item_cats=torch.randint(0, 3, (SPEC.n_items, 2))).eval()


def _histories(b: int, g: torch.Generator) -> torch.Tensor:
    """(b, H) as the feature code builds them: newest first, lengths 0..H, padding trailing."""
    hist = torch.randint(1, SPEC.n_items + 1, (b, SPEC.history_len), generator=g)
    lengths = torch.arange(b) % (SPEC.history_len + 1)
    return torch.where(torch.arange(SPEC.history_len)[None] < lengths[:, None], hist, 0)


def _inputs(b: int = 14) -> UserFeatures:
    g = torch.Generator().manual_seed(1)
    return UserFeatures(
        user_index=torch.randint(0, SPEC.user_rows, (b, 1), generator=g).numpy(),
        user_cats=torch.randint(0, 3, (b, 2), generator=g).numpy(),
        history=_histories(b, g).numpy(),
        known=np.r_[np.ones(b - 3, bool), np.zeros(3, bool)],
        seen=[np.array([], np.int64)] * b,
    )


def _tensors(f: UserFeatures):
    return tuple(torch.from_numpy(a) for a in (f.user_index, f.user_cats, f.history))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    module = build_retrieval(model, RAW_IDS, K)
    path = tmp_path_factory.mktemp("seq") / "model.onnx"
    exporter = export_onnx(module, SPEC, path)
    return model, module, path, exporter


def test_exports_one_graph_with_a_dynamic_batch_and_passes_parity(exported):
    _, module, path, exporter = exported
    assert exporter == "dynamo"  # not the legacy fallback
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES)
    history = next(i for i in graph.input if i.name == INPUT_HISTORY)
    dims = history.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_value == SPEC.history_len
    feats = _inputs()
    rep = check_parity(module, path, feats, np.arange(len(feats.known)))
    assert rep.max_score_diff <= 1e-4 and rep.cold_users == 3 and rep.provider.startswith("CPU")
    # More batch sizes than check_parity's two: each row alone is the row in the batch.
    session = onnx_session(path)
    feeds = dict(zip(INPUT_NAMES, (feats.user_index, feats.user_cats, feats.history), strict=True))
    _, batch_scores = run_onnx(session, feeds)
    for r in (0, 5, 13):
        _, one = run_onnx(session, {n: v[r : r + 1] for n, v in feeds.items()})
        np.testing.assert_allclose(one[0], batch_scores[r], atol=1e-5)


def test_an_empty_history_gives_finite_scores_in_torch_and_onnx(exported):
    model, module, path, _ = exported
    b = 4
    feeds = {
        "user_index": np.arange(b, dtype=np.int64)[:, None] + SPEC.n_users,  # hashed rows
        "user_cats": np.zeros((b, 2), np.int64),
        "history": np.zeros((b, SPEC.history_len), np.int64),
    }
    with torch.no_grad():
        user = model.user_embed(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES))
        scores = module.scores(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES))
    assert torch.isfinite(user).all() and torch.isfinite(scores).all()
    ids, onnx_scores = run_onnx(onnx_session(path), feeds)
    assert np.isfinite(onnx_scores).all() and np.isin(ids, RAW_IDS).all()


def test_the_output_does_not_depend_on_padding():
    model = _model()
    uid, cats, hist = _tensors(_inputs())
    n = 3
    short = hist[:, :n].clone()  # the same items with H - n fewer padding slots
    rows = (hist[:, n:] == 0).all(dim=1)  # users whose whole history fits in n slots
    assert rows.sum() >= 4
    with torch.no_grad():
        full = model.user_embed(uid, cats, hist)[rows]
        cut = model.user_embed(uid, cats, short)[rows]
    torch.testing.assert_close(full, cut, atol=1e-6, rtol=0)


def test_a_position_never_reads_a_newer_item():
    enc = _model().user_tower.sequence
    emb = _model().user_tower.history_emb
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(1, SPEC.n_items + 1, (5, SPEC.history_len), generator=g)
    newer = hist.clone()
    newer[:, 0] = (hist[:, 0] % SPEC.n_items) + 1  # only the newest item changes
    with torch.no_grad():
        a = enc.encode(emb(hist), hist > 0)
        b = enc.encode(emb(newer), newer > 0)
    torch.testing.assert_close(a[:, 1:], b[:, 1:], atol=1e-6, rtol=0)  # older positions
    assert not torch.allclose(a[:, 0], b[:, 0])  # the newest position reads it
    # ... and the tower's output is the newest position's, so it does see every item.
    older = hist.clone()
    older[:, -1] = (hist[:, -1] % SPEC.n_items) + 1
    with torch.no_grad():
        c = enc(emb(older), older > 0)
        assert not torch.allclose(enc(emb(hist), hist > 0), c)


def test_the_served_shortcut_is_the_newest_position_of_the_full_encoder():
    """forward() runs the last block for the newest query only; encode() runs every position."""
    enc = _model().user_tower.sequence
    emb = _model().user_tower.history_emb
    hist = _histories(14, torch.Generator().manual_seed(4))
    leading = torch.cat([torch.zeros(3, 2, dtype=torch.long), hist[-3:, :-2]], dim=1)
    with torch.no_grad():
        full = enc.encode(emb(hist), hist > 0)
        torch.testing.assert_close(enc(emb(hist), hist > 0), full[:, 0], atol=1e-5, rtol=0)
        # A hand-made request with leading padding: its newest item is at position 2.
        got = enc(emb(leading), leading > 0)
        want = enc.encode(emb(leading), leading > 0)[:, 2]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_encoder_is_a_config_choice():
    cfg = config_mod.build(
        TowerConfig, {"user_encoder": "sequence", "seq_layers": "1", "seq_heads": "4"}
    )
    assert cfg.user_encoder == "sequence" and cfg.seq_layers == 1 and cfg.seq_heads == 4
    with pytest.raises(ValueError):
        config_mod.build(TowerConfig, {"user_encoder": "rnn"})
    with pytest.raises(ValueError):
        TowerConfig(id_dim=10, user_encoder="sequence", seq_heads=4)
    # "mean" keeps the old module: same parameters, so old runs and checkpoints load.
    mean = TwoTower(SPEC, TowerConfig(), item_cats=torch.zeros(SPEC.n_items, 2, dtype=torch.long))
    assert mean.user_tower.sequence is None
    assert not any(k.startswith("user_tower.sequence") for k in mean.state_dict())


def test_tune_searches_the_encoder_and_mean_checkpoints_still_resume(tmp_path):
    import optuna

    from training.train import TrainConfig, _Resume
    from training.tune import TuneConfig, _suggest

    base = TrainConfig(epochs=3)
    fixed = {"lr": 1e-3, "temperature": 0.05, "tower.id_dim": 32, "tower.out_dim": 32}
    fixed |= {"epochs": 2, "prior_beta": 0.0, "tower.user_encoder": "sequence"}
    fixed |= {"tower.dropout": 0.2, "logit_adjustment": 0.5, "tower.time_gaps": False}
    cfg, params = _suggest(optuna.trial.FixedTrial(fixed), base, TuneConfig(out=str(tmp_path)))
    assert cfg.tower.user_encoder == params["tower.user_encoder"] == "sequence"
    with pytest.raises(ValueError):
        TuneConfig(user_encoders=("mean", "lstm"))
    # A "mean" run's checkpoint fingerprint is the one written before the option existed.
    assert "user_encoder" not in _Resume(tmp_path, base).fingerprint
    assert "time_gaps" not in _Resume(tmp_path, cfg).fingerprint  # off: as before the option
    assert '"user_encoder": "sequence"' in _Resume(tmp_path, cfg).fingerprint
