"""Who the load asks for: Zipf-like known users plus a share of users the server never saw.

Real traffic is skewed: a few heavy users make many requests and most users few.
`UserSampler` draws ranks with P(rank r) ∝ 1 / r**a over the known users (shuffled once,
so popularity has nothing to do with id order), and replaces a share of draws with ids
outside the snapshot, which `recommend` answers as cold starts.

Known users come from a repository's online feature snapshot (what `recommend` reads)
or from a users parquet (`user_id` column).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.routing import RoutingState

# Far above any id the synthetic worlds or MovieLens use, so unknown ids never collide.
UNKNOWN_ID_BASE = 10**12


@dataclass(frozen=True)
class UserSampler:
    known: np.ndarray  # (U,) raw ids, in popularity order (rank 1 first)
    cdf: np.ndarray  # (U,) cumulative Zipf probabilities over `known`
    unknown_share: float

    @classmethod
    def build(
        cls,
        known_ids: np.ndarray,
        *,
        zipf_a: float = 0.8,
        unknown_share: float = 0.05,
        seed: int = 0,
    ) -> UserSampler:
        """P(rank r) = r**-a / Σ_j j**-a over the known users; a=0 is uniform.

        a=0.8 gives a heavy head without one user dominating: at 20k users the busiest user
        makes ~3% of the requests and the top 1% of users ~31% (a=1.1: 15% and 68%).
        """
        if not 0.0 <= unknown_share <= 1.0:
            raise ValueError(f"unknown_share={unknown_share}: expected a share in [0, 1]")
        if zipf_a < 0:
            raise ValueError(f"zipf_a={zipf_a}: expected >= 0")
        known = np.unique(np.asarray(known_ids, dtype=np.int64))
        if len(known) == 0 and unknown_share < 1.0:
            raise ValueError("no known users: pass unknown_share=1.0 or a non-empty snapshot")
        rng = np.random.default_rng(seed)
        known = rng.permutation(known)
        weights = np.arange(1, len(known) + 1, dtype=np.float64) ** -zipf_a
        cdf = np.cumsum(weights / weights.sum()) if len(known) else np.zeros(0)
        return cls(known, cdf, float(unknown_share))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) raw user ids; about `unknown_share` of them unknown to the server."""
        out = np.empty(n, dtype=np.int64)
        unknown = rng.random(n) < self.unknown_share
        n_known = int((~unknown).sum())
        if n_known:
            idx = np.searchsorted(self.cdf, rng.random(n_known) * self.cdf[-1], side="right")
            out[~unknown] = self.known[np.minimum(idx, len(self.known) - 1)]
        out[unknown] = UNKNOWN_ID_BASE + rng.integers(0, 2**40, size=int(unknown.sum()))
        return out


def known_user_ids(
    *, repo: str | Path | None = None, users: str | Path | None = None
) -> np.ndarray:
    """Raw user ids from a users parquet, else from the repo's production feature snapshot."""
    if users:
        return pd.read_parquet(users, columns=["user_id"])["user_id"].to_numpy(np.int64)
    if repo:
        return production_snapshot(repo).user_ids.astype(np.int64)
    raise ValueError("known users: pass a model repository or a users parquet")


def production_snapshot(repo: str | Path):
    """The online feature snapshot `recommend` uses for the production version."""

    routing = RoutingState.load(layout.routing_path(repo))
    return FeatureSnapshot.load(layout.features_path(repo, routing.production))
