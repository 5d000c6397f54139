"""canary.decide: the offline gates, on hand-made numbers (the online verdict:
tests/unit/test_canary_verdict.py)."""

from canary.decide import PASS, REJECT, OfflineGates, offline_decision

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
