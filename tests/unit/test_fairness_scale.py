"""The audit core at production scale (100k users). Timing is printed, never asserted
(performance is measured in a benchmark, not asserted in a test); `python -m fairness.bench` is the
benchmark. This test makes sure the path works at that size: memory, dtypes, no O(N^2)."""

import time

import pytest

from fairness.audit import AuditConfig, audit
from fairness.bench import synthetic_input
from fairness.gates import GateConfig, check_gates


@pytest.mark.slow
def test_audit_of_100k_users():
    inp = synthetic_input(100_000, 10_000)
    t0 = time.perf_counter()
    res = audit(inp, AuditConfig(n_boot=200))
    print(
        f"audit core, 100k users, n_boot=200: {time.perf_counter() - t0:.1f}s {res.meta['timings']}"
    )
    assert res.meta["n_users"] == 100_000
    g = res.users["gender"]
    # The bench plants fewer relevant items in X's lists: the gate must name X.
    assert g.by_group["ndcg@10"]["X"] < 0.4 * g.by_group["ndcg@10"]["F"]
    verdict = check_gates(res, GateConfig(max_exposure_gini=None))
    assert "gender=X" in verdict.to_dict()["failed_groups"]
    for m in g.metrics:
        for grp in g.groups:
            assert g.ci_low[m][grp] <= g.by_group[m][grp] <= g.ci_high[m][grp]
