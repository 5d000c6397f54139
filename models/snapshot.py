"""Online features: what `recommend` looks up for a user at request time.

A snapshot is built from the users table and the interactions known so far
(training data, later joined feedback). It is one `.npz` of plain arrays so the
Triton Python model can load it with numpy alone, and it is written atomically
so a reader never sees half of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_path
from models.features import (
    INPUT_HISTORY,
    INPUT_HISTORY_TS,
    INPUT_NAMES,
    INPUT_USER_CATS,
    INPUT_USER_INDEX,
    FeatureVocab,
    hash_bucket,
    last_n_history,
    last_n_values,
)


@dataclass(frozen=True)
class UserFeatures:
    """Model inputs for a batch of raw user ids, in request order."""

    user_index: np.ndarray  # (B, 1) int64
    user_cats: np.ndarray  # (B, C) int64
    history: np.ndarray  # (B, H) int64, item index + 1, 0 = padding
    known: np.ndarray  # (B,) bool; False = cold start (no snapshot row)
    seen: list[np.ndarray]  # B arrays of raw item ids to filter out
    # (B, H) int64 unix seconds of each history item, 0 = padding; None = not known (a
    # snapshot written before time gaps existed), which a time-gap graph reads as "no gaps".
    history_ts: np.ndarray | None = None

    def feeds(self, names: tuple[str, ...] = INPUT_NAMES) -> dict[str, np.ndarray]:
        """The graph inputs `names` (models.features.input_names) as contiguous int64."""
        arrays = {
            INPUT_USER_INDEX: self.user_index,
            INPUT_USER_CATS: self.user_cats,
            INPUT_HISTORY: self.history,
        }
        if INPUT_HISTORY_TS in names:  # only time-gap graphs: no zeros built for the others
            ts = self.history_ts
            arrays[INPUT_HISTORY_TS] = ts if ts is not None else np.zeros_like(self.history)
        return {n: np.ascontiguousarray(arrays[n], dtype=np.int64) for n in names}


@dataclass(frozen=True)
class FeatureSnapshot:
    user_ids: np.ndarray  # (U,) sorted raw ids
    user_index: np.ndarray  # (U,)
    user_cats: np.ndarray  # (U, C)
    history: np.ndarray  # (U, H)
    history_ts: np.ndarray  # (U, H) unix seconds of each history item, 0 = padding
    seen_indptr: np.ndarray  # (U + 1,) CSR over seen_items
    seen_items: np.ndarray  # (nnz,) raw item ids
    n_users: int  # vocab size: hashed rows start here
    n_hash_buckets: int

    @classmethod
    def build(
        cls, vocab: FeatureVocab, users: pd.DataFrame, interactions: pd.DataFrame
    ) -> FeatureSnapshot:
        """`interactions` must be in time order; they define history and the seen set."""
        users = users.sort_values("user_id")
        user_ids = users["user_id"].to_numpy(np.int64)
        row = np.searchsorted(user_ids, interactions["user_id"].to_numpy(np.int64))
        item_raw = interactions["item_id"].to_numpy(np.int64)
        item_idx = vocab.item_index(item_raw)
        ok = item_idx >= 0  # items outside the model's catalogue cannot be history
        history = last_n_history(row[ok], item_idx[ok], len(user_ids), vocab.history_len)
        # A frame without timestamps (some callers pass ids in time order) has no gaps: 0.
        ts = (
            interactions["timestamp"].to_numpy(np.int64)
            if "timestamp" in interactions.columns
            else np.zeros(len(interactions), np.int64)
        )
        history_ts = last_n_values(row[ok], ts[ok], len(user_ids), vocab.history_len)
        order = np.argsort(row, kind="stable")
        counts = np.bincount(row, minlength=len(user_ids))
        return cls(
            user_ids=user_ids,
            user_index=vocab.user_index(user_ids),
            user_cats=vocab.encode_user_cats(users),
            history=history,
            history_ts=history_ts,
            seen_indptr=np.r_[0, np.cumsum(counts)].astype(np.int64),
            seen_items=item_raw[order],
            n_users=len(vocab.user_ids),
            n_hash_buckets=vocab.n_hash_buckets,
        )

    def lookup(self, raw_user_ids: np.ndarray) -> UserFeatures:
        raw = np.asarray(raw_user_ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self.user_ids, raw), len(self.user_ids) - 1)
        known = self.user_ids[pos] == raw
        hashed = self.n_users + hash_bucket(raw, self.n_hash_buckets)
        user_index = np.where(known, self.user_index[pos], hashed)[:, None]
        user_cats = np.where(known[:, None], self.user_cats[pos], 0)
        history = np.where(known[:, None], self.history[pos], 0)
        history_ts = np.where(known[:, None], self.history_ts[pos], 0)
        seen = [
            self.seen_items[self.seen_indptr[p] : self.seen_indptr[p + 1]] if k else _EMPTY
            for p, k in zip(pos, known, strict=True)
        ]
        return UserFeatures(user_index, user_cats, history, known, seen, history_ts)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:  # np.savez wants the .npz name
            np.savez(tmp, **{k: np.asarray(v) for k, v in self.__dict__.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSnapshot:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                user_ids=z["user_ids"],
                user_index=z["user_index"],
                user_cats=z["user_cats"],
                history=z["history"],
                # Snapshots written before time gaps existed: timestamps unknown (0).
                history_ts=z["history_ts"]
                if "history_ts" in z.files
                else np.zeros_like(z["history"]),
                seen_indptr=z["seen_indptr"],
                seen_items=z["seen_items"],
                n_users=int(z["n_users"]),
                n_hash_buckets=int(z["n_hash_buckets"]),
            )


_EMPTY = np.zeros(0, dtype=np.int64)
