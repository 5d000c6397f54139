"""Offline evaluation: full-catalogue ranking, each user's known items excluded.

No sampled negatives: every catalogue item competes, which is what serving
does. The baselines (`training.baselines`: TopPop, RecentPop, EASE) are ranked through the
same code path (same users, same exclusions, same metrics), so the comparison is apples to
apples. Each summary also has the popularity bias of the top 10: ARP and exposure Gini.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from models.features import FeatureVocab
from models.prior import PopularityPrior
from models.snapshot import FeatureSnapshot
from models.towers import TwoTower
from training.baselines import Baseline, BaselineSkipped, History, TopPop
from training.metrics import (
    arp_at_k,
    coverage_at_k,
    exposure_gini_at_k,
    hit_matrix,
    per_user_metrics,
)

log = logging.getLogger(__name__)

MAX_K = 100


@dataclass(frozen=True)
class EvalResult:
    user_ids: np.ndarray  # (U,) raw ids of evaluated users
    per_user: dict[str, np.ndarray]  # metric -> (U,)
    ranked: np.ndarray  # (U, min(MAX_K, n_items)) dense item indices; -1 = empty slot
    summary: dict[str, float]


class EvalResults(dict):
    """{name: EvalResult}, "model" and each baseline that ran; `skipped` = {name: reason} for
    the baselines that could not run (e.g. EASE above its catalogue limit)."""

    def __init__(self, *args, skipped: dict[str, str] | None = None, **kw):
        super().__init__(*args, **kw)
        self.skipped: dict[str, str] = dict(skipped or {})


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


MODEL_PRIOR = "model"  # evaluate(prior=...): use the model's own prior (`TwoTower.prior`)


def evaluate(
    *,
    model: TwoTower | None,
    vocab: FeatureVocab,
    users: pd.DataFrame,
    known: pd.DataFrame,
    target: pd.DataFrame,
    chunk: int = 2048,
    baselines: Sequence[Baseline] | None = None,
    prior: PopularityPrior | str | None = MODEL_PRIOR,
) -> EvalResults:
    """Rank for every user with at least one `target` interaction.

    `known` (time-ordered) supplies history and the items to exclude; `target`
    is what the user did next. Returns {"model": ..., "toppop": ...}: the model (unless
    `model` is None) and each of `baselines` (default: TopPop alone) by its name, all ranked
    by the same code. A baseline that cannot run is left out; its reason is in the result's
    `skipped` and logged.

    `prior`: the ranking-time popularity prior added to the model's scores, its bias
    recomputed from `known` (so evaluation never uses later data): the model's own
    (`model.prior`, the default), an explicit PopularityPrior, or None for none.
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

    k_items = vocab.item_index(known["item_id"].to_numpy())
    k_users = known["user_id"].to_numpy(np.int64)
    k_rows = np.searchsorted(eval_users, k_users)
    in_eval = (k_rows < len(eval_users)) & (
        eval_users[np.minimum(k_rows, len(eval_users) - 1)] == k_users
    )
    seen = (k_rows[in_eval & (k_items >= 0)], k_items[in_eval & (k_items >= 0)])
    ok = k_items >= 0
    history = History(
        n_items=n_items,
        n_eval_users=len(eval_users),
        items=k_items[ok],
        users=k_users[ok],
        eval_rows=np.where(in_eval, k_rows, -1)[ok],
        timestamps=_timestamps(known)[ok],
    )
    popularity = history.popularity()

    scorers: list[tuple[str, object]] = []
    if model is not None:
        scorers.append(("model", _model_scorer(model, vocab, users, known, eval_users, prior)))
    skipped: dict[str, str] = {}
    for b in (TopPop(),) if baselines is None else baselines:
        try:
            b.fit(history)
        except BaselineSkipped as exc:
            log.warning("baseline %s skipped: %s", b.name, exc)
            skipped[b.name] = str(exc)
            continue
        scorers.append((b.name, b.score))

    rows = np.arange(len(eval_users))
    out = EvalResults(skipped=skipped)
    for name, fn in scorers:
        ranked = _rank(fn, rows, seen, len(eval_users), n_items, k, chunk)
        hits = hit_matrix(
            ranked=ranked, relevant_users=rel_u, relevant_items=rel_i, n_items=n_items
        )
        per_user = per_user_metrics(hits=hits, n_relevant=n_relevant)
        summary = {m: float(v.mean()) for m, v in per_user.items()}
        summary["coverage@10"] = coverage_at_k(ranked=ranked, n_items=n_items, k=10)
        summary["arp@10"] = arp_at_k(ranked=ranked, popularity=popularity, k=10)
        summary["exposure_gini@10"] = exposure_gini_at_k(ranked=ranked, n_items=n_items, k=10)
        summary["users"] = float(len(eval_users))
        out[name] = EvalResult(eval_users, per_user, ranked, summary)
    return out


def _timestamps(known: pd.DataFrame) -> np.ndarray:
    """Seconds; a frame without timestamps is in time order, so its row order stands in."""
    if "timestamp" in known.columns:
        return known["timestamp"].to_numpy(np.int64)
    return np.arange(len(known), dtype=np.int64)


def _model_scorer(model, vocab, users, known, eval_users, prior):
    """score(rows) -> (b, N) float64 for the model, with its popularity prior if any."""
    snap = FeatureSnapshot.build(vocab, users, known)
    feats = snap.lookup(eval_users)
    if isinstance(prior, str):
        if prior != MODEL_PRIOR:
            raise ValueError(f"prior={prior!r}: expected a PopularityPrior, None or 'model'")
        prior = getattr(model, "prior", None)
    bias = None
    if prior is not None and prior.beta > 0:
        items = vocab.item_index(known["item_id"].to_numpy())
        bias = prior.bias(items, _timestamps(known), len(vocab.item_ids))
        bias = torch.from_numpy(bias)
    model.eval()
    with torch.no_grad():
        item_emb = model.item_embeddings()  # (N, d)

    def model_scores(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u = model.user_embed(
                torch.from_numpy(feats.user_index[rows]),
                torch.from_numpy(feats.user_cats[rows]),
                torch.from_numpy(feats.history[rows]),
                torch.from_numpy(feats.history_ts[rows]),
            )
            s = u @ item_emb.T
            if bias is not None:
                s = s + bias  # float32, as the exported graph adds it
            return s.numpy().astype(np.float64)

    return model_scores


def format_table(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """The model beside every baseline for each split: each cell is the baseline's value and
    the model's lift over it (model / baseline)."""
    lines = []
    for split, res in metrics.items():
        others = [n for n in res if n != "model"]
        head = f"{split:<6} {'metric':<17} {'model':>9}" + "".join(f" {n[:17]:>17}" for n in others)
        lines.append(head)
        for m, v in res["model"].items():
            if m == "users":
                continue
            cells = []
            for n in others:
                p = res[n].get(m, float("nan"))
                lift = f"{v / p:5.2f}x" if p > 0 else "  inf" if v > 0 else "    -"
                cells.append(f" {p:9.4f} {lift:>7}")
            lines.append(f"{'':<6} {m:<17} {v:9.4f}" + "".join(cells))
    return "\n".join(lines)
