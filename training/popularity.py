"""Choose the popularity prior's beta on validation, and draw the trade-off it makes.

For each beta of a grid the model ranks the validation period with
beta * log(1 + recent count) added to its scores (`models.prior`), through the same
`evaluate` as everything else. The curve (NDCG@10, ARP@10, exposure Gini@10 per beta) goes
into metrics.json and `prior_curve.png`, so a reader can pick another point; the chosen beta
is the best validation NDCG@10 among those whose exposure Gini stays within `max_gini`
(the same threshold as the fairness audit's `max_exposure_gini` gate, which still applies to
the run, prior included). Test data is never looked at here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from models.prior import PopularityPrior
from models.towers import TwoTower
from training.evaluate import evaluate

log = logging.getLogger(__name__)

PLOT_FILE = "prior_curve.png"
CURVE_METRICS = ("ndcg@10", "recall@10", "arp@10", "exposure_gini@10", "coverage@10")


def beta_curve(
    model: TwoTower,
    *,
    vocab,
    users: pd.DataFrame,
    known: pd.DataFrame,
    target: pd.DataFrame,
    betas: tuple[float, ...],
    window: str,
) -> list[dict[str, float]]:
    """[{beta, ndcg@10, recall@10, arp@10, exposure_gini@10, coverage@10}] in grid order."""
    curve = []
    for beta in sorted({0.0, *(float(b) for b in betas)}):
        prior = PopularityPrior(beta, window) if beta > 0 else None
        res = evaluate(
            model=model,
            vocab=vocab,
            users=users,
            known=known,
            target=target,
            baselines=(),
            prior=prior,
        )["model"].summary
        curve.append({"beta": beta, **{m: res[m] for m in CURVE_METRICS}})
        log.info(
            "prior beta %g: val ndcg@10 %.4f arp@10 %.1f gini@10 %.3f",
            beta,
            res["ndcg@10"],
            res["arp@10"],
            res["exposure_gini@10"],
        )
    return curve


def choose_beta(curve: list[dict[str, float]], max_gini: float | None) -> tuple[float, str]:
    """(beta, why): best NDCG@10 among points within the Gini gate; ties go to the smaller
    beta. With no point within the gate, 0 (no prior) and the reason."""
    ok = [c for c in curve if max_gini is None or c["exposure_gini@10"] <= max_gini]
    if not ok:
        return 0.0, f"no beta keeps exposure_gini@10 <= {max_gini}; prior off"
    best = max(ok, key=lambda c: (round(c["ndcg@10"], 9), -c["beta"]))
    gate = "" if max_gini is None else f" among betas with exposure_gini@10 <= {max_gini}"
    return best["beta"], f"best validation ndcg@10{gate}"


def plot_curve(
    curve: list[dict[str, float]], chosen: float, path: Path, max_gini: float | None = None
) -> Path | None:
    """NDCG@10 against ARP@10 and against exposure Gini@10, one point per beta."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    y = [c["ndcg@10"] for c in curve]
    for ax, key, label in (
        (axes[0], "arp@10", "ARP@10 (mean history count of recommended items)"),
        (axes[1], "exposure_gini@10", "exposure Gini@10 over the catalogue"),
    ):
        x = [c[key] for c in curve]
        ax.plot(x, y, "o-", color="tab:blue")
        for c, xi, yi in zip(curve, x, y, strict=True):
            ax.annotate(f"β={c['beta']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4))
            if c["beta"] == chosen:
                ax.plot([xi], [yi], "o", ms=12, mfc="none", mec="tab:red", label="chosen")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if key == "exposure_gini@10" and max_gini is not None:
            ax.axvline(max_gini, color="tab:red", ls="--", lw=1, label="Gini gate")
        ax.legend(loc="lower right")
    axes[0].set_ylabel("validation NDCG@10")
    fig.suptitle("Popularity prior β·log(1 + recent count): accuracy against popularity bias")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
