"""Diagnosis of a north-star drop: the decomposition, SNIPS, configs, alerts, and each
planted fault found as the top cause (real joins over a generated log, no hard-coding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from common.config import ConfigError, load
from diagnose.causes import slotted_snips, snips
from diagnose.config import DiagnoseConfig, parse_window
from diagnose.decompose import shift_share
from diagnose.suite import diagnose_planted

ROOT = Path(__file__).resolve().parents[2]
SIZE = {"n_users": 3000, "ref_requests": 5000, "cur_requests": 3500}


def test_shift_share_adds_up_and_separates_mix_from_within():
    ref = pd.DataFrame(
        {"g": ["a"] * 50 + ["b"] * 50, "clicked": [1] * 25 + [0] * 25 + [1] * 5 + [0] * 45}
    )
    # same per-segment rates, more of the worse segment: all mix
    cur = pd.DataFrame(
        {"g": ["a"] * 20 + ["b"] * 80, "clicked": [1] * 10 + [0] * 10 + [1] * 8 + [0] * 72}
    )
    t = shift_share(ref, cur, "g")
    drop = ref["clicked"].mean() - cur["clicked"].mean()
    assert t["total"].sum() == pytest.approx(drop)
    assert t["within"].sum() == pytest.approx(0.0)
    assert t["mix"].sum() == pytest.approx(drop)


def test_snips_is_the_weighted_mean():
    v, ess = snips(np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0]), np.array([0.5, 0.25, 1.0]))
    assert v == pytest.approx((2 * 1) / (2 + 4))
    assert ess == pytest.approx(36 / 20)
    v, _ = slotted_snips(np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.ones(2), np.array([0, 1]))
    assert v == pytest.approx(0.5)
    assert np.isnan(snips(np.ones(2), np.zeros(2), np.ones(2))[0])


def test_windows_and_config():
    t0, t1 = parse_window("2026-11-01:2026-11-07")
    assert t1 - t0 == 7 * 86_400
    cfg = load(
        DiagnoseConfig, None, ["labels=l", "out=o", "current=2026-11-01", "reference_weeks=2"]
    )
    (r0, r1), (c0, _) = cfg.windows()
    assert r1 == c0 and c0 - r0 == 14 * 86_400
    with pytest.raises(ValueError, match="window"):
        parse_window("11/01/2026")
    with pytest.raises(ConfigError, match="unknown"):
        load(DiagnoseConfig, None, ["labels=l", "out=o", "current=2026-11-01", "nope=1"])


def test_alert_rules_parse_and_use_existing_metrics():
    doc = yaml.safe_load((ROOT / "diagnose" / "alerts.yaml").read_text())
    rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    assert rules and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    text = " ".join(r["expr"] for r in rules)
    for metric in (
        "northstar_recommend_errors_total",
        "northstar_recommend_requests_total",
        "nv_inference_",
        "northstar_stream_oldest_unacked_age_seconds",
    ):
        assert metric in text
    from feedback.lag import lag_metrics
    from serving.metrics import ERRORS, REQUESTS

    assert ERRORS in text and REQUESTS in text
    assert "northstar_stream_oldest_unacked_age_seconds" in lag_metrics([])


# fault -> the cause id the diagnosis must rank first
PLANTED = {
    "mix_shift": "population_shift",
    "feature_skew": "feature_skew:age_bucket",
    "delayed_labels": "label_delay",
    "stale_catalogue": "stale_model",
    "worse_model": "model_regression",
}


def _diagnose(tmp_path: Path, fault: str, **kw):
    return diagnose_planted(fault, 3, tmp_path, SIZE, **kw)


@pytest.mark.parametrize("fault", sorted(PLANTED))
def test_planted_fault_is_the_top_cause(tmp_path, fault):
    result = _diagnose(tmp_path, fault)
    shares = {f.cause: round(f.share_of_drop, 3) for f in result.findings}
    print(fault, f"drop={result.summary['drop']:.4f}", shares)
    assert result.summary["drop"] > 0.02, shares
    top = result.findings[0]
    assert top.cause == PLANTED[fault], shares
    assert top.share_of_drop >= 0.4, shares
    # every other cause explains clearly less
    assert all(f.explained < 0.5 * top.explained for f in result.findings[1:]), shares
    assert result.plan and result.plan[0]["cause"] == top.cause
    assert result.summary["only_labels"] == (fault == "delayed_labels")


def test_no_fault_no_drop(tmp_path):
    result = _diagnose(tmp_path, "none")
    assert abs(result.summary["drop"]) < 0.02
    # a healthy run names no cause and plans nothing: the drop is within its noise
    assert not result.summary["significant"], result.summary["drop_test"]
    assert result.summary["top_cause"] is None and result.plan == []
    assert result.summary["headline"].startswith("No ")
