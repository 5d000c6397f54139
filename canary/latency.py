"""The latency guardrail as a distribution test on per-request latency histograms.

`recommend` records each request's latency per serving version in a Prometheus histogram
(fixed buckets). Comparing one p99 with a wide tolerance misses a canary that is slower
everywhere but at the very tail, and flags noise at low traffic. Following Kayenta, the
guardrail asks two questions of the two arms' histograms:

1. Is the canary stochastically slower? Mann-Whitney U on the binned latencies, each
   bucket a tie group (the normal approximation with the tie correction), one-sided.
2. Is it slower by enough to matter? The ratio of the p99s, interpolated in the buckets
   the way Prometheus' histogram_quantile does.

Both must hold for a failure, so a significant but negligible shift does not roll back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from serving.metrics import histogram_quantile


@dataclass(frozen=True)
class LatencyComparison:
    requests_a: int
    requests_b: int
    u: float  # Mann-Whitney U of the canary (b) against production (a)
    z: float
    p_slower: float  # one-sided p-value of "canary latencies are larger"
    prob_slower: float  # P(canary request > production request) + ½ P(tie): the effect size
    p99_a_ms: float
    p99_b_ms: float
    p99_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_latency(
    upper_bounds: np.ndarray, counts_a: np.ndarray, counts_b: np.ndarray
) -> LatencyComparison:
    """Mann-Whitney U of canary (b) vs production (a) on binned latencies, plus p99s."""
    a = np.asarray(counts_a, np.float64)
    b = np.asarray(counts_b, np.float64)
    if a.shape != b.shape or a.shape != np.asarray(upper_bounds).shape:
        raise ValueError("compare_latency: bucket bounds and both count vectors must align")
    na, nb = a.sum(), b.sum()
    if na <= 0 or nb <= 0:
        raise ValueError(f"compare_latency: {int(na)} and {int(nb)} requests; need both > 0")
    below_a = np.concatenate([[0.0], np.cumsum(a)[:-1]])
    # U_b counts pairs where the canary request is slower, ties counting one half.
    u = float((b * (below_a + 0.5 * a)).sum())
    n = na + nb
    t = a + b
    tie = float((t**3 - t).sum())
    var = na * nb / 12.0 * ((n + 1) - tie / (n * (n - 1)))
    mean = na * nb / 2.0
    z = (u - mean) / math.sqrt(var) if var > 0 else 0.0
    p99_a = histogram_quantile(upper_bounds, a, 0.99)
    p99_b = histogram_quantile(upper_bounds, b, 0.99)
    return LatencyComparison(
        requests_a=int(na),
        requests_b=int(nb),
        u=u,
        z=float(z),
        p_slower=float(norm.sf(z)) if var > 0 else 0.5,
        prob_slower=u / (na * nb),
        p99_a_ms=p99_a,
        p99_b_ms=p99_b,
        p99_ratio=p99_b / p99_a if p99_a > 0 else float("nan"),
    )
