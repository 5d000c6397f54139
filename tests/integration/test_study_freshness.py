"""The freshness study end to end on the `tiny` world (studies/freshness.py): the same
world, run and simulator seed served twice on a real tritonserver, once from the frozen
per-version snapshot and once from a real redis-server online store that the `feedback`
model updates with every acknowledged click.

What is checked is measured, not set: the share of impressions that show a user an item
they clicked in an earlier batch is counted by the simulator against its memory of each
user's clicks. The frozen arm keeps showing them (nothing tells its seen set); the live
arm's seen filter reads the clicks, acknowledged at the end of each batch, before the next
batch starts (a pause longer than the store cache's TTL), so it shows fewer (none, here).
"""

from __future__ import annotations

import json

import pytest

from serving.testing import world_run
from studies.freshness import FreshnessConfig, ab_table, plot_ab, run_freshness

pytestmark = pytest.mark.integration


def test_live_features_reshow_fewer_clicked_items_than_the_frozen_snapshot(tmp_path):
    from training.synth import SynthConfig, generate_dataset

    world, ds = generate_dataset(SynthConfig.preset("tiny", seed=0), progress=False)
    world.save(tmp_path / "world")
    ds.save(tmp_path / "world")
    # Random weights on the world's ids: the study measures serving state, not the model,
    # and a run in a second keeps the test fast.
    run = world_run(ds, tmp_path / "run", seed=0)
    cfg = FreshnessConfig(
        dir=str(tmp_path / "study"),
        world=str(tmp_path / "world"),
        run=str(run),
        users=80,
        requests=300,
        batch=100,
        concurrency=2,
    )
    result = run_freshness(cfg)

    frozen, live = result["arms"]["frozen"], result["arms"]["live"]
    for arm in (frozen, live):
        assert arm["requests"] == 300 and arm["failed"] == 0
        # Every impression the server returned was logged and joined.
        assert arm["impressions_logged"] == arm["impressions_returned"] > 0
        ns = arm["north_star"]
        assert ns["impressions"] == arm["impressions_logged"]
        assert ns["ctr_low"] <= ns["ctr"] <= ns["ctr_high"]
    assert frozen["reshown_clicked"] > 0, frozen["per_batch"]
    assert live["reshown_clicked_share"] < frozen["reshown_clicked_share"], (live, frozen)
    # The first batch has no earlier clicks to re-show, in either arm.
    assert frozen["per_batch"][0]["rewatch_impressions"] == 0
    for arm in (frozen, live):
        assert sum(r["impressions"] for r in arm["by_prior_clicks"]) == arm["impressions_logged"]
        assert all(0 < b["attainable_ctr"] < 1 for b in arm["per_batch"])

    saved = json.loads((tmp_path / "study" / "freshness.json").read_text())
    assert saved["arms"]["live"]["reshown_clicked"] == live["reshown_clicked"]
    table = ab_table(result)
    assert "| frozen |" in table and "| live |" in table
    png = plot_ab(result, tmp_path / "ab.png")
    assert png.stat().st_size > 10_000


def _tiny_cycles(root, **kw):
    """The retrain-cycles tool on the tiny world, live arm only, small traffic."""
    from studies.freshness_cycles import CyclesConfig

    base = {"preset": "tiny", "arms": ("live",), "users": 80, "concurrency": 2}
    return CyclesConfig(dir=str(root), **{**base, **kw})


@pytest.mark.slow
def test_one_short_retrain_cycle_with_live_features_runs_end_to_end(tmp_path):
    """studies/freshness_cycles.py on the tiny world: one retrain -> offline gates -> canary
    -> decision under closed-loop traffic, on a real tritonserver reading a real Redis."""
    from studies.freshness_cycles import cycles_table, run_cycles

    cfg = _tiny_cycles(
        tmp_path / "cycles",
        train_epochs=3,
        cycles=1,
        batch=50,
        requests_per_look=50,
        max_looks=4,
        min_impressions=200,
        max_impressions=400,
        burn_in_requests=100,
    )
    result = run_cycles(cfg)
    arm = result["arms"]["live"]
    assert arm["failed"] == 0 and not arm["traffic_errors"], arm
    (cycle,) = arm["cycles"]
    assert cycle["retrain"] in ("canary", "rejected"), cycle["retrain_reasons"]
    assert cycle["served"]["impressions"] > 0
    burn_in = arm["burn_in"]  # production alone, before the first retrain
    assert burn_in["served_requests"] >= 100 and burn_in["served"]["impressions"] > 0
    # The oracle slate's CTR for the same users bounds what any ranking could serve.
    for span in (burn_in, cycle):
        assert span["served"]["ctr"] <= span["attainable_ctr"] <= 1.0
        # the same requests, replayed in-process with the oracle ranking
        o = span["oracle_replay"]
        assert o["requests"] == span["served_requests"]
        assert 0.0 < o["ctr_low"] <= o["ctr"] <= o["ctr_high"] <= 1.0
    table = cycles_table(result)
    assert "| live | 1 |" in table and "| live | 0 (burn-in" in table
    assert (tmp_path / "cycles" / "cycles-live" / "replay.json").exists()


@pytest.mark.slow
def test_the_control_serves_every_cycle_from_production_without_retraining(tmp_path):
    """control_requests > 0: the same cycles, production alone, nothing retrained."""
    from studies.freshness_cycles import CyclesConfig, cycles_table, run_cycles

    cfg = _tiny_cycles(
        tmp_path / "control",
        train_epochs=2,
        cycles=2,
        batch=40,
        burn_in_requests=40,
        control_requests=80,
    )
    arm = run_cycles(cfg)["arms"]["live"]
    assert arm["failed"] == 0 and not arm["traffic_errors"], arm
    assert [c["decision"] for c in arm["cycles"]] == ["control", "control"]
    for c in arm["cycles"]:
        assert c["served_requests"] >= 80
        assert {v["model_version"] for v in c["served_by_version"]} == {1}
        assert c["served"]["ctr"] <= c["attainable_ctr"]
        assert c["oracle_replay"]["requests"] == c["served_requests"]
    table = cycles_table({"arms": {"live": arm}})
    assert "| live | 2 | v1 0." in table and "vNone" not in table
    with pytest.raises(ValueError, match="control_requests"):
        CyclesConfig(control_requests=-1)
