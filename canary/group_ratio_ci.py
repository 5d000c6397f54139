"""How sure the online fairness guardrail is that a canary widened the gap between groups.

The guardrail compares, per attribute, the min/max CTR ratio across groups of the canary
with production's. Each ratio is a ratio of group CTRs over a few hundred users, and a
user's impressions are not independent (one user's taste decides many clicks), so the
point estimates move a lot from look to look: a canary that is better for every group can
read 0.76 against production's 0.99 on 150 users a group. Rolling back on that is
rejecting good models on noise.

The interval here is a user-clustered bootstrap: each arm's users are resampled (users
are what the routing hash assigns, so they are the independent unit),
their clicks and impressions summed per group, and the ratio recomputed over the groups
the point estimate used. The arms are independent samples, so they are resampled
independently. The bound is always-valid (`ratio_diff_upper`): the guardrail reads it at
every look. The guardrail then rolls back only when the drop is both material (the
point estimate beyond the margin) and significant (the upper bound of canary ratio minus
production ratio below zero): the canary is judged relative to production's own ratio,
never against an absolute floor.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from canary.inference import confidence_sequence_halfwidth


def per_user_groups(labels: pd.DataFrame, groups: pd.Series) -> pd.DataFrame:
    """(model_version, user_id, group, clicks, impressions), one row per user and version.

    `labels`: impression rows with user_id, model_version, clicked; `groups`: each row's
    group for the attribute, aligned with `labels`."""
    df = pd.DataFrame(
        {
            "model_version": labels["model_version"].to_numpy(),
            "user_id": labels["user_id"].to_numpy(np.int64),
            "group": groups.to_numpy(),
            "clicks": labels["clicked"].to_numpy(np.float64),
        }
    )
    return (
        df.groupby(["model_version", "user_id", "group"], sort=True)
        .agg(clicks=("clicks", "sum"), impressions=("clicks", "size"))
        .reset_index()
    )


def _ratio(clicks: np.ndarray, impressions: np.ndarray) -> np.ndarray:
    """min/max CTR across the columns (groups); rows are resamples. NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = clicks / impressions
        return ctr.min(axis=-1) / ctr.max(axis=-1)


def _resampled_ratio(
    arm: pd.DataFrame, groups: list[str], n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    col = pd.Categorical(arm["group"], categories=groups).codes
    keep = col >= 0
    n = len(arm)
    onehot = np.zeros((n, len(groups)))
    onehot[np.flatnonzero(keep), col[keep]] = 1.0
    clicks = onehot * arm["clicks"].to_numpy()[:, None]  # (n, G)
    imps = onehot * arm["impressions"].to_numpy(np.float64)[:, None]
    # Poisson(1) weights per user: the bootstrap that resamples each arm's users without
    # fixing their number (Hanley & MacGibbon 2006), which a ratio of sums does not need,
    # and far cheaper to draw than a multinomial over thousands of users at every look.
    weights = rng.poisson(1.0, size=(n_boot, n)).astype(np.float64)  # (B, n)
    return _ratio(weights @ clicks, weights @ imps)


def ratio_diff_upper(
    production: pd.DataFrame,
    canary: pd.DataFrame,
    *,
    groups_production: list[str],
    groups_canary: list[str],
    alpha: float,
    tau: float,
    n_boot: int = 200,
    seed: int = 0,
) -> float | None:
    """Always-valid one-sided (1 - alpha) upper bound of canary ratio - production ratio.

    The centre is the bootstrap bias-corrected difference, 2·d - mean(d*): a min/max of
    noisy group CTRs reads low, and the more so the fewer users an arm has, so the raw
    difference of a small canary against a large production leans negative even when
    the two are the same model. The spread is the bootstrap variance V of the difference,
    and the bound is the centre plus the normal-mixture confidence sequence's half-width
    at V (`canary.inference.confidence_sequence_halfwidth`, mixture scale `tau`): the
    guardrail is read at every look, and a one-look percentile bound read at every look
    rejects far more often than alpha. The bound uses the variance, not a tail quantile,
    so a few hundred resamples are enough.

    `production`, `canary`: per_user_groups rows of each arm; `groups_*`: the groups each
    arm's point estimate used (those with enough impressions). None when an arm has fewer
    than two such groups or too few resamples give a defined ratio."""
    if len(groups_production) < 2 or len(groups_canary) < 2:
        return None
    rng = np.random.default_rng(seed)
    point = _point(canary, groups_canary) - _point(production, groups_production)
    rp = _resampled_ratio(production, groups_production, n_boot, rng)
    rc = _resampled_ratio(canary, groups_canary, n_boot, rng)
    diff = rc - rp
    diff = diff[np.isfinite(diff)]
    if len(diff) < n_boot // 2 or not np.isfinite(point):
        return None
    centre = 2 * point - float(diff.mean())
    var = float(diff.var(ddof=1))
    return centre + confidence_sequence_halfwidth(var=var, tau2=tau * tau, alpha=alpha)


def _point(arm: pd.DataFrame, groups: list[str]) -> float:
    """min/max CTR across `groups` on the arm's own users (no resampling)."""
    by = arm.groupby("group")[["clicks", "impressions"]].sum().reindex(groups)
    return float(_ratio(by["clicks"].to_numpy(np.float64), by["impressions"].to_numpy(np.float64)))
