"""The audit core end to end: lists in, numbers, gates and report files out.

The biased-world test ranks with the synthetic world's ground truth (the oracle), so the
only difference between the "fair" and the "biased" model is the one we plant: one gender's
users get random lists. That is what a model that learned nothing for a group looks like.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from fairness.audit import AuditConfig, AuditResult, audit, load_audit
from fairness.gates import GateConfig, check_gates, compare
from fairness.inputs import EMPTY, AuditInput, make_audit_input
from fairness.report import write_report
from training.synth import SynthConfig, generate_dataset

# Explicit, so the test does not move with the defaults. The ground-truth ranker's own gaps
# come from the world's taste structure (~0.02 by gender, ~0.04 by age at seed 5): max_gap
# leaves room for the synthetic world to be retuned; the planted bias is ~0.19.
GATES = GateConfig(
    metric="ndcg@10",
    attributes=("gender", "age_bucket"),
    min_group_size=100,
    max_gap=0.08,
    min_ratio=0.6,
    max_exposure_gini=0.99,
    max_group_drop=0.02,
)


@pytest.fixture(scope="module")
def world_lists():
    """(dataset, history, target, user_ids, oracle lists, biased lists) for a small world."""
    world, ds = generate_dataset(SynthConfig.preset("small", seed=5), progress=False)
    inter = ds.interactions
    cut = int(inter["timestamp"].quantile(0.85))  # a plain time split: last 15% is the target
    history, target = inter[inter["timestamp"] <= cut], inter[inter["timestamp"] > cut]
    user_ids = np.unique(target["user_id"].to_numpy())
    scores = world.oracle_scores(world.user_index(user_ids), cut).astype(np.float64)
    seen = history[history["user_id"].isin(user_ids)]
    scores[
        np.searchsorted(user_ids, seen["user_id"].to_numpy()),
        world.item_index(seen["item_id"].to_numpy()),
    ] = -np.inf
    oracle = world.item_id_of(np.argsort(-scores, axis=1, kind="stable")[:, :100])
    biased = oracle.copy()
    gender = ds.users.set_index("user_id").loc[user_ids, "gender"].to_numpy()
    f = gender == "F"
    rng = np.random.default_rng(0)
    biased[f] = world.item_id_of(np.argsort(rng.random((f.sum(), world.n_items)), axis=1)[:, :100])
    return ds, history, target, user_ids, oracle, biased


def _audit(world_lists, which: str, label: str) -> AuditResult:
    ds, history, target, user_ids, oracle, biased = world_lists
    lists = {"oracle": oracle, "biased": biased}[which]
    inp = make_audit_input(
        user_ids=user_ids,
        ranked_item_ids=lists,
        dataset=ds,
        history=history,
        target=target,
        label=label,
    )
    return audit(inp, AuditConfig(n_boot=100))


@pytest.fixture(scope="module")
def fair(world_lists):
    return _audit(world_lists, "oracle", "fair")


@pytest.fixture(scope="module")
def unfair(world_lists):
    return _audit(world_lists, "biased", "unfair")


def test_unbiased_model_passes(fair):
    verdict = check_gates(fair, GATES)
    assert verdict.passed, verdict.reasons
    assert {c.scope for c in verdict.checks} == {"gender", "age_bucket", "items"}
    # occupation is all "unknown" in synthetic data: skipped, and the audit says so.
    assert "occupation" in fair.meta["skipped"]
    assert set(fair.users) == {"gender", "age_bucket", "activity", "gender×age_bucket"}


def test_group_with_random_lists_fails_and_is_named(unfair):
    verdict = check_gates(unfair, GATES)
    assert not verdict.passed
    assert {c.scope for c in verdict.failures} == {"gender"}
    assert {c.gate for c in verdict.failures} == {"max_gap", "min_ratio"}
    assert all("gender=F" in r for r in verdict.reasons)
    assert verdict.to_dict()["failed_groups"] == ["gender=F"]
    ndcg = unfair.users["gender"].by_group["ndcg@10"]
    assert ndcg["F"] < 0.3 * ndcg["M"]


def test_drop_against_baseline_names_the_group(fair, unfair):
    assert check_gates(fair, GATES, baseline=fair).passed
    verdict = check_gates(unfair, GATES, baseline=fair)
    drop = [c for c in verdict.failures if c.gate == "max_group_drop" and c.scope == "gender"]
    assert len(drop) == 1 and drop[0].groups == ("F",)
    deltas = compare(unfair, fair)["users"]["gender"]["ndcg@10"]
    assert deltas["M"]["delta"] == 0.0  # M's lists are identical in both
    assert deltas["F"]["delta"] < -0.05


def test_exposure_side_sees_the_random_lists(fair, unfair):
    # Random lists for half the users spread exposure over the whole catalogue.
    f, u = fair.items["summary"], unfair.items["summary"]
    assert u["coverage"] > f["coverage"]
    assert u["exposure_gini"] < f["exposure_gini"]
    assert u["arp"] < f["arp"] and u["aplt"] > f["aplt"]
    for res in (fair, unfair):
        for grouping in res.items["groups"].values():
            shares = [g["exposure_share"] for g in grouping["groups"].values()]
            assert sum(shares) == pytest.approx(1.0)
        assert res.item_table["exposure"].sum() == pytest.approx(
            res.meta["n_users"] * sum(1 / math.log2(1 + r) for r in range(1, 11))
        )


def test_report_files(tmp_path, fair, unfair):
    verdict = check_gates(unfair, GATES, baseline=fair)
    paths = write_report(tmp_path, unfair, verdict, compare(unfair, fair))
    assert {p.name for p in paths.values()} == {
        "audit.json",
        "gates.json",
        "summary.md",
        "report.html",
        "items.csv",
    }

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    body = json.loads(paths["audit"].read_text(), parse_constant=no_nan)
    assert body["gates"]["passed"] is False
    gates = json.loads(paths["gates"].read_text(), parse_constant=no_nan)
    assert "gender=F" in gates["failed_groups"]
    again = load_audit(tmp_path)
    assert again.to_dict() == json.loads(json.dumps(body["audit"]))
    assert check_gates(again, GATES).reasons == check_gates(unfair, GATES).reasons
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") >= 7  # 4 groupings, Lorenz, scatter, shares…
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "FAIL" in paths["summary"].read_text()
    assert len(pd.read_csv(paths["items"])) == unfair.meta["n_items"]


def _tiny_input(**overrides) -> AuditInput:
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "gender": ["F", "F", "M", "M"],
            "age_bucket": ["a", "a", "a", "a"],
            "activity": ["low"] * 4,
        }
    )
    items = pd.DataFrame({"item_id": [10, 20, 30, 40], "provider": ["p", "p", "q", "q"]})
    args = dict(
        user_ids=np.array([1, 2, 3, 4]),
        ranked=np.array([[10, 20], [30, EMPTY], [20, 10], [10, 20]]),
        relevant=pd.DataFrame({"user_id": [1, 1, 2, 3, 3], "item_id": [20, 40, 30, 20, 20]}),
        users=users,
        items=items,
        popularity=pd.Series({10: 6, 20: 3, 30: 1}),
    )
    return AuditInput(**(args | overrides))


def test_audit_numbers_on_hand_built_lists():
    res = audit(_tiny_input(), AuditConfig(k=2, n_boot=0, attributes=("gender",), intersections=()))
    # user 4 has no held-out item: not audited. user 1: hit at rank 2 of 2 relevant;
    # user 2: hit at rank 1 of 1; user 3: hit at rank 1 (its duplicate pair counts once).
    assert res.meta["n_users"] == 3 and res.meta["n_users_without_relevant"] == 1
    d = 1 / math.log2(3)
    g = res.users["gender"]
    assert g.sizes == (2, 1)
    assert g.by_group["ndcg@2"]["F"] == pytest.approx((d / (1 + d) + 1.0) / 2)
    assert g.by_group["recall@2"]["F"] == pytest.approx((0.5 + 1.0) / 2)
    assert g.by_group["ndcg@2"]["M"] == pytest.approx(1.0)
    assert g.difference["ndcg@2"] == pytest.approx(1.0 - (d / (1 + d) + 1.0) / 2)
    s = res.items["summary"]
    assert s["coverage"] == pytest.approx(3 / 4)
    # exposure: 10 -> 1 + d (users 1, 3), 20 -> d + 1, 30 -> 1; items 40: 0.
    np.testing.assert_allclose(res.item_table["exposure"], [1 + d, 1 + d, 1.0, 0.0])
    # ARP over lists: user 1 (6+3)/2, user 2 1/1, user 3 (3+6)/2.
    assert s["arp"] == pytest.approx((4.5 + 1 + 4.5) / 3)
    prov = res.items["groups"]["provider"]["groups"]
    # relevance pairs: (1,20) (1,40) (2,30) (3,20): p holds 2 of 4, q holds 2 of 4.
    assert prov["p"]["relevance_share"] == pytest.approx(0.5)
    assert prov["p"]["exposure_share"] == pytest.approx((2 + 2 * d) / (3 + 2 * d))


def test_audit_input_rejects_bad_lists():
    with pytest.raises(ValueError, match="not in the items table"):
        _tiny_input(ranked=np.array([[10, 99], [30, 10], [20, 10], [10, 20]]))
    with pytest.raises(ValueError, match="duplicates"):
        _tiny_input(user_ids=np.array([1, 1, 3, 4]))
    with pytest.raises(ValueError, match="shape"):
        _tiny_input(ranked=np.array([10, 20, 30, 40]))


def test_gate_metric_must_exist():
    res = audit(_tiny_input(), AuditConfig(k=2, n_boot=0, attributes=("gender",), intersections=()))
    with pytest.raises(ValueError, match="audit with --k"):
        check_gates(res, GateConfig(metric="ndcg@10"))
    # A bare name means "at the audit's k"; the one-user group M is too small to gate.
    v = check_gates(res, GateConfig(metric="ndcg", attributes=("gender",), min_group_size=2))
    assert all(c.skipped for c in v.checks if c.scope == "gender")
    assert any("not gated" in n for n in v.notes)


def test_gate_config_loads_from_toml(tmp_path):
    from common.config import load

    path = tmp_path / "gates.toml"
    path.write_text('[gates]\nmax_gap = 0.1\nattributes = ["gender"]\nmax_exposure_gini = "none"\n')
    g = load(GateConfig, path, section="gates")
    assert g.max_gap == 0.1 and g.attributes == ("gender",) and g.max_exposure_gini is None
    assert g.min_ratio == GateConfig().min_ratio
