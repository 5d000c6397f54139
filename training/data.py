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
    # (N,) raw user id of each row (the table is sorted by user, then time): where a user's
    # history stood at another moment (`history_before`, for SkipExamples)
    raw_user: np.ndarray | None = None
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
            raw_user=raw_users,
            weight=weight,
        )

    def batch(
        self, rows: np.ndarray, *, cold_mask: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors for the rows (indices into this table's sorted order)."""
        history, history_ts = self.history_at(rows, self.pos_in_user[rows])
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
        if history_ts is not None:
            out["history_ts"] = torch.from_numpy(history_ts)
        if self.weight is not None:
            out["weight"] = torch.from_numpy(self.weight[rows])
        return out

    def history_at(
        self, anchor: np.ndarray, n_prev: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(history (B, H), its timestamps or None): the `n_prev` rows before each `anchor`,
        newest first, as item index + 1 (0 = padding)."""
        offsets = np.arange(1, self.history_len + 1)  # (H,): 1 = the previous interaction
        valid = offsets[None, :] <= n_prev[:, None]
        prev = np.maximum(anchor[:, None] - offsets[None, :], 0)  # (B, H)
        history = np.where(valid, self.item_index[prev] + 1, 0)
        ts = None if self.timestamp is None else np.where(valid, self.timestamp[prev], 0)
        return history, ts

    def history_before(self, raw_users: np.ndarray, ts: np.ndarray):
        """(anchor, n_prev) for each (user, moment): the user's interactions in this table
        strictly before `ts` are the `n_prev` rows before `anchor` (0 for a stranger)."""
        if self.raw_user is None or self.timestamp is None:
            raise ValueError("history_before: this table was built without user ids and times")
        raw_users, ts = np.asarray(raw_users, np.int64), np.asarray(ts, np.int64)
        if not len(ts) or not len(self.raw_user):
            return np.zeros(len(ts), np.int64), np.zeros(len(ts), np.int64)
        starts = np.r_[0, np.flatnonzero(np.diff(self.raw_user)) + 1]
        uniq = self.raw_user[starts]
        rank = np.repeat(np.arange(len(uniq)), np.diff(np.r_[starts, len(self.raw_user)]))
        q = np.searchsorted(uniq, raw_users)
        known = (q < len(uniq)) & (uniq[np.minimum(q, len(uniq) - 1)] == raw_users)
        # One sorted key per row, (user rank, time): the table is sorted by it already.
        t0 = min(int(self.timestamp.min()), int(ts.min()))
        span = max(int(self.timestamp.max()), int(ts.max())) - t0 + 1
        if len(uniq) * span >= 2**62:
            raise ValueError("history_before: users x time span overflows a 64-bit key")
        key = rank * span + (self.timestamp - t0)
        anchor = np.searchsorted(key, np.minimum(q, len(uniq) - 1) * span + (ts - t0))
        n_prev = np.where(known, anchor - starts[np.minimum(q, len(uniq) - 1)], 0)
        return anchor.astype(np.int64), n_prev.astype(np.int64)


@dataclass(frozen=True)
class SkipExamples:
    """Impressions the user did not pick, with the user's features at impression time: the
    history is the training table's rows before that moment (TrainingExamples.history_before),
    so a skip never sees what the user did after it."""

    user_index: np.ndarray  # (S,)
    user_cats: np.ndarray  # (S, C)
    item_index: np.ndarray  # (S,)
    anchor: np.ndarray  # (S,) rows of `positives` before this index are the history
    n_prev: np.ndarray  # (S,)

    def __len__(self) -> int:
        return len(self.item_index)

    @classmethod
    def build(
        cls,
        vocab: FeatureVocab,
        users: pd.DataFrame,
        skips: pd.DataFrame,
        positives: TrainingExamples,
    ) -> SkipExamples:
        """`skips`: user_id, item_id, timestamp (the impression's unix seconds)."""
        items = vocab.item_index(skips["item_id"].to_numpy(np.int64))
        skips = skips[items >= 0]
        raw = skips["user_id"].to_numpy(np.int64)
        anchor, n_prev = positives.history_before(raw, skips["timestamp"].to_numpy(np.int64))
        users_sorted = users.sort_values("user_id")
        ids = users_sorted["user_id"].to_numpy(np.int64)
        row = np.minimum(np.searchsorted(ids, raw), max(len(ids) - 1, 0))
        cats = vocab.encode_user_cats(users_sorted)[row]
        cats[ids[row] != raw] = 0  # a user outside the users table: unknown categories
        return cls(
            user_index=vocab.user_index(raw),
            user_cats=cats,
            item_index=items[items >= 0],
            anchor=anchor,
            n_prev=n_prev,
        )

    def batch(self, rows: np.ndarray, positives: TrainingExamples) -> dict[str, torch.Tensor]:
        history, history_ts = positives.history_at(self.anchor[rows], self.n_prev[rows])
        out = {
            "user_index": torch.from_numpy(self.user_index[rows][:, None]),
            "user_cats": torch.from_numpy(self.user_cats[rows]),
            "history": torch.from_numpy(history),
            "item_index": torch.from_numpy(self.item_index[rows]),
        }
        if history_ts is not None:
            out["history_ts"] = torch.from_numpy(history_ts)
        return out
