"""`northstar simulate replay` on the tiny world: the replayed stream is the one the traffic
drew, spans cut where the run cut them, the seen filter holds, and the oracle bounds the
model on the same state."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from feedback.sink import open_sink
from serving.testing import saved_world_run
from simulator import SimulateConfig, simulate
from simulator.doubles import LocalRecommender, SinkSender
from simulator.driver import draw_users
from studies.replay import Catalogue, ReplayConfig, State, rank, run_replay, spans_of
from training.synth import World


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    world, run = saved_world_run(tmp_path_factory.mktemp("replay"), seed=0)
    return ReplayConfig(world=str(world), run=str(run), spans=(30, 45), users=40, batch=20, k=5)


def test_the_stream_is_the_users_simulate_sent(cfg, tmp_path):
    sink = open_sink(tmp_path / "events.db")
    local = LocalRecommender(cfg.world, sink, seed=1)
    sent: list[int] = []

    class Recording:
        def recommend(self, user_ids, k=10):
            sent.extend(int(u) for u in np.atleast_1d(user_ids))
            return local.recommend(user_ids, k)

        def close(self):
            pass

    sim = SimulateConfig(world=cfg.world, users=cfg.users, requests=cfg.batch, seed=7)
    simulate(sim, client_factory=Recording, sender=SinkSender(sink))
    world = World.load(cfg.world)
    drawn = draw_users(world, cfg.users, cfg.batch, np.random.default_rng([7, 7]))
    # threads send in any order: the same requests, as a multiset
    assert Counter(sent) == Counter(world.user_id_of(drawn).tolist())


def test_spans_follow_the_run_and_split_batches(cfg, tmp_path):
    res = run_replay(replace(cfg, out=str(tmp_path / "r.json")))
    for rows in res["policies"].values():
        assert [r["requests"] for r in rows] == [30, 45]  # 30 ends inside the second batch
        for r in rows:
            assert r["ctr_low"] <= r["ctr"] <= r["ctr_high"]
            assert r["clicks"] <= r["impressions"] <= cfg.k * r["requests"]
    assert json.loads((tmp_path / "r.json").read_text())["spans"][1]["requests"] == 45

    cycles = tmp_path / "cycles.json"
    cycles.write_text(
        json.dumps(
            {
                "arms": {
                    "live": {
                        "burn_in": {"served_requests": 200},
                        "cycles": [
                            {"cycle": 1, "served_requests": 400},
                            {"cycle": 2, "served_requests": 600},
                        ],
                    }
                }
            }
        )
    )
    got = spans_of(replace(cfg, spans=(), from_cycles=str(cycles)))
    assert got == [("burn-in", 200), ("cycle 1", 400), ("cycle 2", 600)]


def test_seen_items_never_come_back_and_the_oracle_bounds_the_model(cfg):
    cat = Catalogue(cfg)
    users = draw_users(cat.world, cfg.users, cfg.batch, np.random.default_rng([cfg.seed, 7]))
    first = {}
    for policy in ("oracle", "model"):
        state = State(cat)
        slates, rel = rank(policy, cat, state, users, cfg)
        first[policy] = rel[slates >= 0].mean()
        state.click(users, slates, np.ones(slates.shape, dtype=bool))  # every shown item
        again, _ = rank(policy, cat, state, users, cfg)
        for r, u in enumerate(users):
            shown = again[r][again[r] >= 0]
            assert not set(shown) & set(slates[r][slates[r] >= 0])  # clicked: filtered
            assert not set(shown) & set(cat.owned(int(u)))  # training history: filtered
    assert first["oracle"] >= first["model"]  # the same state: the oracle shows the best


def test_a_few_users_coming_back_use_up_even_the_oracle(tmp_path):
    # Four users share 200 items and come back every batch: each span uses up their best.
    world, run = saved_world_run(tmp_path, n_users=4, n_interactions=200)
    few = ReplayConfig(
        world=str(world),
        run=str(run),
        spans=(100, 100, 100),
        users=4,
        batch=10,
        policies=("oracle",),
        out=str(tmp_path / "r.json"),
    )
    rows = run_replay(few)["policies"]["oracle"]
    clicks = [r["clicks_per_request"] for r in rows]
    assert clicks == sorted(clicks, reverse=True) and clicks[-1] < clicks[0]


@pytest.mark.parametrize(
    "over, field",
    [({"spans": ()}, "from_cycles"), ({"policies": ("best",)}, "policies"), ({"run": ""}, "run")],
)
def test_bad_settings_name_the_field(cfg, over, field):
    with pytest.raises(ValueError, match=field):
        replace(cfg, **over)


def test_the_cli_prints_the_table_and_draws_the_figure(cfg, tmp_path, capsys):
    from northstar.cli import main

    fig, out = tmp_path / "replay.png", tmp_path / "replay.json"
    sets = [
        f"world={cfg.world}",
        f"run={cfg.run}",
        "spans=20,20",
        "users=40",
        "batch=20",
        f"out={out}",
        f"figure={fig}",
    ]
    assert main(["simulate", "replay", "--set", *sets]) == 0
    text = capsys.readouterr().out
    assert "| span 2 | 20 |" in text and "oracle: CTR" in text
    assert fig.stat().st_size > 0 and json.loads(out.read_text())["figure"] == str(fig)
