"""North-star metric functions against hand-computed values."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from feedback.metrics import (
    compute_metrics,
    ctr,
    format_metrics,
    mean_interval,
    north_star_table,
    wilson_interval,
    write_metrics,
    z_value,
)

Z = 1.959963984540054


def test_z_value():
    assert z_value(confidence=0.95) == pytest.approx(Z)
    assert z_value(confidence=0.9) == pytest.approx(1.6448536)
    with pytest.raises(ValueError):
        z_value(confidence=1.0)


def test_wilson_by_hand():
    # 5 of 10: p = 0.5, z² = 3.841459, denominator 1 + z²/n = 1.3841459
    # centre = (0.5 + z²/20) / 1.3841459 = 0.5
    # half = z / 1.3841459 * sqrt(0.25/10 + z²/400) = 1.416010 * 0.186020 = 0.263407
    low, high = wilson_interval(successes=np.array([5, 0, 10, 0]), trials=np.array([10, 10, 10, 0]))
    np.testing.assert_allclose(low[:3], [0.236593, 0.0, 0.722467], atol=1e-6)
    np.testing.assert_allclose(high[:3], [0.763407, 0.277533, 1.0], atol=1e-6)
    assert (low[3], high[3]) == (0.0, 1.0)  # no trials: anything is possible
    with pytest.raises(ValueError):
        wilson_interval(successes=np.array([3]), trials=np.array([2]))


def test_ctr_by_hand():
    np.testing.assert_allclose(
        ctr(clicks=np.array([1, 0]), impressions=np.array([4, 0])), [0.25, np.nan]
    )


def test_mean_interval_by_hand():
    # values 0, 0, 3, 5: total 8, sum of squares 34, n 4 -> mean 2
    # s² = (34 - 4 * 2²) / 3 = 6; half = z * sqrt(6 / 4) = 2.400456
    mean, low, high = mean_interval(
        total=np.array([8.0, 7.0]), total_sq=np.array([34.0, 49.0]), n=np.array([4, 1])
    )
    np.testing.assert_allclose([mean[0], low[0], high[0]], [2.0, -0.400456, 4.400456], atol=1e-6)
    assert mean[1] == 7.0 and math.isnan(low[1])  # one value: no variance estimate


def _labels():
    # version 1: 4 impressions, 2 clicks, values 0, 60, 0, 30; version 2: 2 impressions, 1 click
    return pd.DataFrame(
        {
            "user_id": [1, 2, 3, 1, 2, 3],
            "model_version": [1, 1, 1, 1, 2, 2],
            "date": [
                "2025-06-15",
                "2025-06-15",
                "2025-06-16",
                "2025-06-16",
                "2025-06-15",
                "2025-06-15",
            ],
            "clicked": [False, True, False, True, True, False],
            "value": [0.0, 60.0, 0.0, 30.0, 10.0, 0.0],
            "impression_ts": [1.75e9] * 6,
        }
    )


def test_north_star_table_groups_and_applies_the_formulas():
    t = north_star_table(_labels(), by=["model_version"]).set_index("model_version")
    assert t.loc[1, "impressions"] == 4 and t.loc[1, "clicks"] == 2
    assert t.loc[1, "ctr"] == 0.5 and t.loc[2, "ctr"] == 0.5
    assert t.loc[1, "value_per_impression"] == 22.5
    low, high = wilson_interval(successes=np.array([2]), trials=np.array([4]))
    assert (t.loc[1, "ctr_low"], t.loc[1, "ctr_high"]) == (low[0], high[0])
    # values 0, 60, 0, 30: s² = (4500 - 4 * 22.5²) / 3 = 825
    half = Z * math.sqrt(825 / 4)
    assert t.loc[1, "value_low"] == pytest.approx(22.5 - half)


def test_report_by_version_day_and_user_group(tmp_path):
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "gender": ["F", "M"],
            "age_bucket": ["18-24"] * 2,
            "activity": ["low", "high"],
        }
    )
    rep = compute_metrics(_labels(), users=users)
    by_day = {(r["model_version"], r["date"]): r["impressions"] for r in rep["by_version_day"]}
    assert by_day == {(1, "2025-06-15"): 2, (1, "2025-06-16"): 2, (2, "2025-06-15"): 2}
    gender = {
        (r["model_version"], r["gender"]): (r["impressions"], r["clicks"])
        for r in rep["by_version_group"]["gender"]
    }
    # user 3 is not in the users table: "unknown", never dropped
    assert gender == {
        (1, "F"): (2, 1),
        (1, "M"): (1, 1),
        (1, "unknown"): (1, 0),
        (2, "M"): (1, 1),
        (2, "unknown"): (1, 0),
    }
    path = write_metrics(rep, tmp_path / "m.json")
    assert json.loads(path.read_text())["by_version"][0]["clicks"] == 2  # valid JSON, no NaN
    assert "north star by model version" in format_metrics(rep)
