"""Locust and the benchmark against real servers, each under a hard subprocess timeout.

Locust with gRPC on gevent can hang after its summary, so every run here is a
subprocess with a timeout; the locustfile's `quit` listener makes it exit on its own.

The Locust runs are judged on answers, never on speed: the p99 threshold is off (NO_P99),
every response is checked (loadtest/answers.py: k distinct unseen catalogue ids per
slate, ordered top items per retrieval row) and a wrong one is a failed request. The
timeouts only bound a hang.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.run import LOCUST_CONF, LOCUSTFILE, USER_CLASSES
from serving import repository as layout
from training.run import load_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCUST_TIMEOUT_S = 300  # a 5-second run plus start-up; only a hang gets near it
NO_P99 = ("--max-p99-ms", "inf")  # latency is measured by the benchmark, never asserted
ANSWERS = re.compile(r"answers checked: (.*); wrong (\d+)")


def _catalogue(served, path: Path) -> Path:
    """The served catalogue's raw item ids, for Locust's --catalogue."""
    np.save(path, np.asarray(load_run(served.run).vocab.item_ids, dtype=np.int64))
    return path


def _answers(out: str) -> tuple[dict[str, int], int]:
    """Locust's closing "answers checked: NAME N, ...; wrong W" line: ({name: N}, W)."""
    m = ANSWERS.search(out)
    assert m, out[-3000:]
    checked = dict(part.rsplit(" ", 1) for part in m.group(1).split(", "))
    return {name: int(n) for name, n in checked.items()}, int(m.group(2))


def _locust(served, tmp_path: Path, protocol: str, *extra: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "locust", "--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE)]
    cmd += ["--headless", "--users", "4", "--spawn-rate", "4", "--run-time", "5s"]
    cmd += ["--grpc-url", served.grpc_url, "--http-url", served.http_url]
    cmd += ["--repo", str(served.repo), "--retrieval-batch", "8", *NO_P99]
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
def test_locust_headless_run_gets_right_answers(served, tmp_path, protocol):
    catalogue = _catalogue(served, tmp_path / "catalogue.npy")
    rc, out = _locust(served, tmp_path, protocol, "--catalogue", str(catalogue))
    stats = _stats(tmp_path / f"{protocol}_stats.csv")
    checked, wrong = _answers(out)
    assert wrong == 0, out[-3000:]
    for name in ("recommend", "retrieval[8]"):
        assert int(stats[name]["Failure Count"]) == 0, out[-3000:]
        assert int(stats[name]["Request Count"]) > 0, (name, out[-3000:])
        # Every request that got a response had its answer checked.
        assert checked[name] == int(stats[name]["Request Count"]), (checked, out[-3000:])
        assert stats[name]["Type"] == protocol
    assert rc == 0, out[-3000:]  # no failure, and requests were made (p99 is off)
    assert (tmp_path / f"{protocol}.html").stat().st_size > 10_000  # Locust's HTML report


def test_locust_counts_wrong_answers_as_failures(served, tmp_path):
    """The answer check can fail: against a catalogue the server does not serve, every
    answer is wrong, Locust fails those requests, and the exit code says so (gRPC: through
    the `quit` listener's os._exit, with Locust's code)."""
    items = np.asarray(load_run(served.run).vocab.item_ids, dtype=np.int64)
    np.save(tmp_path / "other.npy", items + int(items.max()) + 1)
    rc, out = _locust(served, tmp_path, "grpc", "--catalogue", str(tmp_path / "other.npy"))
    stats = _stats(tmp_path / "grpc_stats.csv")
    checked, wrong = _answers(out)
    assert wrong == sum(checked.values()) > 0, out[-3000:]
    for name in ("recommend", "retrieval[8]"):
        assert int(stats[name]["Failure Count"]) == int(stats[name]["Request Count"]) > 0
    assert "ids not in the catalogue" in out
    assert rc == 1, out[-3000:]


def test_loadtest_driver_serves_feedback(tmp_path):
    """`python -m loadtest.run` (make loadtest): own server, event log, feedback task."""
    if not (layout.SOURCE_REPO / "feedback" / layout.CONFIG_FILE).exists():
        pytest.skip("no feedback model in model_repository/")
    cmd = [sys.executable, "-m", "loadtest.run", "--tiny", "--protocol", "grpc"]
    cmd += ["--users", "4", "--spawn-rate", "4", "--run-time", "5s", "--out", str(tmp_path)]
    cmd += ["--", *NO_P99]  # passed on to Locust: answers are judged, not latency
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480, check=False)
    out = proc.stdout + proc.stderr
    stats = _stats(tmp_path / "locust_stats.csv")
    assert int(stats["feedback"]["Request Count"]) > 0, out[-2000:]
    assert int(stats["feedback"]["Failure Count"]) == 0, out[-2000:]
    assert int(stats["recommend"]["Failure Count"]) == 0, out[-2000:]
    assert int(stats["recommend"]["Request Count"]) > 0, out[-2000:]
    assert proc.returncode == 0, out[-3000:]
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
