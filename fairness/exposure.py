"""Item-side (provider) fairness: who gets seen, and is it in proportion to who is wanted.

Pure, keyword-only functions over dense arrays. `ranked` is (U, K) dense item indices in
rank order, -1 for an empty slot; only the first `k` columns are read. Item groups are
integer codes (n_items,) in [0, n_groups).

References:
- Singh & Joachims, "Fairness of Exposure in Rankings", KDD 2018 (exposure, disparate
  treatment ratio).
- Abdollahpouri, Burke & Mobasher, "Managing Popularity Bias in Recommender Systems with
  Personalized Re-ranking", FLAIRS 2019 (ARP, APLT, head/tail split by share of ratings).
"""

from __future__ import annotations

import numpy as np

HEAD, MID, TAIL = 0, 1, 2
POPULARITY_BUCKETS = ("head", "mid", "tail")


def position_weights(*, k: int) -> np.ndarray:
    """(k,) exposure of rank r = 1..k: w(r) = 1 / log2(1 + r), so w(1) = 1, w(3) = 0.5.

    The DCG discount: the attention a slot gets falls off logarithmically with its rank.
    """
    return 1.0 / np.log2(1.0 + np.arange(1, k + 1, dtype=np.float64))


def item_exposure(*, ranked: np.ndarray, n_items: int, k: int) -> np.ndarray:
    """(n_items,) total exposure of each item: sum over users of w(rank of the item in the
    user's top k), 0 for items never shown. Empty slots (-1) expose nothing."""
    top = ranked[:, :k]
    w = np.broadcast_to(position_weights(k=top.shape[1]), top.shape)
    valid = top >= 0
    return np.bincount(top[valid], weights=w[valid], minlength=n_items).astype(np.float64)


def group_shares(*, values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups,) share of sum(values) that falls on each group; zeros when the total is 0."""
    totals = np.bincount(groups, weights=values, minlength=n_groups).astype(np.float64)
    total = totals.sum()
    return totals / total if total > 0 else np.zeros(n_groups)


def disparate_treatment_ratio(
    *, exposure_a: float, relevance_a: float, exposure_b: float, relevance_b: float
) -> float:
    """DTR(a, b) = (Exposure(a) / U(a)) / (Exposure(b) / U(b)).

    Singh & Joachims define Exposure(G) and U(G) as per-item averages over the group; the
    1/|G| cancels in each quotient, so totals or shares give the same ratio. 1 means each
    group gets exposure in proportion to its relevance; < 1 means `a` is under-exposed
    relative to `b`. NaN when a group has no relevance or `b` gets no exposure.
    """
    if relevance_a <= 0 or relevance_b <= 0 or exposure_b <= 0:
        return float("nan")
    return float((exposure_a / relevance_a) / (exposure_b / relevance_b))


def gini(*, values: np.ndarray) -> float:
    """Gini coefficient of a non-negative distribution, 0 = equal, (n-1)/n = one holder.

    G = sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending, i = 1..n. Every catalogue
    item counts, including the never-shown ones; 0 for an all-zero vector.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def lorenz_curve(*, values: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): share of items (least exposed first) against their share of exposure, sampled at
    `points` evenly spaced item shares from 0 to 1. The area between y and x is Gini / 2."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    total = x.sum()
    cum = np.r_[0.0, np.cumsum(x) / total] if total > 0 else np.linspace(0, 1, x.size + 1)
    share = np.linspace(0.0, 1.0, points)
    return share, np.interp(share * x.size, np.arange(x.size + 1), cum)


def catalogue_coverage(*, ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of catalogue items in at least one user's top k."""
    top = ranked[:, :k]
    return float(np.unique(top[top >= 0]).size / max(n_items, 1))


def popularity_buckets(
    *, counts: np.ndarray, head_share: float = 0.2, tail_share: float = 0.2
) -> np.ndarray:
    """(n_items,) HEAD / MID / TAIL codes from interaction counts.

    Items are sorted by count, most popular first (ties by index). `s_j` is the share of all
    interactions held by the items before item j. Head: s_j < head_share, i.e. the fewest
    popular items that together hold `head_share` of interactions. Tail: s_j >= 1 - tail_share,
    the items that together hold the last `tail_share` (never-seen items included). Mid: the
    rest. With no interactions at all, every item is tail.
    """
    counts = np.asarray(counts, dtype=np.float64)
    out = np.full(counts.size, TAIL, dtype=np.int64)
    total = counts.sum()
    if total <= 0:
        return out
    order = np.argsort(-counts, kind="stable")
    before = np.r_[0.0, np.cumsum(counts[order])[:-1]] / total
    bucket = np.where(before < head_share, HEAD, np.where(before >= 1.0 - tail_share, TAIL, MID))
    out[order] = bucket
    return out


def _per_user_mean(*, ranked: np.ndarray, item_values: np.ndarray, k: int) -> np.ndarray:
    """(U,) mean of item_values over each user's non-empty top-k slots; NaN for empty lists."""
    top = ranked[:, :k]
    valid = top >= 0
    vals = np.where(valid, item_values[np.maximum(top, 0)], 0.0)
    n = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, vals.sum(axis=1) / n, np.nan)


def average_recommendation_popularity(
    *, ranked: np.ndarray, popularity: np.ndarray, k: int
) -> float:
    """ARP = (1/|U|) sum_u (1/|L_u|) sum_{i in L_u} phi(i), phi(i) = the item's interaction
    count in the history. Users with an empty list are left out."""
    per_user = _per_user_mean(ranked=ranked, item_values=np.asarray(popularity, float), k=k)
    return float(np.nanmean(per_user)) if np.isfinite(per_user).any() else 0.0


def average_percentage_long_tail(*, ranked: np.ndarray, long_tail: np.ndarray, k: int) -> float:
    """APLT = (1/|U|) sum_u |{i in L_u : i in Gamma}| / |L_u|, Gamma = the long-tail items
    (a boolean mask over the catalogue). Users with an empty list are left out."""
    per_user = _per_user_mean(ranked=ranked, item_values=np.asarray(long_tail, float), k=k)
    return float(np.nanmean(per_user)) if np.isfinite(per_user).any() else 0.0
