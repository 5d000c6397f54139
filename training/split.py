"""Time-based train/validation/test splits. Never random.

A random split lets the model see a user's future while predicting their past, which
inflates offline accuracy and hides drift; production only ever predicts forward in time.

Users and items that first appear in validation or test are kept there, not dropped.
Evaluation reports cold-start rows separately; dropping them here would make offline
numbers look better than the service a real user gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from training.schema import Dataset

STRATEGIES = ("global", "last_n")


@dataclass(frozen=True)
class SplitConfig:
    # "global": one cutoff in time for everyone (what a retrain on a schedule sees; the
    # default because it matches production). "last_n": each user's latest interactions
    # (the common academic protocol, comparable with published MovieLens numbers).
    strategy: str = "global"
    # Global: the last 10% of interactions by time are test and the 10% before are val.
    # 10% keeps enough test users on "tiny" for stable metrics while train stays 80%.
    val_frac: float = 0.1
    test_frac: float = 0.1
    # Last-N: one held-out interaction per user each for val and test (leave-one-out).
    n_val: int = 1
    n_test: int = 1
    # Last-N only: users who would keep fewer train interactions than this keep everything
    # in train. A user with no history cannot be scored by the history-based user tower.
    min_train_interactions: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"SplitConfig.strategy is {self.strategy!r}; expected {STRATEGIES}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1):
            raise ValueError("SplitConfig.val_frac and test_frac must be in [0, 1)")
        if self.val_frac + self.test_frac >= 1:
            raise ValueError("SplitConfig.val_frac + test_frac must be < 1 (train would be empty)")
        if self.n_val < 0 or self.n_test < 1 or self.min_train_interactions < 1:
            raise ValueError(
                "SplitConfig needs n_val >= 0, n_test >= 1 and min_train_interactions >= 1"
            )


@dataclass(frozen=True)
class Split:
    """Three disjoint interaction frames, each sorted by (timestamp, user_id, item_id).

    Global: train < t_val <= val < t_test <= test (timestamps). Last-N: the same inequalities
    hold per user, with per-user cutoffs, so t_val and t_test are None.
    """

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    cfg: SplitConfig = field(repr=False)
    t_val: int | None = None
    t_test: int | None = None

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split(dataset: Dataset | pd.DataFrame, cfg: SplitConfig | None = None) -> Split:
    """Split the interactions of `dataset` (or an interactions frame) by time."""
    cfg = SplitConfig() if cfg is None else cfg
    inter = dataset.interactions if isinstance(dataset, Dataset) else dataset
    if len(inter) == 0:
        raise ValueError("split: no interactions to split")
    if cfg.strategy == "global":
        return _split_global(inter, cfg)
    return _split_last_n(inter, cfg)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def _split_global(inter: pd.DataFrame, cfg: SplitConfig) -> Split:
    ts = inter["timestamp"].to_numpy()
    ordered = np.sort(ts)
    n = len(ordered)

    def cutoff(frac_after: float) -> int:
        # The first timestamp of the last `frac_after` share; rows tied with it all go later,
        # so nothing in an earlier set shares a second with the set after it.
        if frac_after <= 0:
            return int(ordered[-1]) + 1
        return int(ordered[min(int(np.floor(n * (1 - frac_after))), n - 1)])

    t_test = cutoff(cfg.test_frac)
    t_val = min(cutoff(cfg.test_frac + cfg.val_frac), t_test)
    if t_val <= ordered[0]:
        raise ValueError(
            f"split: the validation cutoff {t_val} is the earliest timestamp, so train would be "
            f"empty; lower val_frac/test_frac or check for constant timestamps"
        )
    train = inter[ts < t_val]
    val = inter[(ts >= t_val) & (ts < t_test)]
    test = inter[ts >= t_test]
    return Split(_sorted(train), _sorted(val), _sorted(test), cfg, t_val=t_val, t_test=t_test)


def _split_last_n(inter: pd.DataFrame, cfg: SplitConfig) -> Split:
    df = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    users = df["user_id"].to_numpy()
    ts = df["timestamp"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # first row of each user
    ends = np.r_[starts[1:], len(df)]
    sizes = ends - starts

    # Per-user cutoffs. The test cutoff is the timestamp of the n_test-th latest interaction;
    # the val cutoff that of the n_val-th latest one strictly before the test cutoff. Rows tied
    # with a cutoff go to the later set: same-second interactions are one session, and
    # splitting a session across sets leaks it into training.
    never = np.iinfo(np.int64).max
    candidate = sizes >= cfg.n_test + cfg.n_val + cfg.min_train_interactions
    b_test = np.where(candidate, ts[np.maximum(ends - cfg.n_test, starts)], never)
    row_b_test = np.repeat(b_test, sizes)
    before_test = np.add.reduceat((ts < row_b_test).astype(np.int64), starts)
    val_idx = np.clip(starts + before_test - cfg.n_val, starts, ends - 1)
    b_val = b_test if cfg.n_val == 0 else np.where(candidate, ts[val_idx], never)
    row_b_val = np.repeat(b_val, sizes)

    # Ties can push more rows out of train than n_val + n_test; such users keep everything in
    # train if that would leave them fewer than min_train_interactions.
    train_count = np.add.reduceat((ts < row_b_val).astype(np.int64), starts)
    enough = candidate & (before_test >= cfg.n_val) & (train_count >= cfg.min_train_interactions)
    ok = np.repeat(enough, sizes)
    test_mask = ok & (ts >= row_b_test)
    val_mask = ok & (ts >= row_b_val) & ~test_mask
    train_mask = ~(test_mask | val_mask)
    return Split(_sorted(df[train_mask]), _sorted(df[val_mask]), _sorted(df[test_mask]), cfg)
