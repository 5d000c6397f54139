"""Training examples: (user features, positive item) with a causal history.

Each example's history is the user's previous H items *before* that
interaction, so the model never sees the item it must predict, nor anything
after it. Histories are gathered per batch from time-sorted arrays instead of
being materialised: at 20M interactions x H=20 that table would be 3 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from models.features import FeatureVocab, hash_bucket


@dataclass(frozen=True)
class TrainingExamples:
    user_index: np.ndarray  # (N,) dense user row (hashed for cold users)
    user_hashed: np.ndarray  # (N,) the hashed row each user would get if it were unknown
    user_cats: np.ndarray  # (N, C)
    item_index: np.ndarray  # (N,)
    pos_in_user: np.ndarray  # (N,) how many earlier interactions this user has
    history_len: int
    # (N,) unix seconds of each interaction: the history's timestamps (time-gap towers)
    timestamp: np.ndarray | None = None
    # (N,) per-example loss weight (a `weight` column: feedback.tiers); None = all 1
    weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.item_index)

    @classmethod
    def build(
        cls, vocab: FeatureVocab, users: pd.DataFrame, train: pd.DataFrame
    ) -> TrainingExamples:
        items = vocab.item_index(train["item_id"].to_numpy())
        train = train[items >= 0]
        # Sort by (user, time): consecutive rows of a user are its history in order.
        train = train.sort_values(["user_id", "timestamp"], kind="stable")
        raw_users = train["user_id"].to_numpy(np.int64)
        starts = np.r_[0, np.flatnonzero(np.diff(raw_users)) + 1]
        lengths = np.diff(np.r_[starts, len(raw_users)])
        pos = np.arange(len(raw_users)) - np.repeat(starts, lengths)
        users_sorted = users.sort_values("user_id")
        cats_table = vocab.encode_user_cats(users_sorted)
        cat_rows = np.searchsorted(users_sorted["user_id"].to_numpy(np.int64), raw_users)
        hashed = len(vocab.user_ids) + hash_bucket(raw_users, vocab.n_hash_buckets)
        weight = None
        if "weight" in train.columns:
            weight = train["weight"].fillna(1.0).to_numpy(np.float32)
            if not (np.isfinite(weight).all() and (weight > 0).all()):
                raise ValueError("weight: expected finite values > 0 for every interaction")
        return cls(
            user_index=vocab.user_index(raw_users),
            user_hashed=hashed,
            user_cats=cats_table[cat_rows],
            item_index=vocab.item_index(train["item_id"].to_numpy()),
            pos_in_user=pos,
            history_len=vocab.history_len,
            timestamp=(
                train["timestamp"].to_numpy(np.int64) if "timestamp" in train.columns else None
            ),
            weight=weight,
        )

    def batch(
        self, rows: np.ndarray, *, cold_mask: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors for the rows (indices into this table's sorted order)."""
        h = self.history_len
        offsets = np.arange(1, h + 1)  # (H,): 1 = the previous interaction
        prev = rows[:, None] - offsets[None, :]  # (B, H)
        valid = offsets[None, :] <= self.pos_in_user[rows][:, None]
        prev = np.maximum(prev, 0)
        history = np.where(valid, self.item_index[prev] + 1, 0)
        user_index = self.user_index[rows]
        if cold_mask is not None:
            # Train the shared hashed rows on real users so cold starts get a useful vector.
            user_index = np.where(cold_mask, self.user_hashed[rows], user_index)
        out = {
            "user_index": torch.from_numpy(user_index[:, None]),
            "user_cats": torch.from_numpy(self.user_cats[rows]),
            "history": torch.from_numpy(history),
            "item_index": torch.from_numpy(self.item_index[rows]),
        }
        if self.timestamp is not None:
            out["history_ts"] = torch.from_numpy(np.where(valid, self.timestamp[prev], 0))
        if self.weight is not None:
            out["weight"] = torch.from_numpy(self.weight[rows])
        return out
