"""User-level canary statistics: error rates proven by simulation with clustered users, and
the estimates checked against reference implementations (statsmodels, scipy).

Each A/A simulation prints its replication count and observed rate (shown in CI's log).
"""

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.stats import mannwhitneyu

from canary.inference import (
    ArmUsers,
    SequentialState,
    confidence_sequence_halfwidth,
    delta_test,
    per_user,
    sequential_update,
    with_covariate,
)
from canary.latency import compare_latency
from canary.stats import srm_chi2, two_proportion_z
from serving.metrics import histogram_quantile

ALPHA = 0.05
TAU2 = 0.01**2


def _slack(reps: int, alpha: float = ALPHA) -> float:
    # three binomial standard errors: a correct rule fails this about once in 700 runs
    return 3 * math.sqrt(alpha * (1 - alpha) / reps)


def _users(rng, n_users, *, mean_ctr=0.1, icc=0.09, mean_imps=20, lift=0.0):
    """Clustered users: each has a click propensity p_i ~ Beta with the given mean and
    intra-user correlation (ICC = 1 / (a + b + 1)), and a Poisson number of impressions."""
    s = 1 / icc - 1
    p = rng.beta(mean_ctr * s, (1 - mean_ctr) * s, n_users) * (1 + lift)
    m = rng.poisson(mean_imps - 1, n_users) + 1
    clicks = rng.binomial(m, np.clip(p, 0, 1))
    return clicks.astype(float), m.astype(float), p


def _report(capsys, what, reps, rate, bound=None):
    with capsys.disabled():
        b = "" if bound is None else f" (bound {bound:.3f})"
        print(f"\n[A/A] {what}: {reps} replications, observed rate {rate:.3f}{b}")


def test_aa_fixed_test_holds_alpha_with_clustered_users_where_per_impression_does_not(capsys):
    rng = np.random.default_rng(1)
    reps, users = 2000, 300
    delta_rej = naive_rej = 0
    for _ in range(reps):
        ya, na, _ = _users(rng, users)
        yb, nb, _ = _users(rng, users)
        t = delta_test(ArmUsers(ya, na), ArmUsers(yb, nb), alpha=ALPHA, cuped=False)
        delta_rej += t.p_value < ALPHA
        z = two_proportion_z(
            clicks_a=int(ya.sum()), n_a=int(na.sum()), clicks_b=int(yb.sum()), n_b=int(nb.sum())
        )
        naive_rej += z.p_value < ALPHA
    bound = ALPHA + _slack(reps)
    _report(capsys, "delta-method z-test, ICC 0.09, 20 imps/user", reps, delta_rej / reps, bound)
    _report(capsys, "per-impression z-test (for contrast)", reps, naive_rej / reps)
    assert delta_rej / reps <= bound
    # The clustering is real: the test that ignores it is far off (about 0.2 here).
    assert naive_rej / reps > 0.12


def test_aa_msprt_and_confidence_sequence_hold_alpha_under_continuous_monitoring(capsys):
    # One A/A simulation, looked at 20 times: the always-valid p-value may fall below alpha,
    # and the confidence sequence may miss 0, in at most alpha of the runs.
    rng = np.random.default_rng(2)
    reps, looks, per_look = 600, 20, 60
    rejections = misses = 0
    for _ in range(reps):
        ya, na, _ = _users(rng, looks * per_look)
        yb, nb, _ = _users(rng, looks * per_look)
        state = SequentialState()
        for k in range(1, looks + 1):
            s = slice(0, k * per_look)
            t = delta_test(ArmUsers(ya[s], na[s]), ArmUsers(yb[s], nb[s]), cuped=False)
            state = sequential_update(state, diff=t.diff, var=t.var, tau2=TAU2, alpha=ALPHA)
        rejections += state.significant(ALPHA)
        misses += not (state.ci_low <= 0 <= state.ci_high)
    bound = ALPHA + _slack(reps)
    _report(capsys, f"mSPRT over {looks} looks", reps, rejections / reps, bound)
    _report(capsys, "confidence sequence misses 0", reps, misses / reps, bound)
    assert rejections / reps <= bound
    assert misses / reps <= bound


def test_aa_srm_on_users_holds_alpha(capsys):
    rng = np.random.default_rng(4)
    reps = 2000
    arm = rng.random((reps, 1000)) < 0.1  # a 10% canary, users assigned by hash
    b = arm.sum(axis=1)
    rej = sum(
        srm_chi2(observed=[1000 - int(x), int(x)], shares=[90, 10]).p_value < ALPHA for x in b
    )
    bound = ALPHA + _slack(reps)
    _report(capsys, "SRM chi-square on users", reps, rej / reps, bound)
    assert rej / reps <= bound


def test_ab_power_at_the_configured_size_is_reported(capsys):
    # A 10% relative CTR lift, 2000 users per arm: the rule must find it most of the time.
    rng = np.random.default_rng(5)
    reps, users = 400, 2000
    fixed = seq = 0
    for _ in range(reps):
        ya, na, _ = _users(rng, users)
        yb, nb, _ = _users(rng, users, lift=0.10)
        t = delta_test(ArmUsers(ya, na), ArmUsers(yb, nb), cuped=False)
        fixed += t.p_value < ALPHA and t.diff > 0
        st = sequential_update(SequentialState(), diff=t.diff, var=t.var, tau2=TAU2, alpha=ALPHA)
        seq += st.significant(ALPHA) and st.direction > 0
    with capsys.disabled():
        print(
            f"\n[A/B] +10% CTR, {users} users/arm, {reps} replications: power fixed "
            f"{fixed / reps:.2f}, mSPRT (one look) {seq / reps:.2f}"
        )
    assert fixed / reps > 0.5 and seq / reps > 0.3


def test_delta_variance_matches_statsmodels_cluster_robust_regression():
    # click ~ arm on impression rows, standard errors clustered by user: the same estimate.
    rng = np.random.default_rng(6)
    ya, na, _ = _users(rng, 400)
    yb, nb, _ = _users(rng, 400, lift=0.05)
    t = delta_test(ArmUsers(ya, na), ArmUsers(yb, nb), cuped=False)
    rows = []
    for arm, (y, n) in enumerate(((ya, na), (yb, nb))):
        for u, (c, m) in enumerate(zip(y.astype(int), n.astype(int), strict=True)):
            rows.append(
                pd.DataFrame(
                    {"click": [1] * c + [0] * (m - c), "arm": arm, "user": arm * 10_000 + u}
                )
            )
    df = pd.concat(rows, ignore_index=True)
    fit = sm.OLS(df["click"], sm.add_constant(df["arm"].astype(float))).fit(
        cov_type="cluster", cov_kwds={"groups": df["user"], "use_correction": False}
    )
    assert t.diff == pytest.approx(fit.params["arm"], rel=1e-9)
    # ddof=1 here against statsmodels' uncorrected sandwich: equal up to n/(n-1)
    assert t.se == pytest.approx(fit.bse["arm"], rel=5e-3)
    assert t.design_effect > 1.5  # the clustering the per-impression test ignores


def test_cuped_matches_regression_adjustment_and_reduces_variance():
    # Users keep their propensity across periods, so pre-period clicks predict clicks.
    rng = np.random.default_rng(7)
    n = 3000
    arms = []
    for lift in (0.0, 0.05):
        s = 1 / 0.09 - 1
        p = rng.beta(0.1 * s, 0.9 * s, n)
        m_pre, m = rng.poisson(19, n) + 1, rng.poisson(19, n) + 1
        pre = rng.binomial(m_pre, p) / m_pre
        y = rng.binomial(m, np.clip(p * (1 + lift), 0, 1))
        arms.append(ArmUsers(y.astype(float), m.astype(float), pre))
    plain = delta_test(*arms, cuped=False)
    adj = delta_test(*arms, cuped=True)
    assert adj.cuped and adj.variance_reduction > 0.2
    assert adj.se < plain.se
    # Reference: OLS of the linearised metric on [1, arm, X]: the arm coefficient is the
    # CUPED estimate when θ is the pooled slope (equal up to the within/pooled difference).
    lin = np.concatenate([arms[0].linearized(), arms[1].linearized()])
    x = np.concatenate([arms[0].x, arms[1].x])
    arm = np.r_[np.zeros(n), np.ones(n)]
    fit = sm.OLS(lin, sm.add_constant(np.column_stack([arm, x]))).fit(cov_type="HC0")
    assert adj.diff == pytest.approx(fit.params[1], abs=2e-4)
    assert adj.se == pytest.approx(fit.bse[1], rel=0.02)


def test_sequential_direction_is_kept_with_the_running_minimum():
    st = sequential_update(SequentialState(), diff=-0.05, var=1e-4, tau2=TAU2, alpha=ALPHA)
    assert st.significant(ALPHA) and st.direction == -1
    # Later the difference turns positive but weaker: the old significant loss stands.
    st = sequential_update(st, diff=0.01, var=1e-4, tau2=TAU2, alpha=ALPHA)
    assert st.direction == -1 and st.looks == 2
    back = SequentialState.from_dict(st.to_dict())
    assert back == st


def test_confidence_sequence_inverts_the_msprt():
    from canary.stats import msprt

    var, alpha = 2e-5, 0.05
    h = confidence_sequence_halfwidth(var=var, tau2=TAU2, alpha=alpha)
    # A difference exactly at the half-width has Λ = 1/α.
    assert msprt(diff=h, var=var, tau2=TAU2).p_value == pytest.approx(alpha, rel=1e-9)


def test_per_user_from_labels_and_covariate():
    labels = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3, 3, 3, 4],
            "model_version": [1, 1, 2, 2, 2, 1, 1],
            "clicked": [1, 0, 1, 0, 1, 0, 0],
        }
    )
    (ids_a, a), (ids_b, b) = per_user(labels, versions=(1, 2))
    assert sorted(ids_a.tolist()) == [1, 4] and sorted(ids_b.tolist()) == [2, 3]
    assert a.y.sum() == 1 and a.n.sum() == 3  # user 3's lone v1 impression goes with v2
    assert b.n.sum() == 3
    with_x = with_covariate(a, ids_a, pd.Series({1: 0.5}))
    assert dict(zip(ids_a.tolist(), with_x.x.tolist(), strict=True)) == {1: 0.5, 4: 0.0}
    with pytest.raises(ValueError, match="clicked"):
        per_user(labels.drop(columns="clicked"), versions=(1, 2))


def test_binned_mann_whitney_matches_scipy_on_the_expanded_sample():
    rng = np.random.default_rng(8)
    bounds = np.array([1, 2, 5, 10, 20, 50, 100, np.inf], dtype=float)
    a = rng.lognormal(1.5, 0.6, 3000)
    b = rng.lognormal(1.6, 0.6, 2000)
    ca = np.bincount(np.searchsorted(bounds, a), minlength=len(bounds))[: len(bounds)]
    cb = np.bincount(np.searchsorted(bounds, b), minlength=len(bounds))[: len(bounds)]
    res = compare_latency(bounds, ca, cb)
    # scipy on bucket indices: each bucket one tie group, exactly what the histogram knows
    ia, ib = np.repeat(np.arange(len(bounds)), ca), np.repeat(np.arange(len(bounds)), cb)
    ref = mannwhitneyu(ib, ia, alternative="greater", method="asymptotic", use_continuity=False)
    assert res.u == pytest.approx(ref.statistic)
    assert res.p_slower == pytest.approx(ref.pvalue, rel=1e-6)
    assert res.p_slower < 1e-6 and res.prob_slower > 0.5


def test_histogram_quantile_interpolates_like_prometheus():
    bounds = np.array([10.0, 20.0, np.inf])
    assert histogram_quantile(bounds, np.array([50, 50, 0]), 0.5) == pytest.approx(10.0)
    assert histogram_quantile(bounds, np.array([50, 50, 0]), 0.75) == pytest.approx(15.0)
    assert histogram_quantile(bounds, np.array([0, 0, 10]), 0.99) == pytest.approx(20.0)
    assert math.isnan(histogram_quantile(bounds, np.zeros(3), 0.5))
