"""The in-process closed loop of `northstar simulate depth`, on the tiny world with a run of
random weights: the arms differ only in the state they update, and the oracle bounds them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from serving.testing import saved_world_run
from studies.depth import DepthConfig, build, relevance_by_depth, run_arm, run_depth


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    world, run = saved_world_run(root, seed=0)
    return DepthConfig(
        dir=str(root),
        world=str(world),
        run=str(run),
        users=60,
        rounds=4,
        betas=(0.0, 0.5),
    )


def test_arms_share_the_first_round_and_differ_only_in_what_they_update(cfg):
    loop = build(cfg)
    arms = {a: run_arm(loop, a, prior=False, cfg=cfg) for a in ("frozen", "seen_only", "live")}
    first = {a: r[0] for a, r in arms.items()}
    assert first["frozen"] == first["seen_only"] == first["live"]  # nothing clicked yet
    # frozen never changes its slates: the relevance it shows is the same every round
    assert len({round(r["relevance"], 9) for r in arms["frozen"]}) == 1
    oracle = run_arm(loop, "oracle", prior=False, cfg=cfg)
    assert oracle[0]["relevance"] >= first["live"]["relevance"]


def test_repeats_count_earlier_showings_and_the_cap_drops_unclicked_items(cfg):
    loop = build(cfg)
    frozen = run_arm(loop, "frozen", prior=False, cfg=cfg)
    live = run_arm(loop, "live", prior=False, cfg=cfg)
    capped = run_arm(loop, "shown_cap", prior=False, cfg=replace(cfg, shown_cap=1))
    assert frozen[0]["repeats"] == live[0]["repeats"] == capped[0]["repeats"] == 0.0
    assert all(r["repeats"] == 1.0 for r in frozen[1:])  # the same slate every round
    assert any(r["repeats"] > 0 for r in live[1:])  # unclicked items come back
    assert all(r["repeats"] == 0.0 for r in capped)  # shown once unclicked: gone
    assert capped[0] == live[0]


def test_relevance_by_depth_has_the_oracle_on_top_and_decaying(cfg):
    rows = relevance_by_depth(build(cfg), cfg.betas)
    assert [r["ranking"] for r in rows] == ["model, beta 0", "model, beta 0.5", "oracle"]
    oracle = [v for k, v in rows[-1].items() if k != "ranking"]
    assert oracle == sorted(oracle, reverse=True)
    for row in rows[:-1]:
        assert row["rel@1-10"] <= rows[-1]["rel@1-10"]


def test_run_depth_writes_every_arm(cfg, tmp_path):
    cfg.out = str(tmp_path / "depth.json")
    result = run_depth(cfg)
    saved = json.loads((tmp_path / "depth.json").read_text())
    assert set(saved["arms"]) == set(result["arms"])
    assert all(len(r) == cfg.rounds for r in saved["arms"].values())
    assert all(0.0 <= x["ctr"] <= 1.0 for r in saved["arms"].values() for x in r)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shown_cap"):
        DepthConfig(shown_cap=0)
    with pytest.raises(ValueError, match="rewatch_factor"):
        DepthConfig(rewatch_factor=1.5)
    with pytest.raises(ValueError, match="arm="):
        run_arm(None, "nope", prior=False, cfg=DepthConfig())
