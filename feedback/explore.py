"""ε-greedy exploration over over-fetched candidates, with the propensity to log.

With probability ε a request is served a uniformly random ranking of its candidates
instead of the model's top K. Logging P(item at slot | policy) for every shown item lets
an off-policy estimator (IPS, position-based) evaluate other rankings later from this log.

The propensity of item i at slot p under the mixture policy is the marginal

    propensity(i, p) = (1 - ε) * 1[greedy puts i at p] + ε * P_random(i at p)

and for a uniform random permutation of the row's N valid candidates, truncated to K
slots, P_random(i at p) = 1 / N for every candidate and every slot p < min(K, N). So:

- an item the greedy ranking also puts at p: (1 - ε) + ε / N  (every slot of a greedy row);
- any other item (only in explored rows): ε / N.

The value depends on the (item, slot) pair, not on which arm was drawn: an explored row
that happens to match the greedy ranking at a slot logs (1 - ε) + ε / N there, which is
what an unbiased estimator needs. Plackett-Luce sampling was not chosen because its
marginal P(i at p) has no closed form beyond the top slot: it would need Monte Carlo
estimates, and a wrong propensity biases every estimate built on the log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranking:
    item_ids: np.ndarray  # (B, W) int64, W = max k; pad_item = empty slot
    scores: np.ndarray  # (B, W) float32; the model's score of the item in the slot
    propensity: np.ndarray  # (B, W) float64; P(item at slot | policy); 0 for empty slots
    explored: np.ndarray  # (B,) bool; True = this row was served the random arm


def rank_with_exploration(
    item_ids: np.ndarray,
    scores: np.ndarray,
    k: int | np.ndarray,
    *,
    epsilon: float,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
    pad_item: int = -1,
    pad_score: float = 0.0,
) -> Ranking:
    """Pick k of N candidates per row: the greedy top k, or with probability ε a random k.

    item_ids, scores: (B, N), each row in descending score order (what `retrieval` returns);
    k: an int, or (B,) per row (slots past a row's k stay empty); valid: (B, N) bool,
    default item_ids != pad_item (False for seen or padding candidates). Candidates must
    be distinct within a row. Output width is max(k); empty slots hold pad_item and
    pad_score (0.0 because Triton's JSON cannot carry -inf). See the module docstring for
    the propensity.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if item_ids.ndim != 2 or scores.shape != item_ids.shape:
        raise ValueError(f"item_ids {item_ids.shape} and scores {scores.shape}: expected (B, N)")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon={epsilon}: expected a probability in [0, 1]")
    b, n = item_ids.shape
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (b,))
    width = int(ks.max()) if b else 0
    valid = item_ids != pad_item if valid is None else np.asarray(valid, dtype=bool)
    n_valid = valid.sum(axis=1)  # (B,)
    explored = rng.random(b) < epsilon  # (B,)

    # Pad the candidate axis so that the first `width` columns of an ordering always exist.
    if n < width:
        pad = ((0, 0), (0, width - n))
        item_ids = np.pad(item_ids, pad, constant_values=pad_item)
        scores = np.pad(scores, pad, constant_values=pad_score)
        valid = np.pad(valid, pad, constant_values=False)
        n = width
    rank_key = np.where(valid, np.arange(n, dtype=np.float64), np.inf)  # (B, N)
    rand_key = np.where(valid, rng.random((b, n)), np.inf)  # (B, N)
    greedy_order = np.argsort(rank_key, axis=1, kind="stable")[:, :width]  # (B, W)
    order = np.where(explored[:, None], np.argsort(rand_key, axis=1)[:, :width], greedy_order)

    in_k = np.arange(width)[None, :] < ks[:, None]  # (B, W)
    shown = np.take_along_axis(valid, order, axis=1) & in_k  # (B, W)
    out_items = np.where(shown, np.take_along_axis(item_ids, order, axis=1), pad_item)
    out_scores = np.where(shown, np.take_along_axis(scores, order, axis=1), pad_score)
    greedy_items = np.where(
        np.take_along_axis(valid, greedy_order, axis=1) & in_k,
        np.take_along_axis(item_ids, greedy_order, axis=1),
        pad_item,
    )
    p_random = epsilon / np.maximum(n_valid, 1)  # (B,)
    same = out_items == greedy_items  # (B, W)
    propensity = np.where(shown, (1.0 - epsilon) * same + p_random[:, None], 0.0)
    return Ranking(out_items, out_scores.astype(np.float32), propensity, explored)
