"""Group aggregation: the numbers are Fairlearn's, and the fast bootstrap agrees with its own."""

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame

from fairness.groups import (
    JOIN,
    bootstrap_group_means,
    disaggregate,
    group_codes,
    group_means_of_resamples,
    summarise_resamples,
)


def _mean(y_true, y_pred):
    return float(np.mean(y_true))


def _mean_of_values(y_true, y_pred, values):
    return float(np.mean(values))


@pytest.fixture(scope="module")
def population():
    rng = np.random.default_rng(3)
    n = 1500
    users = pd.DataFrame(
        {
            "gender": rng.choice(["F", "M", "X"], n, p=[0.5, 0.45, 0.05]),
            "age_bucket": rng.choice(["18-24", "25-34", "55+"], n),
        }
    )
    per_user = {
        # A real gap (F lower), so differences and ratios are not ~0 and ~1.
        "ndcg@10": rng.random(n) * np.where(users["gender"] == "F", 0.6, 1.0),
        "hitrate@10": (rng.random(n) < 0.4).astype(float),
    }
    return users, per_user


def test_point_estimates_equal_fairlearn_called_directly(population):
    users, per_user = population
    tables = disaggregate(
        per_user=per_user,
        users=users,
        n_boot=0,
        groupings={"gender": ("gender",), "gender×age_bucket": ("gender", "age_bucket")},
    )
    for name, cols in (("gender", ["gender"]), ("gender×age_bucket", ["gender", "age_bucket"])):
        sf = users[cols[0]] if len(cols) == 1 else users[cols]  # a Series, or a DataFrame
        t = tables[name]
        for m, v in per_user.items():
            mf = MetricFrame(metrics=_mean, y_true=v, y_pred=v, sensitive_features=sf)
            direct = {
                (JOIN.join(k) if isinstance(k, tuple) else k): x for k, x in mf.by_group.items()
            }
            assert set(direct) == set(t.groups)
            for g, x in direct.items():
                assert t.by_group[m][g] == pytest.approx(x, rel=1e-12, abs=1e-15)
            assert t.overall[m] == pytest.approx(mf.overall, rel=1e-12)
            assert t.difference[m] == pytest.approx(mf.difference(), rel=1e-9)
            assert t.difference_to_overall[m] == pytest.approx(
                mf.difference(method="to_overall"), rel=1e-9
            )
            assert t.ratio[m] == pytest.approx(mf.ratio(), rel=1e-9)
            assert t.group_min[m] == pytest.approx(mf.group_min(), rel=1e-12)
            assert t.group_max[m] == pytest.approx(mf.group_max(), rel=1e-12)
        sizes = sf.value_counts()
        for key, n in sizes.items():
            label = JOIN.join(key) if isinstance(key, tuple) else key
            assert t.size_of(label) == n


def _fairlearn_resamples(n: int, n_boot: int, random_state: int) -> np.ndarray:
    """The row indices MetricFrame(n_boot, random_state) resamples with: one uint32 seed per
    resample from default_rng(random_state), then DataFrame.sample(frac=1, replace=True),
    which draws RandomState(seed).choice(n, n, replace=True)."""
    seeds = np.random.default_rng(random_state).integers(
        0, np.iinfo(np.uint32).max, size=n_boot, dtype=np.uint32
    )
    return np.stack([np.random.RandomState(s).choice(n, size=n, replace=True) for s in seeds])


def test_bootstrap_on_fairlearns_own_resamples_reproduces_its_intervals(population):
    users, per_user = population
    q, n_boot, seed = [0.025, 0.975], 40, 11
    mf = MetricFrame(
        metrics={m: _mean_of_values for m in per_user},
        y_true=np.zeros(len(users)),
        y_pred=np.zeros(len(users)),
        sensitive_features=users["gender"],
        n_boot=n_boot,
        ci_quantiles=q,
        random_state=seed,
        sample_params={m: {"values": v} for m, v in per_user.items()},
    )

    codes, labels = group_codes(users[["gender"]])
    values = np.stack(list(per_user.values()))
    idx = _fairlearn_resamples(len(users), n_boot, seed)
    means = group_means_of_resamples(values=values, codes=codes, n_groups=len(labels), idx=idx)
    overall = values[:, idx].mean(axis=2).T
    ci = summarise_resamples(means, overall, tuple(q))
    for qi in range(2):
        theirs = mf.by_group_ci[qi]
        for j, m in enumerate(per_user):
            for gi, g in enumerate(labels):
                assert ci.by_group[qi, j, gi] == pytest.approx(theirs.loc[g, m], rel=1e-9)
            assert ci.difference[qi, j] == pytest.approx(mf.difference_ci()[qi][m], rel=1e-9)
            assert ci.ratio[qi, j] == pytest.approx(mf.ratio_ci()[qi][m], rel=1e-9)
            assert ci.overall[qi, j] == pytest.approx(mf.overall_ci[qi][m], rel=1e-9)


def test_bootstrap_with_its_own_randomness_agrees_with_metricframe(population):
    """Independent resamples: the ends of two intervals differ only by Monte-Carlo noise,
    about 8% of the interval's width (sd) at 150 resamples; 30% is a ~4 sd margin."""
    users, per_user = population
    q, n_boot = (0.025, 0.975), 150
    v = per_user["ndcg@10"]
    mf = MetricFrame(
        metrics=_mean,
        y_true=v,
        y_pred=v,
        sensitive_features=users["gender"],
        n_boot=n_boot,
        ci_quantiles=list(q),
        random_state=0,
    )
    codes, labels = group_codes(users[["gender"]])
    ci = bootstrap_group_means(
        values=v[None, :],
        codes={"gender": codes},
        n_groups={"gender": len(labels)},
        n_boot=n_boot,
        quantiles=q,
        seed=123,
    )["gender"]
    for gi, g in enumerate(labels):
        lo, hi = mf.by_group_ci[0][g], mf.by_group_ci[1][g]
        tol = 0.3 * (hi - lo)
        assert ci.by_group[0, 0, gi] == pytest.approx(lo, abs=tol)
        assert ci.by_group[1, 0, gi] == pytest.approx(hi, abs=tol)
        assert lo < mf.by_group[g] < hi


def test_disaggregate_intervals_bracket_the_point_estimates(population):
    users, per_user = population
    t = disaggregate(per_user=per_user, users=users, groupings={"gender": ("gender",)}, n_boot=100)[
        "gender"
    ]
    for m in per_user:
        for g in t.groups:
            assert t.ci_low[m][g] <= t.by_group[m][g] <= t.ci_high[m][g]
        lo, hi = t.difference_ci[m]
        assert lo <= hi


def test_group_missing_from_a_resample_is_nan_not_zero():
    values = np.array([[1.0, 2.0, 3.0]])
    codes = np.array([0, 0, 1])
    idx = np.array([[0, 1, 1], [2, 2, 0]])
    means = group_means_of_resamples(values=values, codes=codes, n_groups=2, idx=idx)
    assert means[0, 0, 0] == pytest.approx(5 / 3)
    assert np.isnan(means[0, 0, 1])
    np.testing.assert_allclose(means[1, 0], [1.0, 3.0])
