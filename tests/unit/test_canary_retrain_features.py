"""What a retrained candidate serves: its online features (canary.pipeline.serving_features)
and the logQ estimator a warm start begins from (training.train._prime_estimator)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from canary.pipeline import serving_features
from models.loss import StreamingFrequencyEstimator
from models.snapshot import FeatureSnapshot
from serving.testing import world_run
from training.run import FEATURES_FILE, load_run
from training.synth import SynthConfig, generate_dataset
from training.train import _prime_estimator


def test_serving_features_history_and_seen_set_include_the_feedback(tmp_path):
    _, ds = generate_dataset(SynthConfig.preset("tiny"), progress=False)
    data = tmp_path / "data"
    ds.save(data)
    base = ds.interactions
    user = int(base["user_id"].value_counts().index[0])
    mine = base[base["user_id"] == user]
    unseen = np.setdiff1d(ds.items["item_id"].to_numpy(), mine["item_id"].to_numpy())[:3]
    fb = pd.DataFrame(
        {
            "user_id": user,
            "item_id": unseen,
            "timestamp": int(base["timestamp"].max()) + np.arange(1, 4) * 60,
            "event_type": "click",
            "value": 0.0,
        }
    )
    fb.to_parquet(tmp_path / "extra.parquet", index=False)
    # A run whose own snapshot knows only the newest interactions (as a window's does).
    run = world_run(ds, tmp_path / "run")
    recent = base[base["timestamp"] >= base["timestamp"].quantile(0.9)]
    vocab = load_run(run).vocab
    FeatureSnapshot.build(vocab, ds.users, recent).save(run / FEATURES_FILE)

    serving_features(run, data, tmp_path / "extra.parquet")
    snap = FeatureSnapshot.load(run / FEATURES_FILE)
    f = snap.lookup(np.array([user]))
    # seen = the whole base log (older items included) + the feedback clicks
    assert set(f.seen[0].tolist()) == set(mine["item_id"].tolist()) | set(unseen.tolist())
    # history starts with the feedback, newest first (item index + 1, 0 = padding)
    hist = f.history[0][f.history[0] > 0] - 1
    assert vocab.item_ids[hist[:3]].tolist() == unseen[::-1].tolist()

    serving_features(run, data, None)  # no feedback: history and seen from the base log
    f = FeatureSnapshot.load(run / FEATURES_FILE).lookup(np.array([user]))
    assert not np.isin(unseen, vocab.item_ids[f.history[0][f.history[0] > 0] - 1]).any()
    assert set(f.seen[0].tolist()) == set(mine["item_id"].tolist())


def test_primed_estimator_expects_each_items_gap():
    est = StreamingFrequencyEstimator(100)
    # item 0 in half the examples, item 1 in 1%, item 2 once, the rest never
    items = np.r_[np.zeros(5000), np.ones(100), [2], np.full(4899, 3)].astype(np.int64)
    _prime_estimator(est, items, batch=64)
    gap = est.gap.numpy()
    assert gap[0] == 1.0 or abs(gap[0] - 1.0) < 1e-9  # in every batch
    assert abs(gap[1] - 1 / (1 - 0.99**64)) < 1e-6  # ~1.9 batches between sightings
    assert gap[2] <= 100.0  # never rarer than the estimator's uniform default
    assert (gap[4:] == 100.0).all()  # unseen items keep the default
    p = est.probability(torch.tensor([0, 1]))
    assert p[0] > p[1] > 0


def test_warm_window_collects_the_newest_window_like_sliding_window(tmp_path):
    from canary.pipeline import WARM_MODES, RetrainConfig, collect
    from training.schema import Dataset

    _, ds = generate_dataset(SynthConfig.preset("tiny"), progress=False)
    ds.save(tmp_path / "data")
    t_max = float(ds.interactions["timestamp"].max())
    got = {}
    for mode in ("warm_start", "sliding_window", "warm_window"):
        cfg = RetrainConfig(state_dir=str(tmp_path / "st"), mode=mode, window_days=30.0)
        got[mode] = collect(cfg, tmp_path / mode, str(tmp_path / "data"))
    assert got["warm_start"].base_interactions == len(ds.interactions)
    assert got["warm_start"].data == got["warm_start"].eval_data == tmp_path / "data"
    for mode in ("sliding_window", "warm_window"):
        win = Dataset.load(got[mode].data).interactions
        assert win["timestamp"].min() >= t_max - 30 * 86_400
        assert got[mode].base_interactions == len(win) < len(ds.interactions)
        assert got[mode].eval_data == got[mode].data  # evaluated on the window's slice
        assert got[mode].evidence()["base_interactions"] == len(win)
    assert "warm_window" in WARM_MODES and "sliding_window" not in WARM_MODES


def test_a_loaded_dataset_is_not_read_again(tmp_path, monkeypatch):
    """A retrain loads its base data once and hands it to collect and serving_features."""
    from canary.pipeline import RetrainConfig, collect
    from training.schema import Dataset

    _, ds = generate_dataset(SynthConfig.preset("tiny"), progress=False)
    ds.save(tmp_path / "data")
    run = world_run(ds, tmp_path / "run")
    vocab = load_run(run).vocab
    expected = FeatureSnapshot.load(serving_features(run, tmp_path / "data", None))

    def no_load(cls, data_dir):
        raise AssertionError(f"Dataset.load({data_dir}) although the dataset was passed")

    monkeypatch.setattr(Dataset, "load", classmethod(no_load))
    for mode in ("warm_start", "warm_window"):
        cfg = RetrainConfig(state_dir=str(tmp_path / "st"), mode=mode, window_days=30.0)
        got = collect(cfg, tmp_path / mode, str(tmp_path / "data"), dataset=ds)
        assert got.base_data == str(tmp_path / "data")
    snap = FeatureSnapshot.load(
        serving_features(run, tmp_path / "data", None, dataset=ds, vocab=vocab)
    )
    users = ds.users["user_id"].to_numpy()[:50]
    a, b = snap.lookup(users), expected.lookup(users)
    assert np.array_equal(a.history, b.history)
    assert [s.tolist() for s in a.seen] == [s.tolist() for s in b.seen]
