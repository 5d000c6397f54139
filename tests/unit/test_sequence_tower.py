"""The sequential user tower (`TowerConfig.user_encoder = "sequence"`): one ONNX graph with a
dynamic batch that passes the parity check, finite for a cold user's empty history, blind to
padding, and causal (a position never reads a newer item).

With time gaps (`TowerConfig.time_gaps`): the bucketing, a fourth graph input that only such
graphs take, parity through ONNX, invariance to the clock (only the spacing of a user's own
items counts), and the timestamps travelling from the training log and snapshots to the
graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from common import config as config_mod
from models.export import build_retrieval, check_parity, export_onnx, run_onnx
from models.features import (
    INPUT_HISTORY,
    INPUT_HISTORY_TS,
    INPUT_NAMES,
    FeatureSpec,
    FeatureVocab,
    graph_input_names,
    input_names,
)
from models.onnx_session import onnx_session
from models.sequence import GAP_BUCKETS, gap_buckets
from models.snapshot import FeatureSnapshot, UserFeatures
from models.towers import TowerConfig, TwoTower
from training.data import TrainingExamples

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
GAP_CFG = dataclasses.replace(CFG, time_gaps=True)


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


T0 = 1_700_000_000


def _gap_model(cfg: TowerConfig = GAP_CFG) -> TwoTower:
    torch.manual_seed(0)
    model = TwoTower(SPEC, cfg, item_cats=torch.randint(0, 3, (SPEC.n_items, 2)))
    with torch.no_grad():  # a visible gap signal: trained gap embeddings are not near zero
        if model.user_tower.sequence.gap_emb is not None:
            model.user_tower.sequence.gap_emb.weight.mul_(5.0)
    return model.eval()


def _timed_features(b: int = 14, seed: int = 1) -> UserFeatures:
    """Histories as the feature code builds them (newest first, padding trailing) with
    timestamps ten minutes to weeks apart."""
    rng = np.random.default_rng(seed)
    h = SPEC.history_len
    lengths = np.arange(b) % (h + 1)
    valid = np.arange(h)[None] < lengths[:, None]
    history = np.where(valid, rng.integers(1, SPEC.n_items + 1, (b, h)), 0)
    gaps = rng.choice([600, 7_200, 86_400, 20 * 86_400], size=(b, h))
    ts = T0 - np.cumsum(gaps, axis=1)  # newest first: each older item earlier
    return UserFeatures(
        user_index=rng.integers(0, SPEC.user_rows, (b, 1)),
        user_cats=rng.integers(0, 3, (b, 2)),
        history=history,
        known=np.r_[np.ones(b - 3, bool), np.zeros(3, bool)],
        seen=[np.array([], np.int64)] * b,
        history_ts=np.where(valid, ts, 0),
    )


def _embed(model: TwoTower, f: UserFeatures) -> torch.Tensor:
    feeds = f.feeds(model.user_tower.input_names)
    with torch.no_grad():
        return model.user_embed(*(torch.from_numpy(feeds[n]) for n in feeds))


def test_gap_buckets_are_log2_minutes_between_a_users_consecutive_items():
    minute = 60
    ts = torch.tensor(
        [
            # newest first; gaps of 0 s, 1 min, 3 min, 1 day, then the oldest (gap unknown)
            [T0, T0, T0 - minute, T0 - 4 * minute, T0 - 4 * minute - 86_400, T0 - 10**6],
            # a short history: padding (0) has no gap, nor does the oldest real item
            [T0, T0 - 10**9, 0, 0, 0, 0],
        ]
    )
    got = gap_buckets(ts).tolist()
    # 0 s -> 1; 1 min -> 1 + floor(log2 2) = 2; 3 min -> 1 + 2 = 3; 1 day (1440 min) -> 1 + 10
    assert got[0][:4] == [1, 2, 3, 11]
    assert got[0][5] == 0  # the oldest item in the window: its predecessor is not in it
    assert got[1] == [GAP_BUCKETS - 1, 0, 0, 0, 0, 0]  # ~31 years: the capped last bucket
    # A clock that steps backwards (out-of-order writes) is a gap of 0, never negative.
    assert gap_buckets(torch.tensor([[T0 - 5, T0, 0]])).tolist() == [[1, 0, 0]]


def test_only_time_gap_towers_take_the_fourth_input():
    assert input_names(False) == INPUT_NAMES
    assert input_names(True) == (*INPUT_NAMES, INPUT_HISTORY_TS)
    assert _gap_model().user_tower.input_names == input_names(True)
    assert _gap_model(TowerConfig(user_encoder="sequence")).user_tower.input_names == INPUT_NAMES
    # Versions published before time gaps existed have three inputs in their meta.json.
    assert graph_input_names({"inputs": dict.fromkeys(INPUT_NAMES)}) == INPUT_NAMES
    assert graph_input_names({}) == INPUT_NAMES
    with pytest.raises(ValueError, match="time_gaps"):
        TowerConfig(time_gaps=True)  # the mean encoder has no positions to give gaps to
    with pytest.raises(ValueError, match="history_ts"):
        _gap_model().user_embed(*(torch.zeros(2, w, dtype=torch.long) for w in (1, 2, 6)))


def test_the_gaps_change_the_user_vector_but_a_shifted_clock_does_not():
    model, f = _gap_model(), _timed_features()
    base = _embed(model, f)
    # The same items, every timestamp of every user a year later: the same spacing.
    shifted = UserFeatures(
        **{**f.__dict__, "history_ts": np.where(f.history > 0, f.history_ts + 31_536_000, 0)}
    )
    torch.testing.assert_close(_embed(model, shifted), base, atol=1e-6, rtol=0)
    # The same items bunched into one minute: a different user.
    bunched = UserFeatures(
        **{**f.__dict__, "history_ts": np.where(f.history > 0, T0 - np.arange(SPEC.history_len), 0)}
    )
    moved = (_embed(model, bunched) - base).norm(dim=1)
    several = f.history[:, 1] > 0  # two items or more: at least one gap
    assert (moved[several] > 1e-3).all() and (moved[~several] < 1e-6).all()


def test_a_time_gap_graph_has_four_inputs_a_dynamic_batch_and_passes_parity(tmp_path):
    model = _gap_model()
    module = build_retrieval(model, RAW_IDS, 10)
    path = tmp_path / "model.onnx"
    for exporter in ("dynamo", "legacy"):
        assert export_onnx(module, SPEC, path, exporter=exporter) == exporter
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == list(input_names(True))
        f = _timed_features()
        rep = check_parity(module, path, f, np.arange(len(f.known)))
        assert rep.max_score_diff <= 1e-4 and rep.cold_users == 3
        session = onnx_session(path)
        feeds = f.feeds(module.input_names)
        _, batch_scores = run_onnx(session, feeds)
        for r in (0, 6, 13):
            _, one = run_onnx(session, {n: v[r : r + 1] for n, v in feeds.items()})
            np.testing.assert_allclose(one[0], batch_scores[r], atol=1e-5)


def test_timestamps_travel_from_the_log_to_training_batches_and_snapshots(tmp_path):
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "gender": "f",
            "age_bucket": "18-24",
            "activity": "low",
            "occupation": "x",
        }
    )
    items = pd.DataFrame({"item_id": [10, 11, 12], "genre": "g", "provider": "p"})
    inter = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 1],
            "item_id": [10, 11, 12, 12],
            "timestamp": [T0, T0 + 60, T0 + 90, T0 + 3_600],
        }
    )
    vocab = FeatureVocab.fit(users, items, inter, n_hash_buckets=2, history_len=3)
    ex = TrainingExamples.build(vocab, users, inter)
    batch = ex.batch(np.arange(len(ex)))
    # User 1's third interaction (item 12 at T0 + 3600) has the two before it as history.
    third = int(np.flatnonzero((ex.user_index == 0) & (ex.pos_in_user == 2))[0])
    assert batch["history"][third].tolist() == [2, 1, 0]  # items 11, 10 (index + 1)
    assert batch["history_ts"][third].tolist() == [T0 + 60, T0, 0]
    snap = FeatureSnapshot.build(vocab, users, inter)
    snap.save(tmp_path / "features.npz")
    got = FeatureSnapshot.load(tmp_path / "features.npz").lookup(np.array([1, 2, 99]))
    assert got.history[0].tolist() == [3, 2, 1]
    assert got.history_ts.tolist() == [[T0 + 3_600, T0 + 60, T0], [T0 + 90, 0, 0], [0, 0, 0]]
    # A snapshot written before time gaps existed loads with unknown timestamps (no gaps).
    with np.load(tmp_path / "features.npz") as z:
        old = {k: z[k] for k in z.files if k != "history_ts"}
    np.savez(tmp_path / "old.npz", **old)
    legacy = FeatureSnapshot.load(tmp_path / "old.npz").lookup(np.array([1]))
    assert legacy.history[0].tolist() == [3, 2, 1] and legacy.history_ts.tolist() == [[0, 0, 0]]
