"""Pure, keyword-only statistics for the canary: each formula is in its docstring and a unit
test checks it against numbers worked out by hand.

- `two_proportion_z`: the fixed-horizon test of CTR(canary) vs CTR(production).
- `msprt`: the always-valid (sequential) test, safe to look at after every evaluation.
- `srm_chi2`: sample-ratio mismatch of the observed split vs the configured one.
- `binomial_excess`: the always-valid test that a rate (errors, fallbacks) exceeds a null rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import betaincc, betaln
from scipy.stats import chi2, norm


@dataclass(frozen=True)
class ZTest:
    diff: float  # p_canary - p_production
    se: float  # unpooled standard error of diff (for the interval)
    z: float  # diff / pooled standard error
    p_value: float  # two-sided
    ci_low: float  # diff - z_(1-α/2) · se
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def two_proportion_z(
    *, clicks_a: int, n_a: int, clicks_b: int, n_b: int, confidence: float = 0.95
) -> ZTest:
    """Two-proportion z-test of p_b - p_a (a = production, b = canary).

        p_a = c_a / n_a,  p_b = c_b / n_b,  p = (c_a + c_b) / (n_a + n_b)
        z   = (p_b - p_a) / sqrt(p (1 - p) (1/n_a + 1/n_b))          (pooled under H0)
        p-value = 2 (1 - Φ(|z|))
        CI  = (p_b - p_a) ± Φ⁻¹(1 - α/2) · sqrt(p_a(1-p_a)/n_a + p_b(1-p_b)/n_b)

    z = 0 and p = 1 when the pooled variance is 0 (no clicks at all, or all clicks).
    """
    if min(n_a, n_b) <= 0:
        raise ValueError(f"two_proportion_z: n_a={n_a}, n_b={n_b}; expected both > 0")
    if not (0 <= clicks_a <= n_a and 0 <= clicks_b <= n_b):
        raise ValueError("two_proportion_z: expected 0 <= clicks <= n in each arm")
    pa, pb = clicks_a / n_a, clicks_b / n_b
    pool = (clicks_a + clicks_b) / (n_a + n_b)
    var0 = pool * (1 - pool) * (1 / n_a + 1 / n_b)
    z = (pb - pa) / math.sqrt(var0) if var0 > 0 else 0.0
    p = float(2 * norm.sf(abs(z)))
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    q = float(norm.ppf(1 - (1 - confidence) / 2))
    return ZTest(pb - pa, se, float(z), p, pb - pa - q * se, pb - pa + q * se)


@dataclass(frozen=True)
class MSPRT:
    likelihood_ratio: float  # Λ_n at this look
    p_value: float  # always-valid p-value: min(previous, 1 / Λ_n), capped at 1
    tau2: float

    def to_dict(self) -> dict:
        return asdict(self)


def msprt(*, diff: float, var: float, tau2: float, previous_p: float = 1.0) -> MSPRT:
    """Mixture sequential probability ratio test with a normal mixture (Johari, Koomen,
    Pekelis & Walsh 2017, "Peeking at A/B tests", eq. for the normal case).

    θ̂ = p_canary - p_production is approximately N(θ, V) with V = σ_b²/n_b + σ_a²/n_a
    (σ² = p(1-p) per arm, plug-in). Mixing the alternative over θ ~ N(0, τ²):

        Λ_n = ∫ φ(θ̂; θ, V) φ(θ; 0, τ²) dθ / φ(θ̂; 0, V)
            = sqrt(V / (V + τ²)) · exp( τ² θ̂² / (2 V (V + τ²)) )

    With n users per arm and per-observation variance V₁ (V = V₁/n) this is the paper's
    sqrt(V₁/(V₁ + nτ²)) · exp(n² τ² θ̂² / (2 V₁ (V₁ + nτ²))). The always-valid p-value is
    p_n = min(p_{n-1}, 1/Λ_n): rejecting when p_n < α keeps the type-I error at α however
    often the test is looked at. τ is the effect size one expects (a CTR difference in
    absolute points): a smaller τ detects small effects sooner and large ones later.
    """
    if var <= 0:
        return MSPRT(1.0, min(previous_p, 1.0), tau2)
    if tau2 <= 0:
        raise ValueError(f"msprt: tau2={tau2}; expected > 0")
    log_lr = 0.5 * math.log(var / (var + tau2)) + tau2 * diff * diff / (2 * var * (var + tau2))
    lr = math.exp(min(log_lr, 700.0))  # exp(700) ~ 1e304: far past any α
    return MSPRT(lr, float(min(previous_p, 1.0, 1.0 / lr)), tau2)


@dataclass(frozen=True)
class SRM:
    chi2: float
    p_value: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["observed"], d["expected"] = list(self.observed), list(self.expected)
        return d


def srm_chi2(*, observed: list[int] | tuple[int, ...], shares: list[float]) -> SRM:
    """Sample-ratio mismatch: Pearson's chi-square of observed counts vs the configured split.

        E_i = N · s_i / Σs,   χ² = Σ (O_i - E_i)² / E_i,   p = P(χ²_{k-1} ≥ χ²)

    A tiny p (the usual alarm is p < 0.001) means the split itself is broken (routing,
    logging, a version that fails and falls back), so no comparison of the arms is trusted.
    """
    obs = np.asarray(observed, dtype=np.float64)
    s = np.asarray(shares, dtype=np.float64)
    if obs.shape != s.shape or len(obs) < 2:
        raise ValueError("srm_chi2: observed and shares need the same length >= 2")
    if np.any(s <= 0):
        raise ValueError(f"srm_chi2: shares={list(shares)}; expected every share > 0")
    n = obs.sum()
    exp = n * s / s.sum()
    stat = float(((obs - exp) ** 2 / np.where(exp > 0, exp, 1.0)).sum()) if n > 0 else 0.0
    p = float(chi2.sf(stat, len(obs) - 1)) if n > 0 else 1.0
    return SRM(stat, p, tuple(int(x) for x in obs), tuple(float(x) for x in exp))


@dataclass(frozen=True)
class Excess:
    successes: int
    trials: int
    null_rate: float
    likelihood_ratio: float  # the mixture martingale at this look
    p_value: float  # always-valid: min(1, 1 / likelihood_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


def binomial_excess(*, successes: int, trials: int, null_rate: float) -> Excess:
    """Always-valid one-sided test that a Bernoulli rate exceeds `null_rate` (q).

    H0: p <= q. The alternative is mixed uniformly over p in (q, 1):

        Λ_n = [∫_q^1 p^k (1-p)^(n-k) dp / (1 - q)] / [q^k (1-q)^(n-k)]
            = B(k+1, n-k+1) · (1 - I_q(k+1, n-k+1)) / ((1 - q) q^k (1-q)^(n-k))

    (k successes of n, I the regularised incomplete beta). Λ_n is a mixture of likelihood
    ratios p vs q, so it is a martingale under p = q and a supermartingale under p < q;
    by Ville's inequality P(Λ_n >= 1/α at any n) <= α, so the test may be looked at after
    every request without raising its type-I error. It needs no separate minimum count: a
    few successes cannot move Λ past 1/α unless q is small enough that they are unlikely.
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"binomial_excess: {successes} of {trials}; expected 0 <= k <= n")
    if not 0 < null_rate < 1:
        raise ValueError(f"binomial_excess: null_rate={null_rate}; expected 0 < q < 1")
    k, n, q = successes, trials, null_rate
    upper = float(betaincc(k + 1, n - k + 1, q))
    if upper <= 0:
        return Excess(k, n, q, 0.0, 1.0)
    log_lr = (
        float(betaln(k + 1, n - k + 1))
        + math.log(upper)
        - math.log1p(-q)
        - k * math.log(q)
        - (n - k) * math.log1p(-q)
    )
    lr = math.exp(min(log_lr, 700.0))
    return Excess(k, n, q, lr, float(min(1.0, 1.0 / lr)) if lr > 0 else 1.0)
