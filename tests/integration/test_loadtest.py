"""Locust and the benchmark against real servers, each under a hard subprocess timeout.

Locust with gRPC on gevent can hang after its summary, so every run here is a
subprocess with a timeout; the locustfile's `quit` listener makes it exit on its own.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run import LOCUST_CONF, LOCUSTFILE, USER_CLASSES
from serving import repository as layout

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCUST_TIMEOUT_S = 90  # a 5-second run plus start-up on a loaded 2-core machine


def _locust(served, tmp_path: Path, protocol: str, *extra: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "locust", "--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE)]
    cmd += ["--headless", "--users", "4", "--spawn-rate", "4", "--run-time", "5s"]
    cmd += ["--grpc-url", served.grpc_url, "--http-url", served.http_url]
    cmd += ["--repo", str(served.repo), "--retrieval-batch", "8"]
    cmd += ["--csv", str(tmp_path / protocol), "--html", str(tmp_path / f"{protocol}.html")]
    cmd += [*extra, *USER_CLASSES[protocol]]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def _stats(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["Name"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_locust_headless_run_passes(served, tmp_path, protocol):
    rc, out = _locust(served, tmp_path, protocol)
    assert rc == 0, out[-3000:]
    stats = _stats(tmp_path / f"{protocol}_stats.csv")
    for name in ("recommend", "retrieval[8]"):
        assert int(stats[name]["Request Count"]) > 0, (name, out[-2000:])
        assert int(stats[name]["Failure Count"]) == 0, out[-2000:]
        assert stats[name]["Type"] == protocol
    assert "thresholds passed" in out
    assert (tmp_path / f"{protocol}.html").stat().st_size > 10_000  # Locust's HTML report


def test_locust_threshold_sets_exit_code(served, tmp_path):
    # gRPC: the exit goes through the `quit` listener's os._exit, with Locust's code.
    rc, out = _locust(served, tmp_path, "grpc", "--max-p99-ms", "0.001")
    assert rc == 1, out[-3000:]
    assert "thresholds failed: grpc recommend p99" in out


def test_loadtest_driver_serves_feedback(tmp_path):
    """`python -m loadtest.run` (make loadtest): own server, event log, feedback task."""
    if not (layout.SOURCE_REPO / "feedback" / layout.CONFIG_FILE).exists():
        pytest.skip("no feedback model in model_repository/")
    cmd = [sys.executable, "-m", "loadtest.run", "--tiny", "--protocol", "grpc"]
    cmd += ["--users", "4", "--spawn-rate", "4", "--run-time", "5s", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    stats = _stats(tmp_path / "locust_stats.csv")
    assert int(stats["feedback"]["Request Count"]) > 0, out[-2000:]
    assert int(stats["feedback"]["Failure Count"]) == 0
    assert int(stats["recommend"]["Failure Count"]) == 0
    assert (tmp_path / "locust.html").exists() and (tmp_path / "tritonserver.log").exists()


def _northstar(*args: str) -> str:
    """Run the CLI under a hard timeout; its stdout and stderr, after asserting exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "northstar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def test_bench_smoke_produces_every_row(tmp_path):
    """`northstar bench --tiny`: rows (a)-(e) and (g), the checks, JSON, PNG and HTML."""
    out = _northstar("bench", "--tiny", "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench.json").read_text())
    (size,) = result["sizes"]
    rows = size["rows"]
    assert {r["row"] for r in rows} == set("abcdeg")
    for r in rows:
        assert r["qps"] > 0 and r["failures"] == 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0, r
    assert [r["concurrency"] for r in rows if r["row"] == "c"] == [1, 4]
    assert {c["name"] for c in size["checks"]} >= {"(b)/(a)", "(e)/(a)", "(c)/(d) p50 @1"}
    assert "untrained" in result["weights"]
    assert "(b)/(a)" in out and "targets:" in out  # the printed table
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (tmp_path / "bench.html").read_text()


def test_bench_online_smoke_puts_both_feature_paths_side_by_side(tmp_path):
    """`northstar bench-online` at a small size: every table, snapshot and Redis rows for
    each concurrency, and the page with its plot."""
    sets = [
        "lookup_users=2000",
        "lookup_batches=20",
        "stream_events=20000",
        "stream_rate=5000",
        "stream_seconds=2",
        "world=tiny",
        "concurrency=1,4",
        "duration_s=2",
    ]
    out = _northstar("bench-online", "--out", str(tmp_path), "--set", *sets)
    res = json.loads((tmp_path / "bench-online.json").read_text())
    assert set(res["lookup"]["p50_ms"]) == {"snapshot", "redis", "cached"}
    assert res["stream"]["ingest"]["events"] == 20000
    rows = {(r["features"], r["concurrency"]): r for r in res["recommend"]}
    assert set(rows) == {(f, c) for f in ("snapshot", "redis") for c in (1, 4)}
    for r in rows.values():
        assert r["qps"] > 0 and r["failures"] == 0, r
    assert "redis ÷ snapshot" in out  # the printed side-by-side table
    assert (tmp_path / "bench-online.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (tmp_path / "bench-online.html").read_text()
