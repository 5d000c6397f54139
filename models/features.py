"""The feature contract between training, export and serving.

Raw ids (whatever the source uses) never reach a tensor: `FeatureVocab` maps
them to dense indices. Unknown and cold users are hashed into a small set of
shared rows so that the user tower always has an embedding to look up; the
hash is deterministic and implemented here once, in numpy, so training, the
Triton `recommend` model and clients agree on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_path, atomic_write_text

# Categorical user attributes that feed the user tower and the fairness audit.
# `occupation` exists only where the source has it (MovieLens); synth fills "unknown".
USER_CATEGORICALS = ("gender", "age_bucket", "activity", "occupation")
ITEM_CATEGORICALS = ("genre", "provider")

# The names and dims of the `retrieval` graph; config.pbtxt files and clients read these.
INPUT_USER_INDEX = "user_index"  # INT64 [B, 1]
INPUT_USER_CATS = "user_cats"  # INT64 [B, C]
INPUT_HISTORY = "history"  # INT64 [B, H]; dense item index + 1, 0 = padding
# INT64 [B, H]; unix seconds of each `history` item, 0 = padding. Only graphs whose sequence
# tower reads time gaps (TowerConfig.time_gaps) take it; every other graph has the three above.
INPUT_HISTORY_TS = "history_ts"
OUTPUT_ITEM_IDS = "item_ids"  # INT64 [B, K]; raw item ids
OUTPUT_SCORES = "scores"  # FP32 [B, K]; cosine similarity, descending
INPUT_NAMES = (INPUT_USER_INDEX, INPUT_USER_CATS, INPUT_HISTORY)
OUTPUT_NAMES = (OUTPUT_ITEM_IDS, OUTPUT_SCORES)


def input_names(time_gaps: bool) -> tuple[str, ...]:
    """A retrieval graph's inputs, in the order its forward takes them."""
    return (*INPUT_NAMES, INPUT_HISTORY_TS) if time_gaps else INPUT_NAMES


def graph_input_names(meta: dict) -> tuple[str, ...]:
    """The inputs a published version's graph takes, from its meta.json (`inputs`, written
    at export; versions published before time gaps existed list the three of INPUT_NAMES)."""
    return input_names(INPUT_HISTORY_TS in meta.get("inputs", {}))


UNKNOWN = "unknown"


@dataclass(frozen=True)
class FeatureSpec:
    """Table sizes. Everything an nn.Module needs to be built, and nothing else."""

    n_users: int
    n_items: int
    n_hash_buckets: int
    history_len: int
    user_cat_cardinalities: tuple[int, ...]
    item_cat_cardinalities: tuple[int, ...]

    @property
    def user_rows(self) -> int:
        return self.n_users + self.n_hash_buckets


def hash_bucket(raw_ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """splitmix64 of the raw id, modulo n_buckets: stable across processes and platforms."""
    x = np.asarray(raw_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n_buckets)).astype(np.int64)


@dataclass(frozen=True)
class FeatureVocab:
    """Raw id and category vocabularies, fitted on training data only."""

    user_ids: np.ndarray  # (n_users,) raw ids of users with their own embedding row
    item_ids: np.ndarray  # (n_items,) raw ids; row i of the item table is item_ids[i]
    user_cats: dict[str, list[str]]  # per attribute, index 0 is UNKNOWN
    item_cats: dict[str, list[str]]
    n_hash_buckets: int
    history_len: int

    @classmethod
    def fit(
        cls,
        users: pd.DataFrame,
        items: pd.DataFrame,
        train: pd.DataFrame,
        *,
        n_hash_buckets: int,
        history_len: int,
        min_user_interactions: int = 1,
    ) -> FeatureVocab:
        counts = train["user_id"].value_counts()
        # Users below the threshold share hashed rows: their own row would be noise.
        known = np.sort(counts[counts >= min_user_interactions].index.to_numpy(np.int64))
        user_cats = {
            c: [UNKNOWN, *sorted(set(users[c].astype(str)) - {UNKNOWN})] for c in USER_CATEGORICALS
        }
        item_cats = {
            c: [UNKNOWN, *sorted(set(items[c].astype(str)) - {UNKNOWN})] for c in ITEM_CATEGORICALS
        }
        return cls(
            user_ids=known,
            item_ids=np.sort(items["item_id"].to_numpy(np.int64)),
            user_cats=user_cats,
            item_cats=item_cats,
            n_hash_buckets=n_hash_buckets,
            history_len=history_len,
        )

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(
            n_users=len(self.user_ids),
            n_items=len(self.item_ids),
            n_hash_buckets=self.n_hash_buckets,
            history_len=self.history_len,
            user_cat_cardinalities=tuple(len(v) for v in self.user_cats.values()),
            item_cat_cardinalities=tuple(len(v) for v in self.item_cats.values()),
        )

    def user_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Dense row per user; unknown users land in a hashed shared row after the known ones."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        pos = np.searchsorted(self.user_ids, raw_ids)
        pos_clipped = np.minimum(pos, max(len(self.user_ids) - 1, 0))
        known = (len(self.user_ids) > 0) & (self.user_ids[pos_clipped] == raw_ids)
        hashed = len(self.user_ids) + hash_bucket(raw_ids, self.n_hash_buckets)
        return np.where(known, pos_clipped, hashed)

    def is_known_user(self, raw_ids: np.ndarray) -> np.ndarray:
        return self.user_index(raw_ids) < len(self.user_ids)

    def item_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Dense item index, or -1 for an item outside the catalogue."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, raw_ids), len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == raw_ids, pos, -1)

    def encode_user_cats(self, users: pd.DataFrame) -> np.ndarray:
        """(U, C) codes; values unseen in training map to 0 (UNKNOWN)."""
        return _encode(users, self.user_cats)

    def encode_item_cats(self, items: pd.DataFrame) -> np.ndarray:
        return _encode(items, self.item_cats)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with atomic_path(path.with_suffix(".npz"), suffix=".npz") as tmp:
            np.savez(tmp, user_ids=self.user_ids, item_ids=self.item_ids)
        meta = {
            "user_cats": self.user_cats,
            "item_cats": self.item_cats,
            "n_hash_buckets": self.n_hash_buckets,
            "history_len": self.history_len,
        }
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> FeatureVocab:
        path = Path(path)
        arrays = np.load(path.with_suffix(".npz"), allow_pickle=False)
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(
            user_ids=arrays["user_ids"],
            item_ids=arrays["item_ids"],
            user_cats={k: list(v) for k, v in meta["user_cats"].items()},
            item_cats={k: list(v) for k, v in meta["item_cats"].items()},
            n_hash_buckets=int(meta["n_hash_buckets"]),
            history_len=int(meta["history_len"]),
        )


def _encode(df: pd.DataFrame, vocab: dict[str, list[str]]) -> np.ndarray:
    cols = []
    for name, values in vocab.items():
        lookup = {v: i for i, v in enumerate(values)}
        col = df[name].astype(str) if name in df.columns else pd.Series([UNKNOWN] * len(df))
        cols.append(col.map(lookup).fillna(0).to_numpy(np.int64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(df), 0), np.int64)


def last_n_history(
    user_index: np.ndarray, item_index: np.ndarray, n_users: int, history_len: int
) -> np.ndarray:
    """(n_users, H) most recent items per user, newest first, as item index + 1 (0 = padding).

    Rows must already be in time order; that is what makes "most recent" true.
    """
    return last_n_values(user_index, np.asarray(item_index) + 1, n_users, history_len)


def last_n_values(
    user_index: np.ndarray, values: np.ndarray, n_users: int, history_len: int
) -> np.ndarray:
    """(n_users, H) int64: each user's last H `values` (rows in time order), newest first,
    0 = padding. With item index + 1 this is `last_n_history`; with the rows' timestamps
    it is the matching `history_ts`."""
    out = np.zeros((n_users, history_len), dtype=np.int64)
    if len(user_index) == 0:
        return out
    order = np.argsort(user_index, kind="stable")  # stable keeps time order within a user
    u, v = user_index[order], np.asarray(values)[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    ends = np.r_[starts[1:], len(u)]
    group_end = np.repeat(ends, ends - starts)
    rank_from_end = group_end - 1 - np.arange(len(u))  # 0 = newest
    keep = rank_from_end < history_len
    out[u[keep], rank_from_end[keep]] = v[keep]
    return out
