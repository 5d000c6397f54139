"""The north-star metric from labelled impressions: CTR and engaged value per impression.

The interval and ratio functions are pure and keyword-only, with the formula in the
docstring, so that a test can check them against numbers worked out by hand. The table
functions group the labels (per model version, per day, per user group) and apply them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from common.files import atomic_write_text
from common.jsonsafe import dumps, to_jsonable
from feedback.join import utc_dates

# The user attributes the fairness audit also slices by (training.schema.USER_CATEGORICALS
# minus occupation, which synthetic worlds do not have).
GROUP_COLUMNS = ("gender", "age_bucket", "activity")
UNKNOWN_GROUP = "unknown"


def z_value(*, confidence: float) -> float:
    """Two-sided normal quantile: z = Φ⁻¹(1 - (1 - confidence) / 2); 1.95996 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: expected a value in (0, 1)")
    return float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def ctr(*, clicks: np.ndarray, impressions: np.ndarray) -> np.ndarray:
    """Click-through rate: clicks / impressions; NaN where impressions == 0."""
    c = np.asarray(clicks, dtype=np.float64)
    n = np.asarray(impressions, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, c / np.where(n > 0, n, 1.0), np.nan)


def wilson_interval(
    *, successes: np.ndarray, trials: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion (vectorised).

    With p = s / n and z = z_value(confidence):

        centre = (p + z² / (2n)) / (1 + z² / n)
        half   = z / (1 + z² / n) * sqrt(p (1 - p) / n + z² / (4 n²))

    and the interval is [centre - half, centre + half], clipped to [0, 1]. Unlike the
    normal (Wald) interval it stays inside [0, 1] and is not zero-width at 0 or n clicks.
    Where n == 0 the interval is the whole [0, 1].
    """
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(s < 0) or np.any(s > n):
        raise ValueError("wilson_interval: expected 0 <= successes <= trials")
    z = z_value(confidence=confidence)
    safe_n = np.where(n > 0, n, 1.0)
    p = s / safe_n
    denom = 1.0 + z * z / safe_n
    centre = (p + z * z / (2.0 * safe_n)) / denom
    half = z / denom * np.sqrt(p * (1.0 - p) / safe_n + z * z / (4.0 * safe_n * safe_n))
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    return low, high


def mean_interval(
    *, total: np.ndarray, total_sq: np.ndarray, n: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean with a normal-approximation interval, from per-group sums (vectorised).

        mean = total / n
        s²   = (total_sq - n * mean²) / (n - 1)        (sample variance)
        half = z * sqrt(s² / n)

    Returns (mean, mean - half, mean + half). Engaged value per impression is mostly zeros
    with a long tail, but groups here hold thousands of impressions, where the central
    limit theorem holds well enough; it needs only sums, so it costs one groupby. Where
    n < 2 the interval is NaN (no variance estimate), and where n == 0 the mean is NaN.
    """
    t = np.asarray(total, dtype=np.float64)
    t2 = np.asarray(total_sq, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = z_value(confidence=confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, t / n, np.nan)
        var = np.where(n > 1, np.maximum(t2 - n * mean * mean, 0.0) / (n - 1.0), np.nan)
        half = z * np.sqrt(var / n)
    return mean, mean - half, mean + half


def north_star_table(
    labels: pd.DataFrame, *, by: list[str], confidence: float = 0.95
) -> pd.DataFrame:
    """One row per group: impressions, clicks, CTR with a Wilson interval, and engaged
    value per impression with a normal interval. `labels` needs `clicked`, `value` and
    the `by` columns."""
    value = labels["value"].to_numpy(np.float64)
    frame = labels[by].assign(
        _clicked=labels["clicked"].to_numpy(np.int64), _value=value, _value_sq=value * value
    )
    g = (
        frame.groupby(by, sort=True, dropna=False, observed=True)
        .agg(
            impressions=("_clicked", "size"),
            clicks=("_clicked", "sum"),
            value_sum=("_value", "sum"),
            value_sq=("_value_sq", "sum"),
        )
        .reset_index()
    )
    n, c = g["impressions"].to_numpy(), g["clicks"].to_numpy()
    low, high = wilson_interval(successes=c, trials=n, confidence=confidence)
    mean, v_low, v_high = mean_interval(
        total=g["value_sum"].to_numpy(),
        total_sq=g["value_sq"].to_numpy(),
        n=n,
        confidence=confidence,
    )
    return g[by].assign(
        impressions=n.astype(np.int64),
        clicks=c.astype(np.int64),
        ctr=ctr(clicks=c, impressions=n),
        ctr_low=low,
        ctr_high=high,
        value_per_impression=mean,
        value_low=v_low,
        value_high=v_high,
    )


def with_user_groups(labels: pd.DataFrame, users: pd.DataFrame | None) -> pd.DataFrame:
    """Attach GROUP_COLUMNS by user_id; users missing from the table are "unknown"."""
    out = labels.copy()
    if users is None:
        for col in GROUP_COLUMNS:
            out[col] = UNKNOWN_GROUP
        return out
    missing = [c for c in ("user_id", *GROUP_COLUMNS) if c not in users.columns]
    if missing:
        raise ValueError(f"users table: missing column(s) {missing}")
    u = users[["user_id", *GROUP_COLUMNS]].drop_duplicates("user_id")
    out = out.merge(u, on="user_id", how="left")
    for col in GROUP_COLUMNS:
        out[col] = out[col].fillna(UNKNOWN_GROUP).astype(str)
    return out


def compute_metrics(
    labels: pd.DataFrame, *, users: pd.DataFrame | None = None, confidence: float = 0.95
) -> dict:
    """The north-star report: per model version, per version and day, per version and
    user group. JSON-ready (NaN becomes null)."""
    if "date" not in labels.columns:
        labels = labels.assign(date=utc_dates(labels["impression_ts"].to_numpy()))
    lab = with_user_groups(labels, users)
    report = {
        "confidence": confidence,
        "impressions": len(lab),
        "by_version": _records(north_star_table(lab, by=["model_version"], confidence=confidence)),
        "by_version_day": _records(
            north_star_table(lab, by=["model_version", "date"], confidence=confidence)
        ),
        "by_version_group": {
            col: _records(north_star_table(lab, by=["model_version", col], confidence=confidence))
            for col in GROUP_COLUMNS
        },
    }
    return report


def _records(df: pd.DataFrame) -> list[dict]:
    return to_jsonable(df.to_dict(orient="records"))


def format_metrics(report: dict) -> str:
    """A plain-text table: per version, then per version and day."""
    lines = []

    def table(title: str, rows: list[dict], keys: list[str]) -> None:
        lines.append(title)
        head = "".join(f"{k:>14}" for k in keys)
        lines.append(
            f"{head}{'impressions':>12}{'clicks':>9}{'CTR [95% CI]':>26}{'value/imp [CI]':>28}"
        )
        for r in rows:
            key = "".join(f"{r[k]!s:>14}" for k in keys)
            lines.append(
                f"{key}{r['impressions']:>12,}{r['clicks']:>9,}"
                f"{_fmt(r['ctr'], '.4f'):>10} [{_fmt(r['ctr_low'], '.4f')}, "
                f"{_fmt(r['ctr_high'], '.4f')}]"
                f"{_fmt(r['value_per_impression'], '.1f'):>12} [{_fmt(r['value_low'], '.1f')}, "
                f"{_fmt(r['value_high'], '.1f')}]"
            )
        lines.append("")

    table("north star by model version", report["by_version"], ["model_version"])
    table("by model version and day", report["by_version_day"], ["model_version", "date"])
    for col, rows in report["by_version_group"].items():
        table(f"by model version and {col}", rows, ["model_version", col])
    return "\n".join(lines)


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def write_metrics(report: dict, path: str | Path) -> Path:
    return atomic_write_text(path, dumps(report, indent=1) + "\n")
