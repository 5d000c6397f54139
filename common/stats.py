"""Statistics shared by more than one stage, pure and keyword-only; the formula is in the
docstring and a unit test checks it against numbers worked out by hand.

- `psi`: population stability index: the scheduler's input-drift trigger (canary.schedule)
  and the drift checks of `northstar diagnose` and `northstar monitor` (diagnose/).
"""

from __future__ import annotations

import numpy as np


def psi(*, expected: np.ndarray, actual: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `actual` against the reference sample `expected`.

        edges  = quantiles of `expected` at 0, 1/bins, ..., 1 (deduplicated), open-ended
        e_i, a_i = share of each sample in bin i, floored at eps (an empty bin is not -inf)
        PSI    = Σ (a_i - e_i) · ln(a_i / e_i)

    Rules of thumb: < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a major shift.
    A sample with one distinct value gives one bin and PSI 0 unless `actual` differs.
    """
    e = np.asarray(expected, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    e, a = e[np.isfinite(e)], a[np.isfinite(a)]
    if len(e) == 0 or len(a) == 0:
        raise ValueError("psi: both samples need at least one finite value")
    if bins < 1:
        raise ValueError(f"psi: bins={bins}; expected >= 1")
    inner = np.unique(np.quantile(e, np.linspace(0, 1, bins + 1))[1:-1])
    e_share = np.bincount(np.searchsorted(inner, e, side="right"), minlength=len(inner) + 1)
    a_share = np.bincount(np.searchsorted(inner, a, side="right"), minlength=len(inner) + 1)
    ep = np.maximum(e_share / len(e), eps)
    ap = np.maximum(a_share / len(a), eps)
    return float(((ap - ep) * np.log(ap / ep)).sum())
