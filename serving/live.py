"""Live features for `recommend`: the shared online store (online/) in place of the
per-version snapshot files.

Set `NORTHSTAR_ONLINE_STORE=redis://…` in the server's environment (`northstar serve
--online-store`) or the `online_store` parameter of recommend's config.pbtxt. Each routed
version then reads the same store through its own vocabulary (online.view), so a click
acknowledged by the `feedback` model reaches every version's history and seen set within
the store's consumer lag plus the cache's TTL, not at the next retrain.
"""

from __future__ import annotations

import numpy as np

from models.features import FeatureVocab
from models.snapshot import UserFeatures
from online.cache import CachedFeatures, open_cached
from online.config import ONLINE_STORE_ENV, OnlineStoreConfig, online_store_url
from online.view import VersionView

__all__ = ["ONLINE_STORE_ENV", "StoreFeatures", "online_store_url", "open_online_store"]

VOCAB_STEM = "vocab"  # recommend/state/versions/<N>/vocab.{json,npz}, written by export


def open_online_store(url: str) -> CachedFeatures:
    """The store and its in-process cache; raises naming the URL when Redis does not answer."""
    return open_cached(OnlineStoreConfig(url=url))


class StoreFeatures:
    """One version's `lookup`, the same call a FeatureSnapshot answers, read from the store.

    Users the store could not answer for (Redis down, nothing cached) come back as cold
    starts; `take_degraded()` says how many since the last call, for the metrics.
    """

    def __init__(self, vocab: FeatureVocab, source: CachedFeatures):
        self.view = VersionView(vocab)
        self.source = source
        self._degraded = 0

    def lookup(self, raw_user_ids: np.ndarray) -> UserFeatures:
        raw = self.source.read(np.asarray(raw_user_ids, dtype=np.int64).reshape(-1))
        self._degraded += int(np.count_nonzero(raw.degraded))
        return self.view.to_features(raw)

    def take_degraded(self) -> int:
        n, self._degraded = self._degraded, 0
        return n
