"""The alert rules' PromQL, checked by Prometheus' own tool: `promtool check rules` on
diagnose/alerts.yaml, and `promtool test rules` on diagnose/alerts_test.yaml, where every
alert fires on a series that should fire it and stays quiet on one that should not.

promtool comes with Debian's `prometheus` package, which `make sysdeps` (and so `make test`)
installs; without it these tests skip and say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "diagnose" / "alerts.yaml"
RULE_TESTS = ROOT / "diagnose" / "alerts_test.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH: `make sysdeps` installs it (Debian package `prometheus`)",
)


def _groups() -> list[dict]:
    return yaml.safe_load(ALERTS.read_text())["spec"]["groups"]


def _alerts() -> set[str]:
    return {r["alert"] for g in _groups() for r in g["rules"] if "alert" in r}


def _rules_dir(tmp_path: Path) -> Path:
    """A plain rules file (alerts.yaml is a PrometheusRule) beside a copy of the tests."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    (rules,) = tests["rule_files"]
    (tmp_path / rules).write_text(yaml.safe_dump({"groups": _groups()}))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path


def _promtool(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@needs_promtool
def test_promtool_checks_the_rules(tmp_path):
    d = _rules_dir(tmp_path)
    out = _promtool("check", "rules", "alerts.rules.yaml", cwd=d)
    assert f"SUCCESS: {len(_alerts())} rules found" in out, out


@needs_promtool
def test_promtool_unit_tests_pass(tmp_path):
    d = _rules_dir(tmp_path)
    out = _promtool("test", "rules", RULE_TESTS.name, cwd=d)
    assert "SUCCESS" in out, out


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not():
    """Read without promtool: the rule tests cover each alert both ways."""
    fires: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in t["alert_rule_test"]:
            into = fires if case["exp_alerts"] else quiet
            into[case["alertname"]] = into.get(case["alertname"], 0) + 1
    assert set(fires) == _alerts(), sorted(_alerts() ^ set(fires))
    assert set(quiet) == _alerts(), sorted(_alerts() ^ set(quiet))
