"""Time gaps in the sequential user tower (`TowerConfig.time_gaps`): the bucketing, a fourth
graph input that only such graphs take, parity through ONNX, invariance to the clock (only the
spacing of a user's own items counts), and the timestamps travelling from the training log,
snapshots and the online view to the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from models.export import build_retrieval, check_parity, export_onnx, run_onnx
from models.features import (
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
CFG = TowerConfig(
    id_dim=8, cat_dim=4, hidden_dim=16, out_dim=12, user_encoder="sequence", time_gaps=True
)
RAW_IDS = np.arange(1000, 1000 + SPEC.n_items)
T0 = 1_700_000_000


def _model(cfg: TowerConfig = CFG) -> TwoTower:
    torch.manual_seed(0)
    model = TwoTower(SPEC, cfg, item_cats=torch.randint(0, 3, (SPEC.n_items, 2)))
    with torch.no_grad():  # a visible gap signal: trained gap embeddings are not near zero
        if model.user_tower.sequence.gap_emb is not None:
            model.user_tower.sequence.gap_emb.weight.mul_(5.0)
    return model.eval()


def _features(b: int = 14, seed: int = 1) -> UserFeatures:
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
    assert _model().user_tower.input_names == input_names(True)
    assert _model(TowerConfig(user_encoder="sequence")).user_tower.input_names == INPUT_NAMES
    # Versions published before time gaps existed have three inputs in their meta.json.
    assert graph_input_names({"inputs": dict.fromkeys(INPUT_NAMES)}) == INPUT_NAMES
    assert graph_input_names({}) == INPUT_NAMES
    with pytest.raises(ValueError, match="time_gaps"):
        TowerConfig(time_gaps=True)  # the mean encoder has no positions to give gaps to
    with pytest.raises(ValueError, match="history_ts"):
        _model().user_embed(*(torch.zeros(2, w, dtype=torch.long) for w in (1, 2, 6)))


def test_the_gaps_change_the_user_vector_but_a_shifted_clock_does_not():
    model, f = _model(), _features()
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
    model = _model()
    module = build_retrieval(model, RAW_IDS, 10)
    path = tmp_path / "model.onnx"
    for exporter in ("dynamo", "legacy"):
        assert export_onnx(module, SPEC, path, exporter=exporter) == exporter
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == list(input_names(True))
        f = _features()
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
