"""Offline evaluation: full-catalogue ranking, each user's known items excluded.

No sampled negatives: every catalogue item competes, which is what serving
does. TopPop (most popular in the known interactions) is ranked through the
same code path, so the comparison is apples to apples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from models.features import FeatureVocab
from models.snapshot import FeatureSnapshot
from models.towers import TwoTower
from training.metrics import coverage_at_k, hit_matrix, per_user_metrics

MAX_K = 100


@dataclass(frozen=True)
class EvalResult:
    user_ids: np.ndarray  # (U,) raw ids of evaluated users
    per_user: dict[str, np.ndarray]  # metric -> (U,)
    ranked: np.ndarray  # (U, min(MAX_K, n_items)) dense item indices; -1 = empty slot
    summary: dict[str, float]


def _rank(
    score_fn, snap_rows, seen_pairs, n_users_eval: int, n_items: int, k: int, chunk: int
) -> np.ndarray:
    ranked = np.empty((n_users_eval, k), dtype=np.int64)
    seen_u, seen_i = seen_pairs
    for start in range(0, n_users_eval, chunk):
        stop = min(start + chunk, n_users_eval)
        scores = score_fn(snap_rows[start:stop])  # (b, N)
        sel = (seen_u >= start) & (seen_u < stop)
        scores[seen_u[sel] - start, seen_i[sel]] = -np.inf
        top = torch.topk(torch.from_numpy(scores), k, dim=1)
        # A user with fewer than k unknown items: the rest of the row is empty (-1), never
        # a known item picked up at -inf (it would count as a hit when re-watched).
        ranked[start:stop] = np.where(np.isneginf(top.values.numpy()), -1, top.indices.numpy())
    return ranked


def evaluate(
    *,
    model: TwoTower,
    vocab: FeatureVocab,
    users: pd.DataFrame,
    known: pd.DataFrame,
    target: pd.DataFrame,
    chunk: int = 2048,
) -> dict[str, EvalResult]:
    """Rank for every user with at least one `target` interaction.

    `known` (time-ordered) supplies history and the items to exclude; `target`
    is what the user did next. Returns {"model": ..., "toppop": ...}.
    """
    n_items = len(vocab.item_ids)
    k = min(MAX_K, n_items)
    t_items = vocab.item_index(target["item_id"].to_numpy())
    target = target[t_items >= 0]
    t_items = t_items[t_items >= 0]
    eval_users = np.unique(target["user_id"].to_numpy(np.int64))
    row_of = {u: i for i, u in enumerate(eval_users)}
    rel_u = np.fromiter((row_of[u] for u in target["user_id"].to_numpy()), np.int64, len(target))
    # Count each (user, item) once: a re-watch is not a second relevant item.
    pairs = np.unique(np.stack([rel_u, t_items], 1), axis=0)
    rel_u, rel_i = pairs[:, 0], pairs[:, 1]
    n_relevant = np.bincount(rel_u, minlength=len(eval_users))

    snap = FeatureSnapshot.build(vocab, users, known)
    feats = snap.lookup(eval_users)
    k_items = vocab.item_index(known["item_id"].to_numpy())
    k_rows = np.searchsorted(eval_users, known["user_id"].to_numpy(np.int64))
    in_eval = (k_rows < len(eval_users)) & (
        eval_users[np.minimum(k_rows, len(eval_users) - 1)] == known["user_id"].to_numpy(np.int64)
    )
    seen = (k_rows[in_eval & (k_items >= 0)], k_items[in_eval & (k_items >= 0)])

    model.eval()
    with torch.no_grad():
        item_emb = model.item_embeddings()  # (N, d)

    def model_scores(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u = model.user_embed(
                torch.from_numpy(feats.user_index[rows]),
                torch.from_numpy(feats.user_cats[rows]),
                torch.from_numpy(feats.history[rows]),
            )
            return (u @ item_emb.T).numpy().astype(np.float64)

    popularity = np.bincount(k_items[k_items >= 0], minlength=n_items).astype(np.float64)
    # Tiny index-based tie-break so TopPop is deterministic on equal counts.
    popularity = popularity - np.arange(n_items) * 1e-9

    def pop_scores(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(popularity, (len(rows), n_items)).copy()

    rows = np.arange(len(eval_users))
    out = {}
    for name, fn in (("model", model_scores), ("toppop", pop_scores)):
        ranked = _rank(fn, rows, seen, len(eval_users), n_items, k, chunk)
        hits = hit_matrix(
            ranked=ranked, relevant_users=rel_u, relevant_items=rel_i, n_items=n_items
        )
        per_user = per_user_metrics(hits=hits, n_relevant=n_relevant)
        summary = {m: float(v.mean()) for m, v in per_user.items()}
        summary["coverage@10"] = coverage_at_k(ranked=ranked, n_items=n_items, k=10)
        summary["users"] = float(len(eval_users))
        out[name] = EvalResult(eval_users, per_user, ranked, summary)
    return out


def format_table(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """Model beside TopPop for each split, with the lift."""
    lines = []
    for split, res in metrics.items():
        lines.append(f"{split:<6} {'metric':<12} {'model':>9} {'toppop':>9} {'lift':>7}")
        for m, v in res["model"].items():
            if m == "users":
                continue
            p = res["toppop"][m]
            lift = f"{v / p:6.2f}x" if p > 0 else "    inf"
            lines.append(f"{'':<6} {m:<12} {v:9.4f} {p:9.4f} {lift:>7}")
    return "\n".join(lines)
