"""A/A canaries with the configuration production runs (canary.aa): a 10% canary, CUPED on,
τ 0.02, the always-valid test over many looks, and the whole `online_decision`.

The canary is production's twin, so the always-valid test may reject in at most alpha of
the runs, and so may the verdict roll back. Each assertion allows alpha plus a one-sided
binomial margin for the number of runs (`max_count_under`: a true rate of alpha exceeds it
with probability 0.001), on fixed seeds, so the outcome is the same on every machine.
`python -m canary.aa` prints the same rates for the results page.
"""

import os
from dataclasses import replace

import pytest

from canary.aa import AAConfig, clopper_pearson, max_count_under, run_aa
from canary.pipeline import RetrainConfig
from canary.verdict import OnlineGates

pytestmark = pytest.mark.slow

STATS_RUNS = 800  # the statistics alone: cheap per run
VERDICT_RUNS = 200  # the whole verdict: a look can run the fairness bootstrap


@pytest.fixture(scope="module")
def statistics():
    return run_aa(AAConfig(runs=STATS_RUNS, seed=0), verdict=False)


@pytest.fixture(scope="module")
def verdicts():
    # Each run looks until the horizon the margin needs; the runs' seeds are their own, so
    # sharing them over the cores gives the same result.
    return run_aa(AAConfig(runs=VERDICT_RUNS, seed=1), jobs=min(2, os.cpu_count() or 1))


def _bound(res, count: int, n: int | None = None) -> str:
    n = res.runs if n is None else n
    lo, hi = clopper_pearson(count, n)
    return f"{count}/{n} = {count / n:.3f} (95% CI {lo:.3f}-{hi:.3f}); outcomes {res.outcomes}"


def test_the_simulation_runs_what_production_runs():
    cfg = AAConfig()
    assert cfg.gates == OnlineGates()  # every gate at its shipped default
    assert cfg.canary_percent == RetrainConfig().canary_percent == 10
    assert cfg.gates.cuped and cfg.gates.tau == 0.02 and cfg.gates.alpha == 0.05
    assert cfg.canary_ctr_factor == 1.0  # A/A


def test_the_always_valid_test_keeps_its_type1_error_over_every_look(statistics):
    alpha, n = statistics.alpha, statistics.runs
    limit = max_count_under(alpha, n)
    # Many looks: the horizon is reached after a dozen or more, and the p-value is the
    # running minimum over all of them.
    assert statistics.fixed_runs == n
    assert statistics.sequential_rejected <= limit, _bound(
        statistics, statistics.sequential_rejected
    )
    assert statistics.cs_excluded_zero <= limit, _bound(statistics, statistics.cs_excluded_zero)


def test_the_fixed_horizon_test_at_the_horizon_is_calibrated(statistics):
    """The delta method with CUPED, looked at once: its rejections sit near alpha on both
    sides (a variance too small would reject more, one too large far less)."""
    alpha, n = statistics.alpha, statistics.fixed_runs
    assert statistics.fixed_rejected <= max_count_under(alpha, n), _bound(
        statistics, statistics.fixed_rejected, n
    )
    low = n - max_count_under(1 - alpha, n)  # the same margin below alpha
    assert statistics.fixed_rejected >= low, _bound(statistics, statistics.fixed_rejected, n)


def test_the_harness_sees_a_real_loss():
    """Not a test that cannot fail: a canary whose users click 30% less is found."""
    cfg = AAConfig(runs=40, seed=2, canary_ctr_factor=0.7)
    res = run_aa(cfg, verdict=False)
    assert res.sequential_rejected >= 36, _bound(res, res.sequential_rejected)
    worse = run_aa(replace(cfg, runs=10))
    assert worse.outcomes.get("rollback: sequential", 0) >= 8, worse.outcomes


@pytest.mark.timeout(1800)  # the verdicts fixture: many looks per run on a shared machine
def test_the_verdict_rarely_promotes_a_twin_as_a_winner(verdicts):
    limit = max_count_under(verdicts.alpha, verdicts.runs)
    assert verdicts.false_promote <= limit, _bound(verdicts, verdicts.false_promote)
    # An inconclusive twin at the horizon is held (continue), not decided: not counted here.


@pytest.mark.timeout(1800)
def test_the_verdict_rolls_back_a_twin_at_most_alpha_of_the_time(verdicts):
    """Every rule that can roll back, over every look: fairness, the error guardrail and
    non-inferiority at the horizon included."""
    limit = max_count_under(verdicts.alpha, verdicts.runs)
    assert verdicts.false_rollback <= limit, _bound(verdicts, verdicts.false_rollback)


def test_an_unfair_canary_as_good_overall_is_rolled_back_for_fairness():
    """One gender's CTR halved, the others raised so the mean CTR is production's: the CTR
    test cannot see it, the fairness guardrail must."""
    res = run_aa(AAConfig(runs=10, seed=3, canary_group_factor=("gender", 1, 0.5)))
    assert res.outcomes.get("rollback: fairness_gender", 0) >= 8, res.outcomes


def test_an_error_spiking_canary_is_rolled_back_at_an_early_look():
    res = run_aa(AAConfig(runs=10, seed=4, canary_error_rate=0.2))
    assert res.outcomes == {"rollback: error_rate": 10}, res.outcomes
    assert res.mean_decision_look <= 2, res.mean_decision_look


def test_runs_are_deterministic_for_their_seed():
    cfg = AAConfig(runs=3, seed=5)
    assert run_aa(cfg).to_dict() == run_aa(cfg).to_dict()
