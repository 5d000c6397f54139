"""synth -> train -> evaluate at tiny sizes, for real: files, CLI, resume, DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.movielens_write import write_ml100k
from training.run import load_run
from training.synth import SynthConfig, generate_dataset
from training.train import TrainConfig, train

pytestmark = pytest.mark.integration

TINY_TRAIN = {
    "epochs": 4,
    "batch_size": 256,
    "history_len": 8,
    "n_hash_buckets": 16,
    "progress": False,
    "threads": 1,
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    _, ds = generate_dataset(SynthConfig.preset("tiny"), progress=False)
    ds.save(out)
    return out


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    from common.config import build

    return build(TrainConfig, {**TINY_TRAIN, "data": str(data), "out": str(out), **kw})


def test_train_writes_a_complete_run_and_beats_toppop(tiny_data, tmp_path):
    metrics = train(_cfg(tiny_data, tmp_path / "run"))
    run = tmp_path / "run"
    for name in (
        "run.json",
        "model.pt",
        "vocab.npz",
        "vocab.json",
        "features.npz",
        "metrics.json",
        "checkpoint.pt",
    ):
        assert (run / name).exists(), name
    on_disk = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for who in ("model", "toppop"):
            assert {
                "recall@10",
                "ndcg@10",
                "recall@50",
                "recall@100",
                "ndcg@50",
                "hitrate@10",
                "coverage@10",
            } <= set(on_disk[split][who])
    assert on_disk["test"]["model"]["ndcg@10"] > on_disk["test"]["toppop"]["ndcg@10"]
    assert metrics["test"] == on_disk["test"]
    loaded = load_run(run)  # weights_only load of the state dict
    assert loaded.vocab.spec == loaded.model.spec


def test_evaluate_cli_recomputes_the_same_numbers(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_data, run))
    before = json.loads((run / "metrics.json").read_text())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "northstar",
            "evaluate",
            "--run",
            str(run),
            "--data",
            str(tiny_data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    after = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for who in ("model", "toppop"):
            for m, v in before[split][who].items():
                assert after[split][who][m] == pytest.approx(v, abs=1e-9), (split, who, m)
    assert "ndcg@10" in r.stdout


def test_same_seed_same_model_and_resume_finishes_the_same(tiny_data, tmp_path):
    a = train(_cfg(tiny_data, tmp_path / "a", resume=False, patience=100))
    b = train(_cfg(tiny_data, tmp_path / "b", resume=False, patience=100))
    assert a["test"] == b["test"]
    # Train 2 epochs, then "resume" to 4: the same batches are replayed from the checkpoint.
    train(_cfg(tiny_data, tmp_path / "c", epochs=2, patience=100))
    c = train(_cfg(tiny_data, tmp_path / "c", epochs=4, patience=100))
    assert c["test"]["model"]["ndcg@10"] == pytest.approx(a["test"]["model"]["ndcg@10"], abs=1e-6)


def test_movielens_format_data_beats_toppop(tmp_path):
    """Write ML-100K files (`u.data`, `u.user`, `u.item`) from a small world, import, train."""
    _world, ds = generate_dataset(
        SynthConfig.preset("small", n_users=1500, n_interactions=40_000), progress=False
    )
    ml = write_ml100k(ds, tmp_path / "ml-100k")
    data = tmp_path / "data"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "northstar",
            "data",
            "movielens",
            "--path",
            str(ml),
            "--out",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    metrics = train(_cfg(data, tmp_path / "run", epochs=5))
    assert metrics["test"]["model"]["ndcg@10"] > metrics["test"]["toppop"]["ndcg@10"]


def test_ddp_two_cpu_processes_on_gloo(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "northstar",
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--set",
        "epochs=2",
        "batch_size=128",
        "history_len=8",
        "n_hash_buckets=16",
        "progress=false",
        "threads=1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["model"]["ndcg@10"] > 0
    assert len(metrics["epochs"]) == 2


def test_steps_per_epoch_caps_each_epoch_on_a_fresh_subset(tiny_data, tmp_path):
    full = train(_cfg(tiny_data, tmp_path / "full", epochs=2, patience=5, refit_epochs=0))
    capped = train(
        _cfg(
            tiny_data, tmp_path / "capped", epochs=2, patience=5, refit_epochs=0, steps_per_epoch=3
        )
    )
    assert [e["steps"] for e in full["epochs"]] == [full["epochs"][0]["steps"]] * 2
    assert full["epochs"][0]["steps"] > 3
    assert [e["steps"] for e in capped["epochs"]] == [3, 3]
    assert capped["epochs"][0]["loss"] != full["epochs"][0]["loss"]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        TrainConfig(steps_per_epoch=-1)


def test_eval_users_scores_a_seeded_sample_of_each_split(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "run", epochs=1, refit_epochs=0, eval_users=40)
    m = train(cfg)
    for split in ("val", "test"):
        assert m[split]["model"]["users"] == 40 == m[split]["toppop"]["users"]
    again = train(dataclasses.replace(cfg, out=str(tmp_path / "again")))
    assert again["test"] == m["test"]  # the same seeded sample, the same numbers


def test_logit_adjustment_is_chosen_on_validation_and_kept_by_a_warm_start(tiny_data, tmp_path):
    run = tmp_path / "run"
    m = train(_cfg(tiny_data, run, epochs=2, logit_adjustments=(0.0, 0.5)))
    adj = m["logit_adjustment"]
    scores = adj["val_ndcg@10"]
    assert set(scores) == {"0", "0.5"}
    best = max(scores, key=scores.get)
    assert adj["value"] == float(best)
    # The winner was scored as it is served: its validation NDCG@10 at its chosen prior is
    # the run's own validation figure, and its beta is the run's.
    assert m["val"]["model"]["ndcg@10"] == pytest.approx(scores[best], abs=1e-12)
    assert m["popularity_prior"]["beta"] == adj["candidates"][best]["beta"]
    saved = json.loads((run / "run.json").read_text())["train"]
    assert saved["logit_adjustment"] == adj["value"]
    # Only the winner's checkpoint stays, under the run's usual name.
    assert (run / "checkpoint.pt").exists() and not list(run.glob("checkpoint-adj*.pt"))

    # A warm start fine-tunes under its starting run's adjustment, whatever its own grid.
    warm = train(
        _cfg(
            tiny_data,
            tmp_path / "warm",
            epochs=1,
            init_from=str(run),
            logit_adjustment=0.9,
            logit_adjustments=(0.1, 0.9),
        )
    )
    assert warm["warm_start"]["used"]
    assert warm["logit_adjustment"] == {"value": adj["value"], "chosen_by": "the warm start's"}

    given = train(_cfg(tiny_data, tmp_path / "given", epochs=1, logit_adjustments=()))
    assert given["logit_adjustment"] == {"value": 0.25, "chosen_by": "given"}
    with pytest.raises(ValueError, match="logit_adjustments"):
        TrainConfig(logit_adjustments=(-0.1, 0.5))
