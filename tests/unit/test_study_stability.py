"""`northstar stability-study` on the tiny world: a strong stability term keeps a warm
retrain's top 10 closer to production's than no term, and the table reports both."""

from __future__ import annotations

import pytest

from studies.stability_study import StabilityStudyConfig, run_study, table

pytestmark = pytest.mark.slow


def test_a_strong_term_lowers_churn(tmp_path):
    cfg = StabilityStudyConfig(
        dir=str(tmp_path),
        preset="tiny",
        train_epochs=1,
        users=100,
        requests=400,
        epochs=2,
        weights=(0.0, 20.0),
    )
    result = run_study(cfg)
    off, on = result["arms"]
    assert (off["stability_weight"], on["stability_weight"]) == (0.0, 20.0)
    assert result["positives"]["positives"] > 0
    assert on["churn"] < off["churn"], result["arms"]
    assert "| 20 |" in table(result)
