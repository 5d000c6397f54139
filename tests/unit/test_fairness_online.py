"""Online audit: CTR and value per group and model version from a plain feedback table."""

import json

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame

from fairness.online import online_by_group

USERS = pd.DataFrame(
    {
        "user_id": [1, 2, 3],
        "gender": ["F", "M", "M"],
        "age_bucket": ["18-24", "18-24", "55+"],
        "activity": ["low"] * 3,
    }
)


def _feedback():
    # version 1: F 1 click of 2, M (users 2, 3) 1 of 4; version 2: F 2 of 2, M 0 of 2.
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3, 3, 1, 1, 2, 3, 9],
            "model_version": [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2],
            "clicked": [1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1],
            "value": [60.0, 0, 0, 30, 0, 0, 10, 20, 0, 0, 5],
        }
    )


def test_ctr_and_value_by_group_and_version_by_hand():
    out = online_by_group(feedback=_feedback(), users=USERS)
    g = out["attributes"]["gender"]
    assert g["by_group"]["1"]["F"] == {"ctr": 0.5, "value": 30.0, "impressions": 2}
    assert g["by_group"]["1"]["M"]["ctr"] == pytest.approx(0.25)
    assert g["by_group"]["2"]["F"]["ctr"] == 1.0
    assert g["by_group"]["2"]["M"]["value"] == 0.0
    # user 9 is not in the users table: grouped as "unknown", and only in version 2.
    assert g["by_group"]["2"]["unknown"] == {"ctr": 1.0, "value": 5.0, "impressions": 1}
    assert "unknown" not in g["by_group"]["1"]
    assert g["difference"]["1"]["ctr"] == pytest.approx(0.25)
    assert g["difference"]["2"]["ctr"] == pytest.approx(1.0)
    assert g["group_min"]["2"]["ctr"] == 0.0
    assert out["overall"]["2"] == {"impressions": 5, "ctr": 0.6, "value": 7.0, "users": 4}
    assert set(out["attributes"]["activity"]["by_group"]["1"]) == {"low"}
    # Without user 9, activity has a single value: nothing to compare, so it is left out.
    known = online_by_group(feedback=_feedback().query("user_id != 9"), users=USERS)
    assert "activity" not in known["attributes"]


def test_matches_fairlearn_called_directly_per_version():
    fb = _feedback()
    out = online_by_group(feedback=fb, users=USERS, attributes=("age_bucket",))
    ages = fb["user_id"].map(USERS.set_index("user_id")["age_bucket"]).fillna("unknown")
    for version, rows in fb.groupby("model_version"):
        mf = MetricFrame(
            metrics=lambda y, p: float(np.mean(y)),
            y_true=rows["clicked"],
            y_pred=rows["clicked"],
            sensitive_features=ages[rows.index],
        )
        got = out["attributes"]["age_bucket"]
        for grp, ctr in mf.by_group.items():
            assert got["by_group"][str(version)][grp]["ctr"] == pytest.approx(ctr)
        assert got["difference"][str(version)]["ctr"] == pytest.approx(mf.difference())
        assert got["ratio"][str(version)]["ctr"] == pytest.approx(mf.ratio())


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="clicked"):
        online_by_group(feedback=_feedback().drop(columns=["clicked"]), users=USERS)


def test_online_section_in_the_report(tmp_path):
    from fairness.audit import AuditConfig, audit
    from fairness.inputs import AuditInput
    from fairness.report import write_report

    inp = AuditInput(
        user_ids=np.array([1, 2, 3]),
        ranked=np.array([[10, 20], [20, 10], [10, 20]]),
        relevant=pd.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 10, 20]}),
        users=USERS,
        items=pd.DataFrame({"item_id": [10, 20], "provider": ["p", "q"]}),
        popularity=pd.Series({10: 2, 20: 1}),
    )
    result = audit(inp, AuditConfig(k=2, n_boot=0, attributes=("gender",), intersections=()))
    online = online_by_group(feedback=_feedback(), users=USERS)
    paths = write_report(tmp_path, result, online=online)
    page = paths["html"].read_text()
    assert "Online: CTR and value" in page and "v2 CTR" in page
    body = json.loads(paths["audit"].read_text())
    assert body["online"]["attributes"]["gender"]["by_group"]["1"]["F"]["ctr"] == 0.5
