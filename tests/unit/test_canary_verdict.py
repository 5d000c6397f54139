"""canary.verdict and canary.guardrails: the online rules on user-level evidence and on
`recommend`'s per-version serving metrics."""

from dataclasses import replace

import numpy as np

from canary.decide import CONTINUE, PROMOTE, ROLLBACK
from canary.guardrails import GuardrailGates, check_guardrails
from canary.inference import ArmUsers, SequentialState, delta_test, sequential_update
from canary.stats import srm_chi2
from canary.verdict import (
    Arm,
    OnlineEvidence,
    OnlineGates,
    margin_resolved,
    online_decision,
)
from serving.metrics import LATENCY_BUCKETS_MS, VersionMetrics

BOUNDS = np.array([*LATENCY_BUCKETS_MS, np.inf], dtype=float)
GATES = OnlineGates(min_users=50, min_impressions=500, max_impressions=5000)


def _serving(requests=1000, errors=None, latency_ms=5.0, spread=1.0, seed=0):
    """VersionMetrics of `requests` users whose latencies are lognormal around latency_ms."""
    rng = np.random.default_rng(seed)
    lat = rng.lognormal(np.log(latency_ms), 0.2 * spread, requests)
    counts = np.bincount(np.searchsorted(BOUNDS, lat), minlength=len(BOUNDS))[: len(BOUNDS)]
    return VersionMetrics(requests, dict(errors or {}), BOUNDS, counts.astype(float))


def _arm_users(ctr, users, rng, imps=20):
    n = np.full(users, float(imps))
    p = rng.beta(ctr * 10, (1 - ctr) * 10, users)
    return ArmUsers(rng.binomial(imps, p).astype(float), n)


def _ev(ctr_a=0.15, ctr_b=0.15, users=(200, 200), pct=50, seed=1, state=None, **kw):
    rng = np.random.default_rng(seed)
    ua, ub = _arm_users(ctr_a, users[0], rng), _arm_users(ctr_b, users[1], rng)
    t = delta_test(ua, ub, cuped=False)
    seq = sequential_update(
        state or SequentialState(), diff=t.diff, var=t.var, tau2=0.02**2, alpha=0.05
    )
    arm = lambda v, u: Arm(v, int(u.n.sum()), int(u.y.sum()), u.users)  # noqa: E731
    srm = srm_chi2(observed=[ua.users, ub.users], shares=[100 - pct, pct])
    kw.setdefault("serving_production", _serving(seed=2))
    kw.setdefault("serving_canary", _serving(seed=3))
    return OnlineEvidence(arm(1, ua), arm(2, ub), t, seq, srm, **kw)


def test_promotes_a_clear_winner_and_rolls_back_a_loser():
    win = online_decision(_ev(0.10, 0.20), GATES)
    assert win.action == PROMOTE and win.reasons[0].startswith("canary wins")
    lose = online_decision(_ev(0.20, 0.10), GATES)
    assert lose.action == ROLLBACK and lose.reasons[0].startswith("canary loses")
    same = online_decision(_ev(0.15, 0.15), GATES)
    assert same.action == CONTINUE and same.reasons[0].startswith("no decision yet")


def test_waits_for_users_before_deciding_on_ctr():
    v = online_decision(_ev(0.15, 0.15, users=(40, 40)), GATES)
    assert v.action == CONTINUE and "waiting for sample" in v.reasons[0]


def test_an_old_significant_loss_is_not_read_as_a_win():
    lost = _ev(0.20, 0.10).sequential
    assert lost.direction == -1 and lost.significant(0.05)
    later = _ev(0.15, 0.16, state=lost)  # the gap closes and turns slightly positive
    v = online_decision(later, GATES)
    assert v.action == ROLLBACK and v.reasons[0].startswith("canary loses")


def test_horizon_decides_by_relative_non_inferiority():
    gates = replace(GATES, max_impressions=2000)
    # An always-valid interval is wider than a fixed one: 10% of a 0.15 CTR needs users.
    ev = _ev(0.15, 0.149, users=(8000, 8000), seed=4)
    v = online_decision(ev, gates)
    assert v.action == PROMOTE and "non-inferior" in v.reasons[0], v.reasons
    assert "10% of production" in v.reasons[0]
    # Not shown non-inferior is no evidence of harm: held, not rolled back (the old rule
    # rolled back every inconclusive canary, production's twin included).
    strict = online_decision(ev, replace(gates, noninferiority_margin=0.001))
    assert strict.action == CONTINUE and strict.reasons[0].startswith("hold, inconclusive")
    # Shown worse by more than the margin at the horizon's one look: rolled back.
    worse = _ev(0.15, 0.12, users=(8000, 8000), seed=4)
    worse = replace(worse, sequential=SequentialState(looks=1))  # not significant yet
    v = online_decision(worse, gates)
    assert v.action == ROLLBACK and v.reasons[0].startswith("canary inferior"), v.reasons


def test_missing_serving_metrics_is_cannot_decide_never_a_pass():
    v = online_decision(_ev(0.10, 0.20, serving_canary=None), GATES)
    assert v.action == CONTINUE and v.reasons[0].startswith("cannot decide")
    few = _ev(0.10, 0.20, serving_canary=_serving(requests=30))
    v = online_decision(few, GATES)
    assert v.action == CONTINUE and "guardrails need 100" in v.reasons[0]
    # a loser still rolls back without metrics: only a promote needs them
    assert online_decision(_ev(0.20, 0.10, serving_canary=None), GATES).action == ROLLBACK
    # an offline replay may opt out
    replay = replace(GATES, require_serving_metrics=False)
    assert online_decision(_ev(0.10, 0.20, serving_canary=None), replay).action == PROMOTE


def test_fallbacks_and_errors_roll_the_canary_back_before_any_sample():
    fb = _ev(users=(5, 5), serving_canary=_serving(requests=40, errors={"fallback": 40}))
    v = online_decision(fb, GATES)
    assert v.action == ROLLBACK and "fallback" in v.reasons[0], v.reasons
    failed = _ev(users=(5, 5), serving_canary=_serving(requests=200, errors={"failed": 5}))
    v = online_decision(failed, GATES)
    assert v.action == ROLLBACK and "not answered by the canary: 5/200" in v.reasons[0]
    assert "error rate 0.0250" in v.reasons[0]


def test_latency_needs_a_significant_and_large_regression():
    slow = _serving(latency_ms=20.0, seed=5)  # 4x production everywhere
    v = online_decision(_ev(serving_canary=slow), GATES)
    assert v.action == ROLLBACK and v.failures[0].name == "latency", v.reasons
    # slower by 10%: significant with this many requests, but far under 1.5x the p99
    slight = _serving(latency_ms=5.5, seed=6)
    g = check_guardrails(slight, _serving(seed=2), GuardrailGates())
    assert not g.failed and g.decidable
    # a noisy tail alone (same median) is not a regression
    noisy = _serving(latency_ms=5.0, spread=2.0, requests=400, seed=7)
    assert not check_guardrails(noisy, _serving(seed=2), GuardrailGates()).failed


def test_sample_ratio_mismatch_on_users_rolls_back():
    v = online_decision(_ev(users=(300, 100)), GATES)
    assert v.action == ROLLBACK and "users per arm [300, 100]" in v.reasons[0]
    assert online_decision(_ev(users=(300, 100), pct=25), GATES).action != ROLLBACK


def test_a_winner_that_hurts_a_group_is_rolled_back_and_a_loser_lists_both():
    unfair = {"gender": {"production": 0.9, "canary": 0.5}}
    win = online_decision(_ev(0.10, 0.20, fairness=unfair), GATES)
    assert win.action == ROLLBACK and win.reasons[0].startswith("online fairness")
    lose = online_decision(_ev(0.20, 0.10, fairness=unfair), GATES)
    assert lose.action == ROLLBACK and len(lose.reasons) == 2
    assert lose.reasons[0].startswith("canary loses") and "gender" in lose.reasons[1]
    fair = {"gender": {"production": 0.9, "canary": 0.8}}
    assert online_decision(_ev(0.15, 0.15, fairness=fair), GATES).action == CONTINUE


def test_a_group_gap_within_its_noise_does_not_roll_a_winner_back():
    # The same point drop as above, but the user-clustered interval reaches above 0.
    noisy = {"gender": {"production": 0.9, "canary": 0.5, "diff_upper": 0.05}}
    win = online_decision(_ev(0.10, 0.20, fairness=noisy), GATES)
    assert win.action != ROLLBACK
    assert any("not significant" in c.reason for c in win.checks)
    # Below 0 but not below minus the margin: not credibly worse by more than the margin
    # (the old rule rolled this back; a twin's noisy ratio crossed 0 that way).
    near = {"gender": {"production": 0.9, "canary": 0.5, "diff_upper": -0.1}}
    assert online_decision(_ev(0.10, 0.20, fairness=near), GATES).action != ROLLBACK
    real = {"gender": {"production": 0.9, "canary": 0.5, "diff_upper": -0.25}}
    assert online_decision(_ev(0.10, 0.20, fairness=real), GATES).action == ROLLBACK


def test_evidence_serialises_with_per_user_sizes_and_serving_metrics():
    d = _ev(0.10, 0.20).to_dict()
    assert d["ctr_test"]["users_a"] == 200 and d["ctr_test"]["design_effect"] > 1
    assert d["sequential"]["looks"] == 1 and d["serving"]["canary"]["requests"] == 1000


def test_one_early_error_is_not_a_broken_canary():
    # One error in the canary's first 90 users is above 1%, but production fails as often.
    early = _serving(requests=90, errors={"failed": 1}, seed=3)
    prod = _serving(requests=900, errors={"failed": 1}, seed=2)
    g = check_guardrails(early, prod, GuardrailGates())
    assert not g.failed, [c.reason for c in g.checks]
    # the same rate as production above the limit is production's problem, not the canary's
    both = check_guardrails(
        _serving(requests=500, errors={"failed": 10}, seed=3),
        _serving(requests=4500, errors={"failed": 90}, seed=2),
        GuardrailGates(),
    )
    assert not both.failed, [c.reason for c in both.checks]


def test_a_canary_failing_a_fifth_of_its_requests_is_rolled_back_at_the_first_look():
    broken = _serving(requests=90, errors={"failed": 18}, seed=3)
    prod = _serving(requests=900, errors={"failed": 1}, seed=2)
    v = online_decision(_ev(users=(5, 5), serving_canary=broken, serving_production=prod), GATES)
    assert v.action == ROLLBACK and v.failures[0].name == "error_rate", v.reasons
    assert "always-valid p" in v.reasons[0]


def test_the_horizon_moves_out_when_the_margin_needs_more_impressions():
    # 6,000 impressions an arm are past max_impressions, but too few for a 10% margin.
    ev = _ev(0.15, 0.15, users=(300, 300), seed=8)
    v = online_decision(ev, GATES)
    cap = int(GATES.max_horizon_factor * GATES.max_impressions)
    assert v.action == CONTINUE and f"horizon extended (up to {cap}" in v.reasons[0], v.reasons
    margin = GATES.noninferiority_margin * ev.test.rate_a
    assert not margin_resolved(ev.test.se, margin, GATES)
    assert margin_resolved(margin / 10, margin, GATES)
