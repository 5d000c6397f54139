"""The planted-fault suite, shortened for CI (one seed, a smaller world), the drop's
significance test, sub-day windows, and the demo's last stage: a diagnosis of a canary's
rollback from the canary's decision history."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from diagnose.config import DiagnoseConfig, parse_window
from diagnose.planted import CUR_START, DAY, REF_START, generate, write_world
from diagnose.rollback import rollback_windows
from diagnose.suite import EXPECTED, run_suite
from northstar.cli import main

CI_SIZE = {"n_users": 1500, "ref_requests": 2400, "cur_requests": 1800}


def test_suite_ranks_the_planted_faults_first_and_raises_no_false_alarm(tmp_path):
    body = run_suite(1, tmp_path / "suite", size=CI_SIZE, first_seed=0, progress=False)
    t = body["table"]
    by_fault = {r["fault"]: r for r in t["faults"]}
    assert set(by_fault) == set(EXPECTED)
    missed = {f: r["top_cause"] for f, r in by_fault.items() if r["ranked_first"] < 1}
    # the target is 6 of its 7 first: allow one miss over all of them
    assert t["faults_ranked_first"] >= len(EXPECTED) - 1, missed
    assert t["false_alarms"] == 0, [r for r in body["runs"] if r["fault"] == "none"]
    healthy = [r for r in body["runs"] if r["fault"] == "none"]
    assert all(r["headline"].startswith("No ") for r in healthy), healthy
    written = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert written["table"] == json.loads(json.dumps(t))
    assert "false alarms" in (tmp_path / "suite" / "suite.md").read_text()


def test_suite_cli_rejects_bad_seeds(capsys):
    assert main(["diagnose", "suite", "--seeds", "0"]) == 2
    assert "--seeds 0" in capsys.readouterr().err


def test_iso_interval_windows():
    t0, t1 = parse_window("2026-11-30T01:00:00Z/2026-11-30T01:20:00Z")
    assert t1 - t0 == 20 * 60
    with pytest.raises(ValueError, match="ends before"):
        parse_window("2026-11-30T02:00:00Z/2026-11-30T01:00:00Z")
    cfg = DiagnoseConfig(
        labels="l",
        out="o",
        current="2026-11-30T01:00:00Z/2026-11-30T02:00:00Z",
        reference="2026-11-30T00:00:00Z/2026-11-30T01:00:00Z",
    )
    (r0, r1), (c0, _) = cfg.windows()
    assert r1 == c0 and c0 - r0 == 3600


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A demo-like output folder: a world whose current window is a worse canary's trial,
    the canary's decision history and the scenario file `northstar demo` writes."""
    root = tmp_path_factory.mktemp("demo")
    size = {"n_users": 1500, "ref_requests": 2500, "cur_requests": 1800}
    write_world(generate("worse_model", seed=4, **size), root)
    history = [
        {"kind": "promote", "decision": "promote", "ts": REF_START, "version": 1},
        {"kind": "retrain", "decision": "rejected", "ts": REF_START + 5 * DAY, "version": None},
        {"kind": "retrain", "decision": "canary", "ts": CUR_START, "version": 2},
        {"kind": "evaluate", "decision": "continue", "ts": CUR_START + DAY, "canary": 2},
        {"kind": "evaluate", "decision": "rollback", "ts": CUR_START + 7 * DAY, "canary": 2},
        {"kind": "rollback", "decision": "rollback", "ts": CUR_START + 7 * DAY, "version": 2},
    ]
    (root / "canary").mkdir()
    (root / "canary" / "state.json").write_text(json.dumps({"history": history}))
    acts = {"c": {"retrain": {"status": "canary", "version": 2}, "decision": "rollback"}}
    (root / "canary_scenario.json").write_text(json.dumps({"acts": acts}))
    return root


def test_rollback_windows_come_from_the_canary_history(demo_root):
    reference, current = rollback_windows(demo_root / "canary", 2)
    assert parse_window(current) == (CUR_START, CUR_START + 7 * DAY)
    assert parse_window(reference) == (REF_START, CUR_START)
    with pytest.raises(ValueError, match="version 9"):
        rollback_windows(demo_root / "canary", 9)


def test_demo_ends_with_a_diagnosis_of_the_rollback(demo_root, capsys):
    from northstar.demo import STAGES, DemoConfig, diagnose_stage

    assert STAGES[-1] is diagnose_stage
    server = SimpleNamespace(event_log=str(demo_root / "events.db"))
    diagnose_stage(DemoConfig(dir=str(demo_root)), server, demo_root)
    out = capsys.readouterr().out
    assert "top cause: model_regression" in out, out
    report = demo_root / "reports" / "diagnose" / "report.html"
    assert f"report: {report}" in out and report.exists()
    body = json.loads((demo_root / "reports" / "diagnose" / "report.json").read_text())
    assert body["summary"]["significant"] and body["summary"]["top_cause"] == "model_regression"
