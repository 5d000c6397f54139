"""`northstar tune` on a tiny world: trials score validation only and the best config is
written next to the study, loadable as a TrainConfig."""

from __future__ import annotations

import argparse
import json

import pytest

from common import config as config_mod
from training import cli as training_cli
from training.synth import SynthConfig, generate_dataset
from training.train import TrainConfig
from training.tune import BEST_JSON, BEST_TOML, STUDY_JSON

FAST = [
    "epochs=2",
    "batch_size=256",
    "history_len=4",
    "n_hash_buckets=8",
    "threads=1",
    "val_users=200",
    "tower.hidden_dim=32",
    "progress=false",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cfg = SynthConfig.preset("tiny", n_users=200, n_items=120, n_interactions=3000)
    _, ds = generate_dataset(cfg, progress=False)
    ds.save(out)
    return out


def test_tune_writes_the_best_config_and_never_looks_at_test(tiny_data, tmp_path):
    parser = argparse.ArgumentParser()
    training_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "tune"
    argv = ["tune", "--data", str(tiny_data), "--out", str(out), "--trials", "2"]
    args = parser.parse_args([*argv, "--time-budget", "300", "--set", *FAST])
    assert args.func(args) == 0

    study = json.loads((out / STUDY_JSON).read_text())
    assert study["completed"] == 2 and len(study["trials"]) == 2
    assert study["objective"].startswith("validation ndcg@10")
    values = [t["value"] for t in study["trials"]]
    assert study["best"]["value"] == max(values) > 0
    for t in study["trials"]:
        assert {
            "lr",
            "temperature",
            "tower.id_dim",
            "tower.out_dim",
            "epochs",
            "prior_beta",
        } <= set(t["params"])
        assert 1 <= t["params"]["epochs"] <= 2
        trial_metrics = json.loads(
            (out / "trials" / f"{t['number']:04d}" / "metrics.json").read_text()
        )
        assert "test" not in trial_metrics  # trials never evaluate the test split
        assert set(trial_metrics["val"]) <= {"model", "toppop", "model_beta0"}
        # A trial trains the adjustment the study suggested, not the default grid.
        assert trial_metrics["logit_adjustment"] == {
            "value": t["params"]["logit_adjustment"],
            "chosen_by": "given",
        }

    best = config_mod.load(TrainConfig, out / BEST_TOML)
    params = study["best"]["params"]
    assert best.lr == pytest.approx(params["lr"]) and best.tower.out_dim == params["tower.out_dim"]
    assert best.prior_betas == pytest.approx((params["prior_beta"],))
    assert best.logit_adjustment == params["logit_adjustment"] and best.logit_adjustments == ()
    assert best.data == str(tiny_data) and best.evaluate_test and best.history_len == 4
    assert json.loads((out / BEST_JSON).read_text())["number"] == study["best"]["number"]
