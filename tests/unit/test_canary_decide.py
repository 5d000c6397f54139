"""canary.decide: the offline gates and the online verdict, on hand-made numbers."""

from dataclasses import replace

from canary.decide import (
    CONTINUE,
    PASS,
    PROMOTE,
    REJECT,
    ROLLBACK,
    Arm,
    Guardrail,
    OfflineGates,
    OnlineEvidence,
    OnlineGates,
    offline_decision,
    online_decision,
)
from canary.stats import msprt, srm_chi2, two_proportion_z

GOOD = {"ndcg@10": 0.20}
PROD = {"ndcg@10": 0.20}
TOPPOP = {"ndcg@10": 0.09}
BIAS = {"arp": 40.0, "exposure_gini": 0.50}


def _offline(**kw):
    args = dict(
        candidate=GOOD,
        production=PROD,
        toppop=TOPPOP,
        overlap=0.6,
        bias=BIAS,
        production_bias=BIAS,
        bias_history=[{"arp": 40.0}],
        fairness_passed=True,
        fairness_reasons=[],
        gates=OfflineGates(),
    )
    return offline_decision(**{**args, **kw})


def test_offline_pass():
    v = _offline()
    assert v.action == PASS and not v.failures
    assert {c.name for c in v.checks} >= {"metric_vs_production", "topk_overlap", "bias_trend"}


def test_offline_rejects_a_popularity_only_model():
    v = _offline(candidate={"ndcg@10": 0.088}, overlap=0.2, bias={"arp": 80, "exposure_gini": 0.9})
    assert v.action == REJECT
    failed = {c.name for c in v.failures}
    assert failed == {
        "metric_vs_production",
        "lift_over_toppop",
        "topk_overlap",
        "arp_ratio",
        "gini_increase",
    }
    assert any("0.0880 vs production 0.2000" in r for r in v.reasons)


def test_offline_bias_trend_stops_an_amplifying_loop():
    # each step +12% (passes max_arp_ratio 1.25), three rising versions: +25.4% > 25%
    hist = [{"arp": 40.0}, {"arp": 44.8}]
    v = _offline(
        bias={"arp": 50.18, "exposure_gini": 0.5},
        production_bias={"arp": 44.8, "exposure_gini": 0.5},
        bias_history=hist,
    )
    assert v.action == REJECT
    assert [c.name for c in v.failures] == ["bias_trend"]
    assert "amplifies popularity bias" in v.reasons[0]
    # not rising at every version: no trend failure
    v = _offline(
        bias={"arp": 50.18, "exposure_gini": 0.5},
        production_bias={"arp": 44.8, "exposure_gini": 0.5},
        bias_history=[{"arp": 46.0}, {"arp": 44.8}],
    )
    assert v.action == PASS


def test_offline_fairness_failure_is_reported():
    v = _offline(fairness_passed=False, fairness_reasons=["gender gap 0.09 above max 0.05"])
    assert v.action == REJECT and "gender gap 0.09" in v.reasons[0]


def _ev(cp=(150, 1000, 100), cc=(150, 1000, 100), prev_p=1.0, pct=50, **kw):
    a = Arm(1, cp[1], cp[0], cp[2])
    b = Arm(2, cc[1], cc[0], cc[2])
    z = two_proportion_z(clicks_a=a.clicks, n_a=a.impressions, clicks_b=b.clicks, n_b=b.impressions)
    seq = msprt(diff=z.diff, var=z.se**2, tau2=0.02**2, previous_p=prev_p)
    srm = srm_chi2(observed=[a.users, b.users], shares=[100 - pct, pct])
    return OnlineEvidence(a, b, z, seq, srm, **kw)


GATES = OnlineGates(min_impressions=500, max_impressions=5000)


def test_online_waits_for_the_minimum_sample():
    v = online_decision(_ev(cp=(30, 200, 50), cc=(30, 200, 50)), GATES)
    assert v.action == CONTINUE and "waiting for sample" in v.reasons[0]


def test_online_promotes_a_clear_winner_and_rolls_back_a_loser():
    win = online_decision(_ev(cp=(150, 2000, 100), cc=(300, 2000, 100)), GATES)
    assert win.action == PROMOTE and "canary wins" in win.reasons[0]
    lose = online_decision(_ev(cp=(300, 2000, 100), cc=(150, 2000, 100)), GATES)
    assert lose.action == ROLLBACK and "canary loses" in lose.reasons[0]
    same = online_decision(_ev(cp=(300, 2000, 100), cc=(298, 2000, 100)), GATES)
    assert same.action == CONTINUE


def test_online_horizon_decides_by_non_inferiority():
    gates = replace(GATES, max_impressions=2000, noninferiority_margin=0.03)
    v = online_decision(_ev(cp=(300, 2000, 100), cc=(290, 2000, 100)), gates)
    assert v.action == PROMOTE and "non-inferior" in v.reasons[0]
    v = online_decision(
        _ev(cp=(300, 2000, 100), cc=(290, 2000, 100)), replace(gates, noninferiority_margin=0.01)
    )
    assert v.action == ROLLBACK and "not shown non-inferior" in v.reasons[0]


def test_online_guardrails_roll_back_before_any_sample():
    ev = _ev(
        cp=(1, 10, 5),
        cc=(1, 10, 5),
        guard_production=Guardrail(1000, 0, 20.0),
        guard_canary=Guardrail(100, 5, 21.0),
    )
    v = online_decision(ev, GATES)
    assert v.action == ROLLBACK and "error rate 0.0500" in v.reasons[0]
    ev = _ev(
        cp=(1, 10, 5),
        cc=(1, 10, 5),
        guard_production=Guardrail(1000, 0, 20.0),
        guard_canary=Guardrail(100, 0, 80.0),
    )
    assert online_decision(ev, GATES).action == CONTINUE  # 100 requests: too few for a p99
    ev = replace(ev, guard_canary=Guardrail(400, 0, 80.0))
    v = online_decision(ev, GATES)
    assert v.action == ROLLBACK and "p99 80.0 ms" in v.reasons[0]
    ok = _ev(
        cp=(1, 10, 5),
        cc=(1, 10, 5),
        guard_production=Guardrail(1000, 0, 20.0),
        guard_canary=Guardrail(400, 0, 40.0),  # under max(1.5 x 20, 20 + 25) = 45 ms
    )
    assert online_decision(ok, GATES).action == CONTINUE


def test_online_sample_ratio_mismatch_rolls_back():
    v = online_decision(_ev(cp=(150, 2000, 300), cc=(300, 2000, 100)), GATES)
    assert v.action == ROLLBACK and "users per arm [300, 100]" in v.reasons[0]
    # the same counts match a 25% canary
    assert (
        online_decision(_ev(cp=(150, 2000, 300), cc=(150, 2000, 100), pct=25), GATES).action
        == CONTINUE
    )


def test_online_fairness_drop_rolls_back():
    ev = _ev(
        cp=(300, 2000, 100),
        cc=(298, 2000, 100),
        fairness={"gender": {"production": 0.9, "canary": 0.6}},
    )
    v = online_decision(ev, GATES)
    assert v.action == ROLLBACK and "online fairness" in v.reasons[0]
    ev = replace(ev, fairness={"gender": {"production": 0.9, "canary": 0.8}})
    assert online_decision(ev, GATES).action == CONTINUE


def test_online_a_winner_that_hurts_a_group_is_rolled_back_and_a_loser_lists_both():
    unfair = {"gender": {"production": 0.9, "canary": 0.5}}
    win = online_decision(_ev(cp=(150, 2000, 100), cc=(300, 2000, 100), fairness=unfair), GATES)
    assert win.action == ROLLBACK and win.reasons[0].startswith("online fairness")
    lose = online_decision(_ev(cp=(300, 2000, 100), cc=(150, 2000, 100), fairness=unfair), GATES)
    assert lose.action == ROLLBACK and len(lose.reasons) == 2
    assert lose.reasons[0].startswith("canary loses") and "gender" in lose.reasons[1]
