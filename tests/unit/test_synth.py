"""The synthetic world: reproducible, schema-valid, and with the structure later stages rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.schema import Dataset
from training.synth import (
    AGE_BUCKETS,
    GENDERS,
    SYNTH_EVENT_TYPES,
    AliasSampler,
    SynthConfig,
    World,
    activity_buckets,
    generate_dataset,
)

TINY = SynthConfig.preset("tiny")


@pytest.fixture(scope="module")
def tiny() -> tuple[World, Dataset]:
    return generate_dataset(TINY, progress=False)


@pytest.fixture(scope="module")
def small_world() -> World:
    return World.generate(SynthConfig.preset("small"))


def test_same_seed_same_world_and_log(tiny: tuple[World, Dataset]) -> None:
    world, ds = tiny
    world2, ds2 = generate_dataset(TINY, progress=False)
    pd.testing.assert_frame_equal(ds.interactions, ds2.interactions)
    pd.testing.assert_frame_equal(ds.users, ds2.users)
    pd.testing.assert_frame_equal(ds.items, ds2.items)
    np.testing.assert_array_equal(world.user_base, world2.user_base)
    np.testing.assert_array_equal(world.item_factors, world2.item_factors)


def test_other_seed_other_world(tiny: tuple[World, Dataset]) -> None:
    world, ds = tiny
    world3, ds3 = generate_dataset(SynthConfig.preset("tiny", seed=1), progress=False)
    assert not np.array_equal(world.user_base, world3.user_base)
    pairs = ["user_id", "item_id"]
    assert not ds.interactions[pairs].equals(ds3.interactions[pairs])


def test_tables_follow_the_schema(tiny: tuple[World, Dataset]) -> None:
    _, ds = tiny
    # Round trip through validation: the frames are already canonical.
    again = Dataset.from_frames(ds.users, ds.items, ds.interactions)
    pd.testing.assert_frame_equal(again.interactions, ds.interactions)
    x = ds.interactions
    assert len(x) >= 0.95 * TINY.n_interactions and len(x) <= TINY.n_interactions
    assert set(x["event_type"]) <= set(SYNTH_EVENT_TYPES)
    assert (x["value"] > 0).all()
    assert x["timestamp"].between(TINY.start_ts, TINY.end_ts - 1).all()
    assert not x.duplicated(["user_id", "item_id"]).any()
    # Raw ids are idx + 1, so that confusing ids with dense indices cannot go unnoticed.
    assert ds.users["user_id"].tolist() == list(range(1, TINY.n_users + 1))
    assert ds.items["item_id"].tolist() == list(range(1, TINY.n_items + 1))
    assert set(ds.users["gender"]) <= set(GENDERS)
    assert set(ds.users["age_bucket"]) <= set(AGE_BUCKETS)
    assert set(ds.users["activity"]) == {"low", "medium", "high"}
    assert set(ds.users["occupation"]) == {"unknown"}
    assert set(ds.items["provider"]) == {"major", "indie"}


def test_ids_map_back_to_indices(tiny: tuple[World, Dataset]) -> None:
    world, ds = tiny
    idx = world.user_index(ds.interactions["user_id"])
    np.testing.assert_array_equal(world.user_id_of(idx), ds.interactions["user_id"].to_numpy())
    last = TINY.n_items
    np.testing.assert_array_equal(world.item_index(np.array([1, last])), [0, last - 1])
    with pytest.raises(ValueError, match="item_id"):
        world.item_index(np.array([0]))
    with pytest.raises(ValueError, match="user_id"):
        world.user_index(np.array([TINY.n_users + 1]))


def test_popularity_is_heavy_tailed(tiny: tuple[World, Dataset]) -> None:
    _, ds = tiny
    counts = np.sort(ds.interactions["item_id"].value_counts().to_numpy())[::-1]
    top10 = counts[: len(counts) // 10].sum() / counts.sum()
    assert top10 > 0.25  # a uniform catalogue would give 0.10
    assert counts[0] > 5 * np.median(counts)


def test_majors_are_more_popular_on_average(small_world: World) -> None:
    pop = small_world.item_popularity
    major = small_world.item_provider == 0
    assert pop[major].mean() > 1.5 * pop[~major].mean()


def test_group_tastes_differ(small_world: World) -> None:
    world = small_world
    taste = world.user_base

    def between_group_spread(labels: np.ndarray) -> float:
        means = np.stack([taste[labels == g].mean(0) for g in np.unique(labels)])
        return float(np.linalg.norm(means - taste.mean(0), axis=1).mean())

    rng = np.random.default_rng(0)
    real = between_group_spread(world.user_age)
    shuffled = np.mean([between_group_spread(rng.permutation(world.user_age)) for _ in range(10)])
    assert real > 3 * shuffled


def test_taste_drifts_over_the_period(small_world: World) -> None:
    world, cfg = small_world, small_world.cfg
    users = np.arange(20)
    delta = world.taste(users, cfg.end_ts) - world.taste(users, cfg.start_ts)
    np.testing.assert_allclose(np.linalg.norm(delta, axis=1), cfg.drift, rtol=1e-4)
    mid = cfg.start_ts + cfg.period_s // 2
    halfway = world.taste(users, mid) - world.taste(users, cfg.start_ts)
    np.testing.assert_allclose(halfway, delta / 2, atol=1e-5)


def test_click_prob_decreases_with_position(small_world: World) -> None:
    world = small_world
    users = np.arange(50)[:, None]  # (B, 1)
    items = np.arange(50)[:, None]
    positions = np.arange(20)[None, :]  # (1, K)
    ts = world.cfg.start_ts + 10 * 86_400
    p = world.click_prob(users, items, positions, ts)  # (B, K)
    assert p.shape == (50, 20)
    assert np.all(np.diff(p, axis=1) < 0)
    assert world.examination(0) == 1.0
    rel = world.relevance(users[:, 0], items[:, 0], ts)
    np.testing.assert_allclose(p[:, 0], rel)
    assert np.all((rel > 0) & (rel < 1))


def test_vectorised_calls_broadcast(small_world: World) -> None:
    world = small_world
    users = np.array([3, 7, 11])
    items = np.array([0, 5, 9, 200])
    ts = world.cfg.start_ts + 50 * 86_400
    grid = world.relevance(users[:, None], items[None, :], ts)  # (3, 4)
    for a, u in enumerate(users):
        for b, i in enumerate(items):
            assert grid[a, b] == pytest.approx(float(world.relevance(u, i, ts)), rel=1e-6)
    scores = world.oracle_scores(users, ts)  # (3, I)
    np.testing.assert_allclose(
        scores[:, items], world.choice_logit(users[:, None], items[None, :], ts), rtol=1e-5
    )
    clicks = world.sample_clicks(users[:, None], items[None, :], 0, ts, np.random.default_rng(0))
    assert clicks.shape == (3, 4) and clicks.dtype == bool


def test_no_interaction_before_release(tiny: tuple[World, Dataset]) -> None:
    world, ds = tiny
    x = ds.interactions.merge(ds.items[["item_id", "release_ts"]], on="item_id")
    assert (x["timestamp"] >= x["release_ts"]).all()
    # Items released during the period exist and do get watched once out.
    fresh = ds.items["release_ts"] > TINY.start_ts
    assert 0.25 < fresh.mean() < 0.55
    assert x.loc[x["release_ts"] > TINY.start_ts, "item_id"].nunique() > 0
    idx = world.item_index(x["item_id"].to_numpy())
    assert world.available(idx, x["timestamp"].to_numpy()).all()


def test_oracle_beats_popularity(tiny: tuple[World, Dataset]) -> None:
    """The signal is learnable: true affinity ranks held-out items far better than popularity."""
    world, ds = tiny
    x = ds.interactions
    cut = int(np.quantile(x["timestamp"], 0.9))
    train, test = x[x["timestamp"] < cut], x[x["timestamp"] >= cut]
    pop = np.bincount(world.item_index(train["item_id"]), minlength=world.n_items).astype(float)
    seen = train.groupby("user_id")["item_id"].agg(list)
    users = np.sort(test["user_id"].unique())
    held = test.groupby("user_id")["item_id"].agg(set)

    def hit_rate(scores: np.ndarray) -> float:
        hits = 0
        for row, uid in enumerate(users):
            s = scores[row].astype(np.float64)
            s[world.item_index(np.array(seen.get(uid, []), dtype=np.int64))] = -np.inf
            top = world.item_id_of(np.argsort(-s)[:10])
            hits += len(held[uid] & set(top.tolist()))
        return hits / len(test)

    oracle = hit_rate(world.oracle_scores(world.user_index(users), cut))
    popular = hit_rate(np.tile(pop, (len(users), 1)))
    assert oracle > 2 * popular


def test_save_load_round_trip(tmp_path: Path, tiny: tuple[World, Dataset]) -> None:
    world, ds = tiny
    ds.save(tmp_path)
    world.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"world.npz", "world.json", "users.parquet"}
    loaded = World.load(tmp_path)
    assert loaded.cfg == world.cfg
    for name in (
        "user_base",
        "user_drift_dir",
        "item_factors",
        "item_popularity",
        "item_release_ts",
        "user_gender",
        "item_provider",
    ):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(world, name))
    ts = TINY.start_ts + 1000
    np.testing.assert_array_equal(
        loaded.relevance(np.arange(5), np.arange(5), ts),
        world.relevance(np.arange(5), np.arange(5), ts),
    )
    pd.testing.assert_frame_equal(Dataset.load(tmp_path).interactions, ds.interactions)
    with np.load(tmp_path / "world.npz", allow_pickle=False) as npz:  # no pickled objects
        assert "user_base" in npz.files


def test_load_reports_a_missing_world(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"world\.json"):
        World.load(tmp_path)


def test_ground_truth_is_read_only(tiny: tuple[World, Dataset]) -> None:
    world, _ = tiny
    with pytest.raises(ValueError):
        world.item_popularity[0] = 1.0


def test_presets_and_config_checks() -> None:
    assert SynthConfig.preset("large").n_items == 100_000
    assert SynthConfig.preset("demo", seed=5).seed == 5
    with pytest.raises(ValueError, match="unknown synth preset"):
        SynthConfig.preset("huge")
    with pytest.raises(ValueError, match="n_users"):
        SynthConfig(n_users=0)


def test_activity_buckets_by_terciles() -> None:
    counts = np.array([9, 1, 2, 3, 4, 5, 6, 7, 8])
    assert activity_buckets(counts).tolist() == (
        ["high"] + ["low"] * 3 + ["medium"] * 3 + ["high"] * 2
    )
    # Equal counts always share a bucket.
    assert set(activity_buckets(np.array([3, 3, 3, 3]))) == {"low"}


def test_alias_sampler_matches_weights() -> None:
    weights = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    draws = AliasSampler(weights).sample(np.random.default_rng(0), 200_000)
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, weights, atol=0.005)
    assert freq[4] == 0


def test_packed_sort_matches_lexsort_fallback(
    tiny: tuple[World, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast single-key sort and the lexsort fallback give the same log."""
    _, ds = tiny
    monkeypatch.setattr(World, "_pack", staticmethod(lambda hi, lo, lo_bound: None))
    _, slow = generate_dataset(TINY, progress=False)
    pd.testing.assert_frame_equal(slow.interactions, ds.interactions)
