"""`northstar audit` on a really trained run: files, numbers that match training, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairness.audit import AuditConfig, run_audit
from northstar.cli import main
from training.synth import SynthConfig, generate_dataset
from training.train import TrainConfig, train

pytestmark = pytest.mark.integration

# Thresholds nothing trained on 300 users can fail, so a failure here is a code failure.
LENIENT = """
[gates]
min_group_size = 1
max_gap = 1.0
min_ratio = 0.0
max_exposure_gini = 1.0
max_group_drop = 0.0
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    _, ds = generate_dataset(SynthConfig.preset("tiny", seed=1), progress=False)
    ds.save(root / "data")
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "run"),
            epochs=2,
            batch_size=256,
            progress=False,
            val_users=300,
        )
    )
    (root / "lenient.toml").write_text(LENIENT)
    (root / "strict.toml").write_text("[gates]\nmax_exposure_gini = 0.01\n")
    return root


def test_audit_with_baseline_run_passes_and_matches_training_metrics(trained, capsys):
    out = trained / "reports" / "same"
    rc = main(
        [
            "audit",
            "--run",
            str(trained / "run"),
            "--data",
            str(trained / "data"),
            "--out",
            str(out),
            "--baseline-run",
            str(trained / "run"),
            "--gates",
            str(trained / "lenient.toml"),
            "--n-boot",
            "50",
        ]
    )
    assert rc == 0, capsys.readouterr().out
    assert "PASS" in capsys.readouterr().out
    for name in ("audit.json", "gates.json", "summary.md", "report.html", "items.csv"):
        assert (out / name).stat().st_size > 0
    body = json.loads((out / "audit.json").read_text())
    metrics = json.loads((trained / "run" / "metrics.json").read_text())["test"]["model"]
    overall = body["audit"]["users"]["gender"]["overall"]
    # Same users, history and ranking as training's own test evaluation.
    assert overall["ndcg@10"] == pytest.approx(metrics["ndcg@10"], rel=1e-9)
    assert overall["recall@10"] == pytest.approx(metrics["recall@10"], rel=1e-9)
    assert body["audit"]["items"]["summary"]["coverage"] == pytest.approx(metrics["coverage@10"])
    assert body["audit"]["meta"]["n_users"] == metrics["users"]
    # A run compared with itself: every delta is 0 and the drop gate was checked.
    deltas = body["comparison"]["users"]["gender"]["ndcg@10"]
    assert all(d["delta"] == 0 for d in deltas.values())
    assert any(c["gate"] == "max_group_drop" for c in body["gates"]["checks"])
    assert "Versus baseline" in (out / "report.html").read_text()


def test_failing_gate_exits_nonzero_from_the_installed_command(trained):
    out = trained / "reports" / "strict"
    exe = Path(sys.executable).parent / "northstar"
    r = subprocess.run(
        [
            str(exe),
            "audit",
            "--run",
            str(trained / "run"),
            "--data",
            str(trained / "data"),
            "--out",
            str(out),
            "--gates",
            str(trained / "strict.toml"),
            "--n-boot",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exposure Gini" in r.stdout
    gates = json.loads((out / "gates.json").read_text())
    assert gates["passed"] is False
    assert any("exposure Gini" in reason for reason in gates["reasons"])


def test_baseline_audit_json_and_python_api(trained, capsys):
    first = trained / "reports" / "first"
    args = [
        "audit",
        "--run",
        str(trained / "run"),
        "--data",
        str(trained / "data"),
        "--gates",
        str(trained / "lenient.toml"),
        "--n-boot",
        "20",
    ]
    assert main([*args, "--out", str(first)]) == 0
    # Labelled feedback as the feedback stage writes it: one row per impression.
    users = pd.read_parquet(trained / "data" / "users.parquet")["user_id"].to_numpy()
    rng = np.random.default_rng(0)
    feedback = pd.DataFrame(
        {
            "user_id": np.repeat(users, 4),
            "model_version": rng.integers(1, 3, 4 * len(users)),
            "clicked": rng.integers(0, 2, 4 * len(users)),
            "value": rng.random(4 * len(users)) * 600,
        }
    )
    feedback.to_csv(trained / "feedback.csv", index=False)
    second = trained / "reports" / "second"
    extra = [
        "--baseline-audit",
        str(first / "audit.json"),
        "--feedback",
        str(trained / "feedback.csv"),
    ]
    assert main([*args, "--out", str(second), *extra]) == 0
    body = json.loads((second / "audit.json").read_text())
    assert body["comparison"]["baseline"] == "run"
    assert set(body["online"]["overall"]) == {"1", "2"}
    assert "gender" in body["online"]["attributes"]
    api = run_audit(AuditConfig(run=str(trained / "run"), data=str(trained / "data"), n_boot=20))
    saved = json.loads((first / "audit.json").read_text())["audit"]
    assert api.users["gender"].by_group == saved["users"]["gender"]["by_group"]
    assert api.users["gender"].ci_low == saved["users"]["gender"]["ci_low"]  # same seed


def test_bad_input_is_one_clear_line(trained, capsys):
    rc = main(
        [
            "audit",
            "--run",
            str(trained / "nope"),
            "--data",
            str(trained / "data"),
            "--out",
            str(trained / "reports" / "bad"),
        ]
    )
    assert rc == 2
    assert "not a run directory" in capsys.readouterr().err


def test_one_config_file_for_audit_and_gates_with_set_overrides(trained, capsys):
    """--config holds the AuditConfig ([audit]) and the gates ([gates]); --set wins."""
    cfg = trained / "audit.toml"
    cfg.write_text(
        f'[audit]\nrun = "{trained / "run"}"\ndata = "{trained / "data"}"\nn_boot = 10\n' + LENIENT
    )
    out = trained / "reports" / "from-config"
    assert main(["audit", "--out", str(out), "--config", str(cfg)]) == 0
    assert json.loads((out / "gates.json").read_text())["passed"] is True
    capsys.readouterr()
    rc = main(
        ["audit", "--out", str(out), "--config", str(cfg), "--set", "gates.max_exposure_gini=0.01"]
    )
    assert rc == 1 and "exposure Gini" in capsys.readouterr().out
    assert main(["audit", "--out", str(out), "--config", str(cfg), "--set", "n_bot=3"]) == 2
    assert "n_bot" in capsys.readouterr().err
