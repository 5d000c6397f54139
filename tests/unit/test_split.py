"""Time splits: the test set is always the future of the training set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.schema import Dataset
from training.split import Split, SplitConfig, split
from training.synth import SynthConfig, generate_dataset

KEY = ["user_id", "item_id", "timestamp"]


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return generate_dataset(SynthConfig.preset("tiny"), progress=False)[1]


def frame(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=KEY)
    return df.assign(event_type="rating", value=1.0)


def assert_partition(s: Split, all_rows: pd.DataFrame) -> None:
    """Every row lands in exactly one set."""
    parts = pd.concat([s.train, s.val, s.test])
    assert len(parts) == len(all_rows)
    assert not parts.duplicated(KEY).any()  # no (user, item, ts) row in two sets
    pd.testing.assert_frame_equal(
        parts.sort_values(KEY).reset_index(drop=True)[KEY],
        all_rows.sort_values(KEY).reset_index(drop=True)[KEY],
    )


def test_global_split_never_leaks_the_future(dataset: Dataset) -> None:
    s = split(dataset, SplitConfig(strategy="global", val_frac=0.1, test_frac=0.1))
    assert_partition(s, dataset.interactions)
    assert s.t_val is not None and s.t_test is not None
    assert s.train["timestamp"].max() < s.t_val <= s.val["timestamp"].min()
    assert s.val["timestamp"].max() < s.t_test <= s.test["timestamp"].min()
    assert s.train["timestamp"].max() < s.test["timestamp"].min()
    n = len(dataset.interactions)
    assert abs(len(s.test) - 0.1 * n) < 0.01 * n and abs(len(s.val) - 0.1 * n) < 0.01 * n
    for part in (s.train, s.val, s.test):
        assert part["timestamp"].is_monotonic_increasing


def test_global_cutoff_keeps_same_second_rows_together() -> None:
    rows = [(1, i, 100 + i) for i in range(8)] + [(2, 50, 107), (3, 51, 107), (4, 52, 109)]
    df = frame(rows)
    s = split(df, SplitConfig(strategy="global", val_frac=0.0, test_frac=0.3))
    assert s.t_test == 107
    assert set(s.test["timestamp"]) == {107, 109} and len(s.test) == 4
    assert s.train["timestamp"].max() < 107 and len(s.val) == 0


def test_global_keeps_cold_users_and_items_in_test() -> None:
    df = frame([(1, 1, 10), (1, 2, 20), (2, 1, 30), (9, 99, 40)])
    s = split(df, SplitConfig(strategy="global", val_frac=0.0, test_frac=0.25))
    assert s.test[["user_id", "item_id"]].values.tolist() == [[9, 99]]


def test_last_n_holds_out_each_users_latest(dataset: Dataset) -> None:
    cfg = SplitConfig(strategy="last_n", n_val=1, n_test=2, min_train_interactions=3)
    s = split(dataset, cfg)
    assert_partition(s, dataset.interactions)
    assert s.t_val is None and s.t_test is None
    counts = dataset.interactions.groupby("user_id").size()
    eligible = counts[counts >= 1 + 2 + 3].index
    test_per_user = s.test.groupby("user_id").size()
    assert set(test_per_user.index) == set(eligible)
    assert (test_per_user == 2).all() and (s.val.groupby("user_id").size() == 1).all()
    # Per user, train < val < test in time: no test interaction leaks into training.
    last_train = s.train.groupby("user_id")["timestamp"].max()
    first_val = s.val.groupby("user_id")["timestamp"].min()
    last_val = s.val.groupby("user_id")["timestamp"].max()
    first_test = s.test.groupby("user_id")["timestamp"].min()
    assert (last_train[first_test.index] < first_test).all()
    assert (last_train[first_val.index] < first_val).all()
    assert (last_val[first_test.index] < first_test).all()
    # Users with too little history keep everything in train.
    short = counts[counts < 6].index
    assert len(short) > 0
    assert not s.test["user_id"].isin(short).any() and not s.val["user_id"].isin(short).any()


def test_last_n_ties_go_to_the_later_set() -> None:
    # User 1's last two interactions share a second: both are test, val takes the one before.
    df = frame([(1, 1, 10), (1, 2, 20), (1, 3, 30), (1, 4, 40), (1, 5, 40)])
    s = split(df, SplitConfig(strategy="last_n", n_val=1, n_test=1))
    assert sorted(s.test["item_id"]) == [4, 5]
    assert s.val["item_id"].tolist() == [3]
    assert s.train["timestamp"].max() < s.val["timestamp"].min()


def test_last_n_user_whose_history_is_one_session_stays_in_train() -> None:
    df = frame([(1, 1, 10), (1, 2, 10), (1, 3, 10), (2, 1, 5), (2, 2, 6), (2, 3, 7)])
    s = split(df, SplitConfig(strategy="last_n", n_val=1, n_test=1))
    assert set(s.train.loc[s.train["user_id"] == 1, "item_id"]) == {1, 2, 3}
    assert s.test["user_id"].tolist() == [2] and s.val["user_id"].tolist() == [2]


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="strategy"):
        SplitConfig(strategy="random")
    with pytest.raises(ValueError, match="train would be empty"):
        SplitConfig(val_frac=0.5, test_frac=0.5)
    with pytest.raises(ValueError, match="n_test"):
        SplitConfig(strategy="last_n", n_test=0)
    with pytest.raises(ValueError, match="train would be empty"):
        split(frame([(1, 1, 10), (2, 2, 10)]), SplitConfig(test_frac=0.5, val_frac=0.0))


def test_split_is_deterministic(dataset: Dataset) -> None:
    for strategy in ("global", "last_n"):
        a = split(dataset, SplitConfig(strategy=strategy))
        b = split(dataset, SplitConfig(strategy=strategy))
        pd.testing.assert_frame_equal(a.test, b.test)
        assert np.array_equal(a.train["timestamp"], b.train["timestamp"])
