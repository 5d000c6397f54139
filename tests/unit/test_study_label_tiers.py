"""`northstar simulate tiers` end to end on the tiny world: a simulated log on one clock,
the join at a cut that leaves the newest window pending, one retrain per schedule."""

from __future__ import annotations

import json

import pytest

from studies.label_tiers import ARMS, TiersStudyConfig, run_study, table

pytestmark = pytest.mark.slow


def test_each_schedule_learns_from_its_own_positives(tmp_path):
    cfg = TiersStudyConfig(
        dir=str(tmp_path),
        preset="tiny",
        train_epochs=1,
        users=100,
        requests=400,
        epochs=1,
        eval_users=40,
    )
    result = run_study(cfg)
    arms = result["arms"]
    assert list(arms) == list(ARMS)
    assert result["join"]["final"] > 0 and result["join"]["pending"] > 0
    final, weak, strong = (arms[a]["positives"] for a in ("final", "weak", "strong"))
    assert arms["no feedback"]["positives"] == {}
    assert final["not_final"] == 0 and strong["not_final"] == 0
    assert weak["not_final"] > 0 and weak["positives"] > final["positives"]  # the open window
    assert strong["weak"] == 0 and strong["positives"] == final["strong"]
    assert arms["final, weighted"]["positives"] == final  # same rows, other weights
    for arm in arms.values():
        assert 0.0 < arm["true_relevance@10"] <= arm["oracle_relevance@10"]
        assert arm["ndcg@10"] is not None
    assert json.loads((tmp_path / "tiers.json").read_text())["arms"].keys() == arms.keys()
    assert "| weak |" in table(result)
