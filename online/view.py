"""One model version's reading of the shared store: raw ids -> that version's inputs.

The store holds raw ids only, so production and canary, whose vocabularies differ (a
retrain adds items, users, category values), read the same keys and each maps them here.
The result is the `UserFeatures` that `FeatureSnapshot.build(vocab, users,
interactions).lookup(ids)` gives for the same data, built with the same helpers
(FeatureVocab.user_index, hash_bucket, last_n_history) so the two cannot drift apart.

Two documented differences from a snapshot:
- `seen` is sorted and without repeats (a snapshot keeps time order and repeats). It is
  only used as a filter (serving.recommender.select_unseen), where a set is a set.
- The store keeps the last `history_len` raw events. A version drops the items outside
  its catalogue *then* takes its H newest, so it fills H as long as the store's window
  holds H catalogue items: keep the store's history_len above the versions' H.
"""

from __future__ import annotations

import numpy as np

from models.features import UNKNOWN, FeatureVocab, hash_bucket, last_n_history, last_n_values
from models.snapshot import UserFeatures
from online.state import RawUserState


class VersionView:
    def __init__(self, vocab: FeatureVocab):
        self.vocab = vocab
        self.n_users = len(vocab.user_ids)
        # Category value -> code, per categorical, in the vocab's column order; a value
        # the version never saw is 0 (UNKNOWN), as FeatureVocab.encode_user_cats does.
        self._cat_codes = [
            (name, {v: i for i, v in enumerate(values)}) for name, values in vocab.user_cats.items()
        ]

    def to_features(self, raw: RawUserState) -> UserFeatures:
        ids = np.asarray(raw.user_ids, dtype=np.int64)
        n, h = len(ids), self.vocab.history_len
        exists = raw.exists
        # Same rule as FeatureSnapshot.lookup: a user the store has gets the vocab's row
        # (their own, or the hashed one if the model never trained on them); a user it
        # lacks gets the hashed row.
        hashed = self.n_users + hash_bucket(ids, self.vocab.n_hash_buckets)
        vocab_index = self.vocab.user_index(ids) if self.n_users else hashed
        user_index = np.where(exists, vocab_index, hashed)[:, None]

        user_cats = np.zeros((n, len(self._cat_codes)), dtype=np.int64)
        for i, rec in enumerate(raw.records):
            if rec.exists:
                for j, (name, codes) in enumerate(self._cat_codes):
                    user_cats[i, j] = codes.get(rec.cats.get(name, UNKNOWN), 0)

        lens = np.fromiter((len(r.history_items) for r in raw.records), np.int64, n)
        flat = (
            np.concatenate([r.history_items for r in raw.records])
            if lens.sum()
            else np.zeros(0, np.int64)
        )
        ts = (
            np.concatenate([r.history_ts for r in raw.records])
            if lens.sum()
            else np.zeros(0, np.float64)
        )
        rows = np.repeat(np.arange(n), lens)  # oldest first within each row: time order
        idx = self.vocab.item_index(flat) if len(flat) else flat
        ok = idx >= 0  # items outside this version's catalogue cannot be history
        history = last_n_history(rows[ok], idx[ok], n, h)
        # Whole seconds, as training's `timestamp` column; the store keeps fractions.
        history_ts = last_n_values(rows[ok], np.floor(ts[ok]), n, h)
        seen = [r.seen for r in raw.records]
        return UserFeatures(user_index, user_cats, history, exists, seen, history_ts)
