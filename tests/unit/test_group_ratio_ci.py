"""The online fairness guardrail's user-clustered interval, on planted per-user clicks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from canary.group_ratio_ci import per_user_groups, ratio_diff_upper


def _arm(version: int, ctr_by_group: dict[str, float], users: int, per_user: int, seed: int):
    """Impression rows: `users` users per group, each with its own CTR drawn around the
    group's (users differ: clicks cluster within users), `per_user` impressions each."""
    rng = np.random.default_rng(seed)
    rows = []
    uid = version * 100_000
    for group, ctr in ctr_by_group.items():
        for _ in range(users):
            uid += 1
            p = np.clip(rng.beta(2, 2 * (1 - ctr) / ctr), 0, 1)
            clicks = rng.random(per_user) < p
            rows.append(pd.DataFrame({"user_id": uid, "clicked": clicks, "group": group}))
    df = pd.concat(rows, ignore_index=True)
    df["model_version"] = version
    return df


def _upper(prod, canary):
    labels = pd.concat([prod, canary], ignore_index=True)
    pu = per_user_groups(labels, labels["group"])
    groups = ["F", "M"]
    return ratio_diff_upper(
        pu[pu.model_version == 1],
        pu[pu.model_version == 2],
        groups_production=groups,
        groups_canary=groups,
        alpha=0.05,
        tau=0.2,
    )


def test_a_real_gap_is_significant_and_the_same_rates_are_not():
    prod = _arm(1, {"F": 0.12, "M": 0.12}, users=400, per_user=20, seed=1)
    unfair = _arm(2, {"F": 0.06, "M": 0.14}, users=400, per_user=20, seed=2)
    assert _upper(prod, unfair) < 0
    same = _arm(2, {"F": 0.12, "M": 0.12}, users=400, per_user=20, seed=3)
    assert _upper(prod, same) > 0


def test_few_users_with_many_impressions_each_widen_the_interval():
    # The same impressions per arm in 40 users instead of 800: clustered, so less is known.
    prod_many = _arm(1, {"F": 0.12, "M": 0.12}, users=400, per_user=20, seed=4)
    can_many = _arm(2, {"F": 0.09, "M": 0.12}, users=400, per_user=20, seed=5)
    prod_few = _arm(1, {"F": 0.12, "M": 0.12}, users=20, per_user=400, seed=4)
    can_few = _arm(2, {"F": 0.09, "M": 0.12}, users=20, per_user=400, seed=5)
    assert _upper(prod_few, can_few) > _upper(prod_many, can_many)


def test_one_group_is_no_ratio():
    prod = _arm(1, {"F": 0.12}, users=50, per_user=10, seed=6)
    pu = per_user_groups(prod, prod["group"])
    assert (
        ratio_diff_upper(pu, pu, groups_production=["F"], groups_canary=["F"], alpha=0.05, tau=0.2)
        is None
    )
