"""What any ranking could serve to a closed-loop run's traffic: the run replayed in-process.

The retrain cycles (`studies.freshness_cycles`) ask that the served north star not fall
from cycle to cycle. In a world whose tastes and catalogue stay fixed, every click uses up
one of the user's good items, so some fall is owed to the traffic itself, whatever ranks.
This study measures how much. It rebuilds the exact request stream of a run from its seeds
(`simulator.driver.draw_users`: the same users, in the same batches, as the Triton traffic
drew) and serves it in-process with fixed policies, each with its own seen set and clicks:

- `oracle`: the world's true relevance, over every unseen item of the model's catalogue:
  the best slate any recommender could show, request after request;
- `model`: the run's model with live features, as production serves with no retrains
  (clicked items filtered and pushed onto the history the user tower reads; the graph's
  `k + overfetch` cut before the filter, so heavy users get short slates as in serving).

A batch is ranked from the state before it and its clicks are drawn all at once, as a
`simulate` call does. Clicks follow the world's click model (examination × relevance).
Spans cut the stream where the run's cycles did (`--from-cycles cycles.json`) or at given
request counts, and each span reports CTR (Wilson 95%), items and clicks per request.

    northstar simulate replay --set world=DIR run=RUN from_cycles=DIR/cycles.json
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from common.figures import save_png
from common.files import atomic_write_text
from feedback.metrics import wilson_interval
from models.snapshot import FeatureSnapshot
from simulator.driver import draw_users
from studies.config import ReplayConfig
from training.run import load_run
from training.schema import Dataset
from training.synth import World


def spans_of(cfg: ReplayConfig) -> list[tuple[str, int]]:
    """(label, requests) per span, in stream order."""
    if cfg.spans:
        return [(f"span {i + 1}", n) for i, n in enumerate(cfg.spans)]
    out = [(label, int(span["served_requests"])) for label, span in _cycle_spans(cfg.from_cycles)]
    if not out or any(n < 1 for _, n in out):
        raise ValueError(f"{cfg.from_cycles}: no spans with served_requests")
    return out


def _cycle_spans(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, span) of a cycles.json's first arm: its burn-in, if any, then each cycle."""
    arm = next(iter(json.loads(Path(path).read_text())["arms"].values()))
    out = [("burn-in", arm["burn_in"])] if arm.get("burn_in") else []
    return out + [(f"cycle {c['cycle']}", c) for c in arm["cycles"]]


def request_batches(world, cfg: ReplayConfig, total: int) -> list[np.ndarray]:
    """The first `total` requests of the traffic, batch by batch, as dense user indices:
    batch b is what a `simulate` call with seed `cfg.seed + b` sent."""

    batches, n, b = [], 0, 0
    while n < total:
        users = draw_users(world, cfg.users, cfg.batch, np.random.default_rng([cfg.seed + b, 7]))
        batches.append(users[: total - n])
        n += len(batches[-1])
        b += 1
    return batches


class Catalogue:
    """The model's catalogue and inputs, the world's relevance over it, and what each user
    already has (their training history: the live store's seen set at the start)."""

    def __init__(self, cfg: ReplayConfig) -> None:
        self.world, ds, run = World.load(cfg.world), Dataset.load(cfg.world), load_run(cfg.run)
        self.model = run.model.eval()
        if self.model.cfg.time_gaps:
            raise ValueError(
                f"run={cfg.run}: tower.time_gaps=True; the replay has no clock to time the "
                "clicks it pushes onto the history, so it takes runs without time gaps"
            )
        vocab = run.vocab
        inter = ds.interactions.sort_values("timestamp", kind="stable")
        users = self.world.user_id_of(np.arange(self.world.n_users))
        self.feats = FeatureSnapshot.build(vocab, ds.users, inter).lookup(users)
        item_raw = np.asarray(vocab.item_ids, dtype=np.int64)
        self.world_items = self.world.item_index(item_raw)
        self.vocab = vocab
        with torch.no_grad():
            self.item_emb = self.model.item_embeddings()
        has_prior = getattr(self.model, "prior", None) is not None
        self.bias = self.model.item_bias if cfg.prior and has_prior else None
        self.examination = self.world.examination(np.arange(cfg.k))

    def owned(self, user: int) -> np.ndarray:
        """Catalogue indices in the user's training history."""
        idx = self.vocab.item_index(np.asarray(self.feats.seen[user], dtype=np.int64))
        return idx[idx >= 0]

    def relevance(self, users: np.ndarray) -> np.ndarray:
        return self.world.relevance(
            users[:, None], self.world_items[None, :], self.world.cfg.end_ts
        )


class State:
    """One policy's view of the users it served: seen items and (for the model) history."""

    def __init__(self, cat: Catalogue) -> None:
        self.cat = cat
        self.seen: dict[int, np.ndarray] = {}  # dense user -> bool over the catalogue
        self.history: dict[int, np.ndarray] = {}  # dense user -> (H,) item index + 1

    def seen_rows(self, users: np.ndarray) -> np.ndarray:
        n = len(self.cat.world_items)
        for u in map(int, np.unique(users)):
            if u not in self.seen:
                row = np.zeros(n, dtype=bool)
                row[self.cat.owned(u)] = True
                self.seen[u] = row
                self.history[u] = self.cat.feats.history[u].copy()
        return np.stack([self.seen[int(u)] for u in users])

    def click(self, users: np.ndarray, slates: np.ndarray, hit: np.ndarray) -> None:
        # newest first, as training builds the history: later clicks go in front
        for r, s in zip(*np.nonzero(hit), strict=True):
            u, item = int(users[r]), int(slates[r, s])
            self.seen[u][item] = True
            self.history[u] = np.r_[item + 1, self.history[u][:-1]]


def rank(policy: str, cat: Catalogue, state: State, users: np.ndarray, cfg: ReplayConfig):
    """(slates (n, k) catalogue indices, -1 where short; relevance (n, k), 0 where short)."""
    seen = state.seen_rows(users)
    rel = cat.relevance(users)
    if policy == "oracle":
        scores = np.where(seen, -np.inf, rel)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : cfg.k]
        ok = np.isfinite(np.take_along_axis(scores, top, 1))
    else:
        with torch.no_grad():
            f = cat.feats
            emb = cat.model.user_embed(
                torch.from_numpy(f.user_index[users]),
                torch.from_numpy(f.user_cats[users]),
                torch.from_numpy(np.stack([state.history[int(u)] for u in users])),
            )
            s = emb @ cat.item_emb.T
            if cat.bias is not None:
                s = s + cat.bias
        cand = np.argsort(-s.numpy(), axis=1, kind="stable")[:, : cfg.k + cfg.overfetch]
        unseen = ~np.take_along_axis(seen, cand, 1)
        # the first k unseen candidates per row, in rank order (a short row keeps fewer)
        order = np.argsort(~unseen, axis=1, kind="stable")[:, : cfg.k]
        top = np.take_along_axis(cand, order, 1)
        ok = np.take_along_axis(unseen, order, 1)
    top = np.where(ok, top, -1)
    shown_rel = np.where(ok, np.take_along_axis(rel, np.maximum(top, 0), 1), 0.0)
    return top, shown_rel


def run_policy(
    policy: str,
    cat: Catalogue,
    cfg: ReplayConfig,
    spans: list[tuple[str, int]],
    batches: list[np.ndarray],
    progress=None,
) -> list[dict]:
    state = State(cat)
    clicks_rng = np.random.default_rng([cfg.click_seed, 11])
    rows: list[dict[str, Any]] = []
    acc = _Span()
    bounds = np.cumsum([n for _, n in spans])
    span_i, done = 0, 0
    for users in batches:
        slates, rel = rank(policy, cat, state, users, cfg)
        hit = clicks_rng.random(rel.shape) < rel * cat.examination[None, : rel.shape[1]]
        state.click(users, slates, hit)
        # a batch that straddles a span end is split where the run cut it
        start = 0
        while start < len(users):
            stop = min(len(users), int(bounds[span_i]) - done)
            acc.add(slates[start:stop], hit[start:stop])
            done += stop - start
            start = stop
            if done == bounds[span_i]:
                rows.append({"span": spans[span_i][0], **acc.row()})
                acc = _Span()
                span_i += 1
                if progress:
                    progress(f"{policy}: {rows[-1]['span']} done, CTR {rows[-1]['ctr']:.4f}")
    return rows


class _Span:
    def __init__(self) -> None:
        self.requests = self.impressions = self.clicks = self.empty = 0

    def add(self, slates: np.ndarray, hit: np.ndarray) -> None:
        shown = slates >= 0
        self.requests += len(slates)
        self.impressions += int(shown.sum())
        self.clicks += int(hit.sum())
        self.empty += int((~shown.any(axis=1)).sum())

    def row(self) -> dict[str, Any]:
        lo, hi = (float(v) for v in wilson_interval(successes=self.clicks, trials=self.impressions))
        n = max(self.requests, 1)
        return {
            "requests": self.requests,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": self.clicks / max(self.impressions, 1),
            "ctr_low": lo,
            "ctr_high": hi,
            "items_per_request": self.impressions / n,
            "clicks_per_request": self.clicks / n,
            "empty_share": self.empty / n,
        }


def run_replay(cfg: ReplayConfig, progress=None) -> dict[str, Any]:
    cat = Catalogue(cfg)
    spans = spans_of(cfg)
    # one request stream, served by every policy
    batches = request_batches(cat.world, cfg, sum(n for _, n in spans))
    result = {
        "config": asdict(cfg),
        "spans": [{"span": s, "requests": n} for s, n in spans],
        "policies": {p: run_policy(p, cat, cfg, spans, batches, progress) for p in cfg.policies},
    }
    if cfg.from_cycles:
        result["served"] = served_from_cycles(cfg.from_cycles)
    if cfg.figure:
        result["figure"] = str(plot(result, cfg.figure))
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    result["path"] = str(out)
    return result


def _default_out(cfg: ReplayConfig) -> Path:
    if cfg.from_cycles:
        return Path(cfg.from_cycles).with_name("replay.json")
    return Path("reports/replay/replay.json")


def served_from_cycles(path: str) -> list[dict[str, Any]]:
    """What the run itself served per span, for the table beside the replay."""
    return [
        {
            "ctr": s["served"]["ctr"],
            "items_per_request": s["served"]["impressions"] / max(s["served_requests"], 1),
            "clicks_per_request": s["served"]["clicks"] / max(s["served_requests"], 1),
        }
        for _, s in _cycle_spans(path)
    ]


def table(result: dict[str, Any]) -> str:
    """Markdown: CTR [95% Wilson] per span and policy, with clicks per request."""
    pols = result["policies"]
    served = result.get("served")
    head = ["span", "requests"] + (["served by the run"] if served else [])
    head += [f"{p}: CTR [95%], clicks/request" for p in pols]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, span in enumerate(result["spans"]):
        cells = [span["span"], f"{span['requests']:,}"]
        if served:
            cells.append(f"{served[i]['ctr']:.4f}")
        for p in pols:
            r = pols[p][i]
            cells.append(
                f"{r['ctr']:.4f} [{r['ctr_low']:.4f}, {r['ctr_high']:.4f}], "
                f"{r['clicks_per_request']:.2f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    for p in pols:
        first, last = pols[p][0]["ctr"], pols[p][-1]["ctr"]
        lines.append(
            f"\n{p}: CTR {first:.4f} -> {last:.4f} ({last / first - 1:+.1%}) first to last span"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """CTR (95% Wilson) and clicks per request per span: each policy, and what the run
    itself served when the spans came from its cycles.json."""
    labels = [s["span"] for s in result["spans"]]
    x = np.arange(len(labels))
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    styles = {"oracle": ("#9bbb59", "o-"), "model": ("#8064a2", "o--")}
    for name, rows in result["policies"].items():
        col, fmt = styles[name]
        y = np.array([r["ctr"] for r in rows])
        err = [y - [r["ctr_low"] for r in rows], [r["ctr_high"] for r in rows] - y]
        label = {"oracle": "oracle, replayed", "model": "model, no retrains, replayed"}[name]
        axes[0].errorbar(x, y, yerr=err, fmt=fmt, capsize=3, color=col, label=label)
        axes[1].plot(x, [r["clicks_per_request"] for r in rows], fmt, color=col, label=label)
    for key, ax in (("ctr", axes[0]), ("clicks_per_request", axes[1])):
        if result.get("served"):
            y = [s[key] for s in result["served"]]
            ax.plot(x, y, "s-", color="#4f81bd", label="served by the run (Triton)")
    axes[0].set_title("CTR per span of the same request stream (95% Wilson)", fontsize=10)
    axes[1].set_title("clicks per request", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=8)
    return save_png(fig, path)
