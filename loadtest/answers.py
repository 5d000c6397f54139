"""Is an answer right? The checks Locust applies to every response (kept apart from the
locustfile, which patches gevent, so they are unit-tested as plain functions).

A wrong answer is a failed request: a load test that counts fast wrong answers as
successes measures nothing. Each check returns None when the answer is right, else why not.
"""

from __future__ import annotations

import numpy as np

from serving.repository import PAD_ITEM


def _not_in(ids: np.ndarray, catalogue: np.ndarray | None) -> np.ndarray:
    if catalogue is None or not len(ids):
        return ids[:0]
    pos = np.minimum(np.searchsorted(catalogue, ids), len(catalogue) - 1)
    return ids[catalogue[pos] != ids]


def check_recommend(
    item_ids: np.ndarray,
    *,
    k: int,
    graph_k: int,
    seen: np.ndarray | None,
    catalogue: np.ndarray | None = None,
    seen_is_all: bool = True,
) -> str | None:
    """One user's slate: `k` distinct catalogue ids, then only padding, none already seen.
    A slate may be short, even empty, only where the seen items used up the over-fetch:
    that is recommend's contract (the locustfile counts such slates apart).

    `graph_k`: candidates the graph over-fetches; `seen`: the user's seen items in the
    snapshot of the version that answered (empty for a cold user), None when unknown.
    Fewer than k is right only where seen items may have taken more than the over-fetch:
    always possible when the server may know more seen items than `seen`
    (`seen_is_all=False`: it ingests feedback, so a user's seen set grows while it serves)."""
    ids = np.asarray(item_ids).reshape(-1)
    valid = ids[ids != PAD_ITEM]
    if len(ids) < k:
        return f"{len(ids)} item ids; expected {k}"
    if (ids[: len(valid)] == PAD_ITEM).any() or (valid < 0).any():
        return f"padding before items or a negative id: {ids.tolist()}"
    if len(np.unique(valid)) != len(valid):
        return f"a repeated item: {valid.tolist()}"
    if len(valid) > k:
        return f"{len(valid)} items; asked for {k}"
    # Seen items may have used up the over-fetch: a short slate is then right.
    short = seen is None or not seen_is_all or len(seen) > graph_k - k
    if len(valid) < k and not short:
        return f"{len(valid)} items for a user with {len(seen)} seen; expected {k}"
    if seen is not None and len(seen) and np.isin(valid, seen).any():
        return f"already seen items recommended: {valid[np.isin(valid, seen)].tolist()}"
    if len(bad := _not_in(valid, catalogue)):
        return f"ids not in the catalogue: {bad.tolist()}"
    return None


def check_retrieval(
    item_ids: np.ndarray,
    scores: np.ndarray,
    *,
    batch: int,
    graph_k: int,
    catalogue: np.ndarray | None = None,
) -> str | None:
    """A batch's top-`graph_k`: one row per user, distinct catalogue ids in score order."""
    ids, sc = np.asarray(item_ids), np.asarray(scores)
    if ids.shape != (batch, graph_k) or sc.shape != ids.shape:
        return f"shapes {ids.shape} and {sc.shape}; expected {(batch, graph_k)}"
    if (ids < 0).any():
        return "a negative item id"
    if not np.isfinite(sc).all():
        return "a score that is not finite"
    if (np.diff(sc, axis=1) > 0).any():
        return "scores not in descending order"
    if any(len(np.unique(row)) != graph_k for row in ids):
        return "a repeated item in a row"
    if len(bad := _not_in(ids.reshape(-1), catalogue)):
        return f"ids not in the catalogue: {np.unique(bad).tolist()[:10]}"
    return None
