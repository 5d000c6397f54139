"""The online half of the audit: CTR and value per user group and model version.

Input is the labelled feedback as a plain DataFrame, one row per impression:
    user_id, model_version, clicked (0/1), value (watch seconds, rating, ...; 0 if none)
`feedback/` produces it; anything else with those columns works too. Rates are per
impression (the north-star definition), so heavy users weigh more than light ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

from fairness.inputs import user_attributes

FEEDBACK_COLUMNS = ("user_id", "model_version", "clicked", "value")
VERSION = "model_version"


def _ctr(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true))


def _value(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_pred))  # y_pred carries `value`: see online_by_group


def _impressions(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(len(y_true))


def online_by_group(
    *,
    feedback: pd.DataFrame,
    users: pd.DataFrame,
    attributes: tuple[str, ...] = ("gender", "age_bucket", "activity"),
) -> dict[str, Any]:
    """Per attribute: CTR and mean value by (model_version, group), and per version the
    between-group difference, ratio and minimum, all from one MetricFrame with the model
    version as a control feature. Users not in `users` are grouped as "unknown"."""
    missing = [c for c in FEEDBACK_COLUMNS if c not in feedback.columns]
    if missing:
        raise ValueError(
            f"online feedback: missing column(s) {missing}; expected {list(FEEDBACK_COLUMNS)}"
        )
    if len(feedback) == 0:
        raise ValueError("online feedback: no rows")
    fb = feedback.reset_index(drop=True)
    attrs = user_attributes(users=users, user_ids=fb["user_id"].to_numpy(np.int64))
    clicked = fb["clicked"].to_numpy(np.float64)
    value = fb["value"].to_numpy(np.float64)
    version = fb[VERSION].astype(str).rename(VERSION)
    out: dict[str, Any] = {
        "overall": {
            str(v): {
                "impressions": len(g),
                "ctr": float(g["clicked"].mean()),
                "value": float(g["value"].mean()),
                "users": int(g["user_id"].nunique()),
            }
            for v, g in fb.groupby(fb[VERSION].astype(str))
        },
        "attributes": {},
    }
    metrics = {"ctr": _ctr, "value": _value, "impressions": _impressions}
    for attr in attributes:
        if attr not in attrs.columns or attrs[attr].nunique() < 2:
            continue
        mf = MetricFrame(
            metrics=metrics,
            y_true=clicked,
            y_pred=value,
            sensitive_features=attrs[attr].rename(attr),
            control_features=version,
        )
        by_group: dict[str, dict[str, dict[str, float]]] = {}
        for (ver, grp), row in mf.by_group.iterrows():
            if np.isnan(row["impressions"]):  # a version that never reached this group
                continue
            by_group.setdefault(str(ver), {})[str(grp)] = {
                "ctr": float(row["ctr"]),
                "value": float(row["value"]),
                "impressions": int(row["impressions"]),
            }
        agg = {}
        for stat, frame in (
            ("difference", mf.difference()),
            ("ratio", mf.ratio()),
            ("group_min", mf.group_min()),
        ):
            agg[stat] = {
                str(ver): {
                    "ctr": float(frame.loc[ver, "ctr"]),
                    "value": float(frame.loc[ver, "value"]),
                }
                for ver in frame.index
            }
        out["attributes"][attr] = {"by_group": by_group, **agg}
    return out
