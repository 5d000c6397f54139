"""Why CTR falls in the closed loop with live features: an in-process study.

The Triton study (`studies.freshness`) left two candidate causes of the live arm's fall
unseparated: the seen filter pushing the model down its own ranking, and live history
moving the user vector. Serving has no switch that updates one without the other; this
loop does, because it scores with the run's model in-process and clicks with the world's
true click model (`World.relevance` × `World.examination`, already-clicked items at
`rewatch_factor`). Same users, same click draws per arm:

- `frozen`: the training snapshot's history and seen set, never updated;
- `seen_only`: clicked items are filtered out, the history stays as trained;
- `live`: clicked items are filtered out and pushed onto the history the user tower reads;
- `shown_cap`: `live`, and an item shown to the user `shown_cap` times without a click is
  not shown again (impression discounting): does the slate fill with the model's misses?
- `oracle`: the world's relevance ranks (the best any model could do with the same filter).

Each arm runs with the run's popularity prior and without it (`prior` in the table), and
`depth` gives the mean true relevance of the items at model ranks 1-10, 11-20, 21-50 and
51-100 for several prior weights, so a reader sees how steeply the model's ranking decays.

    northstar simulate depth --dir reports/freshness [--set users=500 rounds=12]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import atomic_write_text
from models.snapshot import FeatureSnapshot
from studies.config import DepthConfig
from studies.freshness import prepare
from training.run import load_run
from training.schema import Dataset
from training.synth import World

DEPTH_BANDS = ((0, 10), (10, 20), (20, 50), (50, 100))
ARMS = ("frozen", "seen_only", "live", "shown_cap", "oracle")


@dataclass
class Loop:
    """What the loop needs: the model's inputs for the drawn users, their true relevance
    against the model's catalogue, and the items they already have (filtered in every arm)."""

    model: Any
    user_index: torch.Tensor
    user_cats: torch.Tensor
    history: np.ndarray  # (U, H) item index + 1, newest first
    item_emb: torch.Tensor
    bias: torch.Tensor | None  # the run's prior, if any
    log_pop: np.ndarray  # (N,) log(1 + training count), for the beta sweep
    relevance: np.ndarray  # (U, N) P(click | examined) at the world's end
    owned: np.ndarray  # (U, N) bool: in the user's training history
    examination: np.ndarray  # (k,)
    extra: dict[str, Any] = field(default_factory=dict)

    def scores(self, history: np.ndarray, prior: bool) -> np.ndarray:
        with torch.no_grad():
            u = self.model.user_embed(self.user_index, self.user_cats, torch.from_numpy(history))
            s = u @ self.item_emb.T
            if prior and self.bias is not None:
                s = s + self.bias
        return s.numpy()


def build(cfg: DepthConfig) -> Loop:
    data, run_dir = prepare(cfg.dir, preset=cfg.preset, seed=cfg.seed, world=cfg.world, run=cfg.run)
    world, ds, run = World.load(data), Dataset.load(data), load_run(run_dir)
    model, vocab = run.model.eval(), run.vocab
    if model.cfg.time_gaps:
        # The loop has rounds, not a clock: clicks pushed onto the history have no time.
        raise ValueError(
            f"run={run_dir}: tower.time_gaps=True; the depth study has no clock to time its "
            "clicks, so it takes runs without time gaps"
        )
    inter = ds.interactions.sort_values("timestamp", kind="stable")
    rng = np.random.default_rng(cfg.seed)
    activity = np.bincount(
        world.user_index(inter["user_id"].to_numpy()), minlength=world.n_users
    ).astype(float)
    n = min(cfg.users, int((activity > 0).sum()))
    users = rng.choice(world.n_users, n, replace=False, p=activity / activity.sum())
    feats = FeatureSnapshot.build(vocab, ds.users, inter).lookup(world.user_id_of(users))
    item_raw = np.asarray(vocab.item_ids, dtype=np.int64)
    world_items = world.item_index(item_raw)
    owned = np.zeros((n, len(item_raw)), dtype=bool)
    for u, seen in enumerate(feats.seen):
        idx = vocab.item_index(np.asarray(seen, dtype=np.int64))
        owned[u, idx[idx >= 0]] = True
    counts = np.bincount(
        vocab.item_index(inter["item_id"].to_numpy()).clip(min=0), minlength=len(item_raw)
    )
    with torch.no_grad():
        item_emb = model.item_embeddings()
    prior = getattr(model, "prior", None)
    return Loop(
        model=model,
        user_index=torch.from_numpy(feats.user_index),
        user_cats=torch.from_numpy(feats.user_cats),
        history=feats.history.copy(),
        item_emb=item_emb,
        bias=getattr(model, "item_bias", None) if prior is not None else None,
        log_pop=np.log1p(counts.astype(np.float64)),
        relevance=world.relevance(users[:, None], world_items[None, :], world.cfg.end_ts),
        owned=owned,
        examination=world.examination(np.arange(cfg.k)),
        extra={"prior": prior.to_dict() if prior is not None else None, "users": n},
    )


def run_arm(loop: Loop, arm: str, *, prior: bool, cfg: DepthConfig) -> list[dict[str, float]]:
    """Per round: CTR of the slates, the mean true relevance of the items shown, and the
    share of them this user was shown in an earlier round (`repeats`)."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}: expected one of {ARMS}")
    rng = np.random.default_rng(cfg.seed + 1)  # the same click draws in every arm
    history = loop.history.copy()
    clicked = np.zeros_like(loop.owned)
    shown = np.zeros(loop.owned.shape, dtype=np.int32)  # showings, per user and item
    missed = np.zeros(loop.owned.shape, dtype=np.int32)  # ... of them without a click
    frozen_scores = loop.scores(history, prior)
    rounds = []
    for _ in range(cfg.rounds):
        if arm == "oracle":
            s = loop.relevance.copy()
        elif arm in ("live", "shown_cap"):
            s = loop.scores(history, prior)
        else:
            s = frozen_scores.copy()
        s[loop.owned] = -np.inf
        if arm != "frozen":
            s[clicked] = -np.inf
        if arm == "shown_cap":
            s[missed >= cfg.shown_cap] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, : cfg.k]
        rel = np.take_along_axis(loop.relevance, top, 1)
        again = np.take_along_axis(clicked, top, 1)
        p = rel * loop.examination[None, :] * np.where(again, cfg.rewatch_factor, 1.0)
        hit = rng.random(p.shape) < p
        before = np.take_along_axis(shown, top, 1) > 0
        rounds.append(
            {
                "ctr": float(hit.mean()),
                "relevance": float(rel.mean()),
                "repeats": float(before.mean()),
            }
        )
        rows = np.repeat(np.arange(len(top)), cfg.k)
        np.add.at(shown, (rows, top.ravel()), 1)
        np.add.at(missed, (rows, top.ravel()), (~hit).ravel().astype(np.int32))
        users, slots = np.nonzero(hit)
        clicked[users, top[users, slots]] = True
        if arm in ("live", "shown_cap", "oracle"):
            # newest first, as training builds it: each click goes to the front
            for u, s_ in zip(users, slots, strict=True):
                history[u] = np.r_[top[u, s_] + 1, history[u, :-1]]
    return rounds


def relevance_by_depth(loop: Loop, betas: tuple[float, ...]) -> list[dict[str, Any]]:
    """Mean true relevance at model ranks (training history filtered), per prior weight,
    with the oracle's for scale."""
    base = loop.scores(loop.history, prior=False)
    rows = []
    for beta in betas:
        s = np.where(loop.owned, -np.inf, base + beta * loop.log_pop)
        rows.append({"ranking": f"model, beta {beta:g}", **_bands(loop, s)})
    rows.append(
        {"ranking": "oracle", **_bands(loop, np.where(loop.owned, -np.inf, loop.relevance))}
    )
    return rows


def _bands(loop: Loop, scores: np.ndarray) -> dict[str, float]:
    top = np.argsort(-scores, axis=1, kind="stable")[:, : DEPTH_BANDS[-1][1]]
    rel = np.take_along_axis(loop.relevance, top, 1)
    return {f"rel@{a + 1}-{b}": float(rel[:, a:b].mean()) for a, b in DEPTH_BANDS}


def run_depth(cfg: DepthConfig, progress=None) -> dict[str, Any]:
    loop = build(cfg)
    arms: dict[str, list[dict[str, float]]] = {}
    plan = [(a, p) for a in ARMS for p in ((True, False) if a != "oracle" else (False,))]
    for arm, prior in plan:
        name = arm if arm == "oracle" else f"{arm}{'' if prior else ', no prior'}"
        arms[name] = run_arm(loop, arm, prior=prior, cfg=cfg)
        if progress:
            progress(name)
    result = {
        "config": asdict(cfg),
        "users": loop.extra["users"],
        "prior": loop.extra["prior"],
        "arms": arms,
        "depth": relevance_by_depth(loop, cfg.betas),
    }
    out = Path(cfg.out) if cfg.out else Path(cfg.dir) / "depth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    result["path"] = str(out)
    return result


def tables(result: dict[str, Any]) -> str:
    """Markdown: CTR (and mean relevance shown) per round for each arm; relevance by depth."""
    arms = result["arms"]
    names = list(arms)
    rounds = len(next(iter(arms.values())))
    lines = [
        "| round | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for r in range(rounds):
        cells = [f"{arms[n][r]['ctr']:.4f} ({arms[n][r]['relevance']:.3f})" for n in names]
        lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
    bands = [k for k in result["depth"][0] if k != "ranking"]
    lines += ["", "| ranking | " + " | ".join(bands) + " |", "| --- |" + " --- |" * len(bands)]
    for row in result["depth"]:
        lines.append(f"| {row['ranking']} | " + " | ".join(f"{row[b]:.3f}" for b in bands) + " |")
    return "\n".join(lines)
