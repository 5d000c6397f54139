"""canary.stats against numbers worked out by hand."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from canary.stats import binomial_excess, msprt, srm_chi2, two_proportion_z


def test_two_proportion_z_hand_computed():
    # a: 100/1000 = 0.10, b: 130/1000 = 0.13; pooled p = 230/2000 = 0.115
    # pooled var = 0.115 * 0.885 * (2/1000) = 2.0355e-4 -> se0 = 0.014267
    # z = 0.03 / 0.014267 = 2.10275; two-sided p = 0.035488
    r = two_proportion_z(clicks_a=100, n_a=1000, clicks_b=130, n_b=1000)
    assert r.diff == pytest.approx(0.03)
    assert r.z == pytest.approx(2.10275, abs=1e-4)
    assert r.p_value == pytest.approx(0.035488, abs=1e-6)
    # unpooled se = sqrt(0.1*0.9/1000 + 0.13*0.87/1000) = sqrt(2.031e-4) = 0.0142513
    assert r.se == pytest.approx(0.0142513, abs=1e-6)
    assert r.ci_low == pytest.approx(0.03 - 1.959964 * 0.0142513, abs=1e-6)


def test_two_proportion_z_degenerate_and_errors():
    r = two_proportion_z(clicks_a=0, n_a=10, clicks_b=0, n_b=10)
    assert r.z == 0 and r.p_value == 1
    with pytest.raises(ValueError):
        two_proportion_z(clicks_a=1, n_a=0, clicks_b=0, n_b=1)
    with pytest.raises(ValueError):
        two_proportion_z(clicks_a=5, n_a=4, clicks_b=0, n_b=1)


def test_msprt_hand_computed():
    # θ̂ = 0.02, V = 1e-4, τ² = 4e-4: V + τ² = 5e-4
    # Λ = sqrt(1e-4 / 5e-4) * exp(4e-4 * 4e-4 / (2 * 1e-4 * 5e-4))
    #   = sqrt(0.2) * exp(1.6) = 0.4472136 * 4.9530324 = 2.2150638
    r = msprt(diff=0.02, var=1e-4, tau2=4e-4)
    assert r.likelihood_ratio == pytest.approx(2.2150638, rel=1e-6)
    assert r.p_value == pytest.approx(1 / 2.2150638, rel=1e-6)  # 0.451454


def test_msprt_matches_johari_equal_arm_form():
    # n per arm, per-observation variance V1: V = V1 / n gives the paper's expression
    n, v1, tau2, theta = 500, 0.25, 0.001, 0.05
    paper = math.sqrt(v1 / (v1 + n * tau2)) * math.exp(
        n * n * tau2 * theta**2 / (2 * v1 * (v1 + n * tau2))
    )
    assert msprt(diff=theta, var=v1 / n, tau2=tau2).likelihood_ratio == pytest.approx(paper)


def test_msprt_p_value_is_a_running_minimum():
    first = msprt(diff=0.05, var=1e-4, tau2=4e-4)
    assert first.p_value < 0.01
    later = msprt(diff=0.0, var=1e-4, tau2=4e-4, previous_p=first.p_value)
    assert later.p_value == first.p_value  # never increases
    assert msprt(diff=0.0, var=0.0, tau2=4e-4).p_value == 1.0


def test_msprt_type_one_error_under_continuous_peeking():
    # A/A test looked at after every 100 observations: the always-valid p stays honest.
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(200):
        a = rng.random(4000) < 0.1
        b = rng.random(4000) < 0.1
        p = 1.0
        for n in range(100, 4001, 100):
            pa, pb = a[:n].mean(), b[:n].mean()
            var = pa * (1 - pa) / n + pb * (1 - pb) / n
            p = msprt(diff=pb - pa, var=var, tau2=0.02**2, previous_p=p).p_value
        rejections += p < 0.05
    assert rejections / 200 <= 0.08  # ≤ α plus Monte Carlo slack; naive peeking gives ~0.3


def test_srm_chi2_hand_computed():
    # 550 vs 450 against 50/50: E = 500 each, χ² = (50² + 50²) / 500 = 10, p = 0.0015654
    r = srm_chi2(observed=[550, 450], shares=[50, 50])
    assert r.chi2 == pytest.approx(10.0)
    assert r.p_value == pytest.approx(0.0015654, abs=1e-6)
    # 90/10 split: 880 vs 120 -> E = 900, 100; χ² = 400/900 + 400/100 = 4.4444
    r = srm_chi2(observed=[880, 120], shares=[90, 10])
    assert r.chi2 == pytest.approx(4.44444, abs=1e-4)
    with pytest.raises(ValueError):
        srm_chi2(observed=[1, 2], shares=[1, 0])


def test_binomial_excess_matches_its_closed_form_and_needs_a_few_successes():
    # k = n: Λ = ((1 - q^(k+1)) / (k+1)) / ((1 - q) q^k), by hand
    for k in (1, 3, 4):
        t = binomial_excess(successes=k, trials=k, null_rate=0.1)
        assert t.likelihood_ratio == pytest.approx((1 - 0.1 ** (k + 1)) / (k + 1) / 0.9 / 0.1**k)
    # three of three at a 10% share is not yet an alarm at 0.001, four are
    assert binomial_excess(successes=3, trials=3, null_rate=0.1).p_value > 0.001
    assert binomial_excess(successes=4, trials=4, null_rate=0.1).p_value < 0.001
    # at the null rate there is no evidence, and nothing is no evidence
    assert binomial_excess(successes=10, trials=100, null_rate=0.1).p_value == 1.0
    assert binomial_excess(successes=0, trials=0, null_rate=0.1).p_value == 1.0


def test_binomial_excess_keeps_its_level_over_every_look():
    """At the null rate, crossing 1/alpha at ANY of 500 looks happens at most alpha of the
    time (Ville's inequality), with a binomial margin for the replications."""
    rng = np.random.default_rng(0)
    alpha, q, reps = 0.05, 0.1, 400
    crossed = 0
    for _ in range(reps):
        k = np.cumsum(rng.random(500) < q)
        p = [
            binomial_excess(successes=int(k[i]), trials=i + 1, null_rate=q).p_value
            for i in range(0, 500, 5)
        ]
        crossed += min(p) < alpha
    assert crossed <= binom.ppf(0.999, reps, alpha), crossed
