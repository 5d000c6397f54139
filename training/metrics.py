"""Ranking metrics. Pure, keyword-only, vectorised over users.

Everything starts from a hit matrix: hits[u, j] is True when the item ranked
at position j (0-based) for user u is relevant. Per-user arrays are returned
so that the fairness audit can aggregate them by group.
"""

from __future__ import annotations

import numpy as np


def hit_matrix(
    *, ranked: np.ndarray, relevant_users: np.ndarray, relevant_items: np.ndarray, n_items: int
) -> np.ndarray:
    """(U, K) bool. ranked (U, K) dense item indices (-1 = empty slot); relevant_* are pairs
    (row in `ranked`, dense item index)."""
    u = np.arange(ranked.shape[0], dtype=np.int64)[:, None]
    keys = u * (n_items + 1) + (ranked + 1)  # +1 keeps -1 slots from colliding with item 0
    rel = relevant_users.astype(np.int64) * (n_items + 1) + (relevant_items.astype(np.int64) + 1)
    return np.isin(keys, rel) & (ranked >= 0)


def recall_at_k(*, hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """recall@k(u) = |relevant ∩ top-k(u)| / |relevant(u)|; users with none get 0."""
    found = hits[:, :k].sum(axis=1)
    return np.where(n_relevant > 0, found / np.maximum(n_relevant, 1), 0.0)


def ndcg_at_k(*, hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """ndcg@k(u) = DCG / IDCG with binary gains, DCG = sum_j hit_j / log2(j + 2) over j < k,
    and IDCG the DCG of min(|relevant|, k) hits at the top."""
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    dcg = (hits[:, :k] * discounts[: hits[:, :k].shape[1]]).sum(axis=1)
    ideal_cum = np.r_[0.0, np.cumsum(discounts)]  # ideal_cum[n] = IDCG with n hits
    idcg = ideal_cum[np.minimum(n_relevant, k)]
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


def hit_rate_at_k(*, hits: np.ndarray, k: int) -> np.ndarray:
    """hitrate@k(u) = 1 if any relevant item is in the top k, else 0."""
    return hits[:, :k].any(axis=1).astype(np.float64)


def coverage_at_k(*, ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one user's top k."""
    top = ranked[:, :k]
    return float(np.unique(top[top >= 0]).size / max(n_items, 1))


def per_user_metrics(
    *,
    hits: np.ndarray,
    n_relevant: np.ndarray,
    recall_ks=(10, 50, 100),
    ndcg_ks=(10, 50),
    hit_ks=(10,),
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k in recall_ks:
        out[f"recall@{k}"] = recall_at_k(hits=hits, n_relevant=n_relevant, k=k)
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = ndcg_at_k(hits=hits, n_relevant=n_relevant, k=k)
    for k in hit_ks:
        out[f"hitrate@{k}"] = hit_rate_at_k(hits=hits, k=k)
    return out


# Popularity bias of a ranking. The same definitions as `fairness.exposure` (position_weights,
# item_exposure, gini, average_recommendation_popularity), restated here because training sits
# below fairness in the import layers; tests/unit/test_baselines.py checks they agree.


def exposure_gini_at_k(*, ranked: np.ndarray, n_items: int, k: int) -> float:
    """Gini of item exposure over the whole catalogue, exposure(i) = sum over users of
    1 / log2(1 + rank) for each top-k slot holding i (never-shown items count as 0).
    0 = every item equally exposed, (n-1)/n = one item gets all of it."""
    top = ranked[:, :k]
    w = np.broadcast_to(1.0 / np.log2(1.0 + np.arange(1, top.shape[1] + 1)), top.shape)
    valid = top >= 0
    x = np.sort(np.bincount(top[valid], weights=w[valid], minlength=n_items).astype(np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def arp_at_k(*, ranked: np.ndarray, popularity: np.ndarray, k: int) -> float:
    """Average recommendation popularity: mean over users of the mean history count of the
    items in their top k (Abdollahpouri et al. 2019). Users with an empty list are left out."""
    top = ranked[:, :k]
    valid = top >= 0
    vals = np.where(valid, np.asarray(popularity, np.float64)[np.maximum(top, 0)], 0.0)
    n = valid.sum(axis=1)
    if not (n > 0).any():
        return 0.0
    return float((vals.sum(axis=1)[n > 0] / n[n > 0]).mean())
