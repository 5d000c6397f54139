"""Consumer-side fairness: per-user metrics disaggregated by user group.

Point estimates, differences, ratios and group minima come from Fairlearn's `MetricFrame`,
so the numbers are the ones a reviewer gets by calling Fairlearn directly. Confidence
intervals do not: `MetricFrame(n_boot=100)` is slow at 100k users (`python -m fairness.bench`
measures it), because it rebuilds a pandas groupby per resample. `bootstrap_group_means`
draws the same kind of resample (n users with replacement from the whole population, as
Fairlearn does) and gets every group's mean from `np.bincount`s, far faster, with the same
quantiles when fed the same resamples (tests/unit/test_fairness_groups.py).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

# Shown between the values of an intersectional group, e.g. "F × 25-34".
JOIN = " × "


def _column_mean(y_true: np.ndarray, y_pred: np.ndarray, *, column: int) -> float:
    # MetricFrame hands each metric (y_true, y_pred) for one group; the per-user metric
    # values ride in y_true, one column per metric, so one frame serves all metrics.
    return float(np.mean(np.asarray(y_true)[:, column]))


def group_codes(sensitive: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(N,) group code per row and the sorted group labels (values joined with JOIN)."""
    cols = [sensitive[c].astype(str) for c in sensitive.columns]
    labels = cols[0]
    for col in cols[1:]:
        labels = labels + JOIN + col  # vectorised: a row-wise agg dominated the audit
    codes, uniques = pd.factorize(labels.to_numpy(), sort=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def group_means_of_resamples(
    *, values: np.ndarray, codes: np.ndarray, n_groups: int, idx: np.ndarray
) -> np.ndarray:
    """(B, M, G) mean of each metric in each group for each resample; NaN where a resample
    holds nobody from a group.

    values (M, N) per-user metrics; codes (N,) group of each user; idx (B, N) row indices of
    B resamples.
    """
    return _group_means(values[:, idx], codes[idx], n_groups)


def _group_means(sampled: np.ndarray, sampled_codes: np.ndarray, n_groups: int) -> np.ndarray:
    """sampled (M, B, N) metric values and sampled_codes (B, N) groups of resampled users.
    One bincount over keys b * G + group counts users; one per metric sums their values."""
    m, b, _ = sampled.shape
    keys = (sampled_codes + (np.arange(b) * n_groups)[:, None]).ravel()  # (B * N,)
    counts = np.bincount(keys, minlength=b * n_groups).reshape(b, n_groups)
    out = np.empty((b, m, n_groups))
    for j in range(m):
        sums = np.bincount(keys, weights=sampled[j].ravel(), minlength=b * n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j, :] = sums.reshape(b, n_groups) / counts
    return out


def _resample_indices(n: int, n_boot: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))  # (b, N)


@dataclass(frozen=True)
class BootstrapCI:
    """Quantiles over resamples. Arrays are (Q, M, G) for groups, (Q, M) for the rest."""

    quantiles: tuple[float, ...]
    by_group: np.ndarray
    overall: np.ndarray
    difference: np.ndarray  # max - min over groups, per resample
    ratio: np.ndarray  # min / max over groups, per resample


def summarise_resamples(
    means: np.ndarray, overall: np.ndarray, quantiles: tuple[float, ...]
) -> BootstrapCI:
    """Quantiles of the (B, M, G) group means and of the statistics derived from them.

    np.nanquantile with linear interpolation, as Fairlearn uses, so that identical resamples
    give identical intervals. Groups missing from a resample drop out of its max and min.
    """
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a group never drawn
        hi, lo = np.nanmax(means, axis=2), np.nanmin(means, axis=2)  # (B, M)
        q = list(quantiles)
        return BootstrapCI(
            quantiles=tuple(quantiles),
            by_group=np.nanquantile(means, q, axis=0),
            overall=np.nanquantile(overall, q, axis=0),
            difference=np.nanquantile(hi - lo, q, axis=0),
            ratio=np.nanquantile(
                np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), np.nan), q, axis=0
            ),
        )


def bootstrap_group_means(
    *,
    values: np.ndarray,
    codes: Mapping[str, np.ndarray],
    n_groups: Mapping[str, int],
    n_boot: int,
    quantiles: tuple[float, ...] = (0.025, 0.975),
    seed: int = 0,
    chunk: int = 25,
) -> dict[str, BootstrapCI]:
    """Bootstrap CIs of group means for several groupings of the same users at once.

    values (M, N); codes[name] (N,) and n_groups[name] per grouping. Each resample draws N
    users with replacement from everyone (not per group), which is what MetricFrame does,
    and is shared by all groupings. Memory is O(chunk * N) per array.
    """
    n = values.shape[1]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in codes}
    overall: list[np.ndarray] = []
    for idx in _resample_indices(n, n_boot, seed, chunk):
        sampled = values[:, idx]  # (M, b, N): gathered once, shared by every grouping
        overall.append(sampled.mean(axis=2).T)  # (b, M)
        for name, c in codes.items():
            parts[name].append(_group_means(sampled, c[idx], n_groups[name]))
    all_overall = np.concatenate(overall)
    return {
        name: summarise_resamples(np.concatenate(p), all_overall, quantiles)
        for name, p in parts.items()
    }


@dataclass(frozen=True)
class GroupTable:
    """One sensitive attribute (or intersection) across all metrics, JSON-ready.

    Point estimates and the between-group statistics are MetricFrame's; `ci_*` come from
    the numpy bootstrap.
    """

    attribute: str
    groups: tuple[str, ...]
    sizes: tuple[int, ...]
    metrics: tuple[str, ...]
    by_group: dict[str, dict[str, float]]  # metric -> group -> mean
    ci_low: dict[str, dict[str, float]]
    ci_high: dict[str, dict[str, float]]
    overall: dict[str, float]
    difference: dict[str, float]  # MetricFrame.difference(method="between_groups")
    difference_to_overall: dict[str, float]  # MetricFrame.difference(method="to_overall")
    ratio: dict[str, float]  # MetricFrame.ratio(): min over pairs of groups, <= 1
    group_min: dict[str, float]
    group_max: dict[str, float]
    difference_ci: dict[str, tuple[float, float]]

    def size_of(self, group: str) -> int:
        return self.sizes[self.groups.index(group)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "attribute": self.attribute,
            "groups": list(self.groups),
            "sizes": list(self.sizes),
            "metrics": list(self.metrics),
            "by_group": self.by_group,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "overall": self.overall,
            "difference": self.difference,
            "difference_to_overall": self.difference_to_overall,
            "ratio": self.ratio,
            "group_min": self.group_min,
            "group_max": self.group_max,
            "difference_ci": {m: list(v) for m, v in self.difference_ci.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupTable:
        return cls(
            attribute=d["attribute"],
            groups=tuple(d["groups"]),
            sizes=tuple(int(s) for s in d["sizes"]),
            metrics=tuple(d["metrics"]),
            by_group=_floats2(d["by_group"]),
            ci_low=_floats2(d["ci_low"]),
            ci_high=_floats2(d["ci_high"]),
            overall=_floats(d["overall"]),
            difference=_floats(d["difference"]),
            difference_to_overall=_floats(d["difference_to_overall"]),
            ratio=_floats(d["ratio"]),
            group_min=_floats(d["group_min"]),
            group_max=_floats(d["group_max"]),
            difference_ci={m: (_f(v[0]), _f(v[1])) for m, v in d["difference_ci"].items()},
        )


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: _f(v) for k, v in d.items()}


def _floats2(d: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {k: _floats(v) for k, v in d.items()}


def metric_frame(per_user: Mapping[str, np.ndarray], sensitive: pd.DataFrame) -> MetricFrame:
    """One MetricFrame over all metrics: y_true is the (N, M) matrix of per-user values and
    each metric is the mean of its column. y_pred is unused (zeros)."""
    names = list(per_user)
    y = np.stack([np.asarray(per_user[m], dtype=np.float64) for m in names], axis=1)  # (N, M)
    metrics = {m: functools.partial(_column_mean, column=j) for j, m in enumerate(names)}
    sf = sensitive.reset_index(drop=True)
    return MetricFrame(metrics=metrics, y_true=y, y_pred=np.zeros(len(y)), sensitive_features=sf)


def _label(key: Any) -> str:
    return JOIN.join(str(v) for v in key) if isinstance(key, tuple) else str(key)


def disaggregate(
    *,
    per_user: Mapping[str, np.ndarray],
    users: pd.DataFrame,
    groupings: Mapping[str, tuple[str, ...]],
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, GroupTable]:
    """A GroupTable per grouping. `groupings` maps a name ("gender", "gender×age_bucket") to
    the user columns it crosses; `users` is row-aligned with the per-user arrays."""
    names = list(per_user)
    values = np.stack([np.asarray(per_user[m], dtype=np.float64) for m in names])  # (M, N)
    codes, labels = {}, {}
    for name, cols in groupings.items():
        codes[name], labels[name] = group_codes(users[list(cols)])
    quantiles = ((1 - ci) / 2, 1 - (1 - ci) / 2)
    cis = (
        bootstrap_group_means(
            values=values,
            codes=codes,
            n_groups={g: len(v) for g, v in labels.items()},
            n_boot=n_boot,
            quantiles=quantiles,
            seed=seed,
        )
        if n_boot > 0
        else {}
    )
    out = {}
    for name, cols in groupings.items():
        mf = metric_frame(per_user, users[list(cols)])
        bg = mf.by_group
        bg.index = [_label(k) for k in bg.index]
        groups = tuple(labels[name])
        bg = bg.loc[list(groups)]
        sizes = tuple(int(s) for s in np.bincount(codes[name], minlength=len(groups)))
        nan = float("nan")
        if name in cis:
            c = cis[name]
            lo = {
                m: dict(zip(groups, map(float, c.by_group[0, j]), strict=True))
                for j, m in enumerate(names)
            }
            hi = {
                m: dict(zip(groups, map(float, c.by_group[1, j]), strict=True))
                for j, m in enumerate(names)
            }
            dci = {
                m: (float(c.difference[0, j]), float(c.difference[1, j]))
                for j, m in enumerate(names)
            }
        else:
            lo = {m: dict.fromkeys(groups, nan) for m in names}
            hi = {m: dict.fromkeys(groups, nan) for m in names}
            dci = {m: (nan, nan) for m in names}
        out[name] = GroupTable(
            attribute=name,
            groups=groups,
            sizes=sizes,
            metrics=tuple(names),
            by_group={m: {g: float(bg.loc[g, m]) for g in groups} for m in names},
            ci_low=lo,
            ci_high=hi,
            overall={m: float(mf.overall[m]) for m in names},
            difference={m: float(v) for m, v in mf.difference().items()},
            difference_to_overall={
                m: float(v) for m, v in mf.difference(method="to_overall").items()
            },
            ratio={m: float(v) for m, v in mf.ratio().items()},
            group_min={m: float(v) for m, v in mf.group_min().items()},
            group_max={m: float(v) for m, v in mf.group_max().items()},
            difference_ci=dci,
        )
    return out
