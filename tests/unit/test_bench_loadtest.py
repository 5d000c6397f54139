"""loadtest/ without servers: user sampling, the load generator's bookkeeping, the targets,
the report files, the driver's command line and the Locust thresholds.

Nothing here imports locust: its import monkey-patches gevent into the test process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from loadtest import report
from loadtest.loadgen import LoadSpec, drive, infer_request, summarize
from loadtest.run import USER_CLASSES, locust_command, parse_run_time
from loadtest.thresholds import threshold_failures
from loadtest.users import UNKNOWN_ID_BASE, UserSampler, known_user_ids

# ----------------------------------------------------------------------------- users


def test_sampler_is_zipf_skewed_with_unknown_share():
    known = np.arange(1000, 11_000, dtype=np.int64)  # 10k users
    s = UserSampler.build(known, zipf_a=0.8, unknown_share=0.05, seed=3)
    ids = s.sample(200_000, np.random.default_rng(0))
    unknown = ids >= UNKNOWN_ID_BASE
    assert abs(unknown.mean() - 0.05) < 0.005
    assert np.isin(ids[~unknown], known).all()
    # Rank r has P = r**-0.8 / H(10k, 0.8): 3.7% for rank 1, 30% for the top 100 (1%).
    counts = pd.Series(ids[~unknown]).value_counts().to_numpy()
    assert counts[0] / counts.sum() == pytest.approx(0.037, abs=0.003)
    assert counts[:100].sum() / counts.sum() == pytest.approx(0.30, abs=0.01)
    # The most popular user is not simply the smallest id: ranks are shuffled once.
    assert pd.Series(ids[~unknown]).value_counts().index[0] == s.known[0]


def test_sampler_uniform_deterministic_and_validated():
    known = np.array([5, 7, 9], dtype=np.int64)
    s = UserSampler.build(known, zipf_a=0.0, unknown_share=0.0)
    a = s.sample(30_000, np.random.default_rng(1))
    b = s.sample(30_000, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    share = np.bincount(np.searchsorted(known, a)) / len(a)
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)
    only_unknown = UserSampler.build(np.zeros(0, np.int64), unknown_share=1.0)
    assert (only_unknown.sample(10, np.random.default_rng(0)) >= UNKNOWN_ID_BASE).all()
    with pytest.raises(ValueError, match="no known users"):
        UserSampler.build(np.zeros(0, np.int64), unknown_share=0.5)
    with pytest.raises(ValueError, match="unknown_share"):
        UserSampler.build(known, unknown_share=1.5)


def test_known_users_from_parquet(tmp_path):
    path = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": [3, 1, 2], "gender": ["f", "m", "x"]}).to_parquet(path)
    np.testing.assert_array_equal(known_user_ids(users=path), [3, 1, 2])
    with pytest.raises(ValueError, match="repository or a users parquet"):
        known_user_ids()


# ----------------------------------------------------------------------------- loadgen


def test_summarize_hand_computed():
    # 4 successes of 10, 20, 30, 40 ms and 1 failure over a 2-second window, 8 rows each.
    r = summarize([0.01, 0.02, 0.03, 0.04], 1, 2.0, concurrency=3, rows_per_request=8)
    assert r.requests == 5 and r.failures == 1
    assert r.rps == pytest.approx(2.0) and r.qps == pytest.approx(16.0)
    assert r.p50_ms == pytest.approx(25.0)  # numpy's linear interpolation
    assert r.p99_ms == pytest.approx(39.7)
    assert r.mean_ms == pytest.approx(25.0) and r.max_ms == pytest.approx(40.0)
    empty = summarize([], 2, 1.0, concurrency=1, rows_per_request=1)
    assert empty.qps == 0 and np.isnan(empty.p99_ms) and empty.requests == 2


def test_infer_request_round_trips():
    from tritonclient.grpc import service_pb2

    payload = infer_request(
        "recommend",
        {"user_id": np.array([[42]], np.int64), "k": np.array([[5]], np.int32)},
        ("item_ids", "scores"),
    )
    req = service_pb2.ModelInferRequest.FromString(payload)
    assert req.model_name == "recommend" and req.model_version == ""
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [
        ("user_id", "INT64", [1, 1]),
        ("k", "INT32", [1, 1]),
    ]
    assert np.frombuffer(req.raw_input_contents[0], np.int64)[0] == 42
    assert [o.name for o in req.outputs] == ["item_ids", "scores"]


def test_drive_closed_loop_counts_window_only():
    calls = []

    async def call(payload):
        calls.append(payload)
        await asyncio.sleep(0.005)
        if payload == "bad":
            raise RuntimeError("boom")

    spec = LoadSpec("grpc", "", ("a", "b", "bad"), 2, 3, duration_s=0.3, warmup_s=0.1)
    r = asyncio.run(drive(call, spec))
    assert r.concurrency == 3 and r.window_s == pytest.approx(0.3)
    # Each worker cycles the payloads from its own offset: a third of the calls fail.
    assert r.failures > 0 and r.requests - r.failures > r.failures
    assert r.requests < len(calls)  # warmup calls are not counted
    assert r.first_error == "RuntimeError: boom"
    assert r.qps == pytest.approx(2 * r.rps)
    assert r.p50_ms > 4  # at least the fake call's sleep; no upper bound (a loaded machine)


def test_a_server_slower_than_the_window_still_gives_a_measurement():
    """A request longer than the whole window (a busy machine, a smoke run) is counted and the
    window reports how long it really stayed open, instead of zero requests."""

    async def call(payload):
        await asyncio.sleep(0.25)

    spec = LoadSpec("grpc", "", ("a",), 1, 1, duration_s=0.05, warmup_s=0.0)
    r = asyncio.run(drive(call, spec))
    assert r.requests == 1 and r.failures == 0 and r.qps > 0
    assert r.window_s >= 0.25 and r.p50_ms >= 250
    assert r.rps == pytest.approx(1 / r.window_s)


# ----------------------------------------------------------------------------- report


def _r(row, qps, p99, conc=1, p50=None, **extra):
    return {
        "row": row,
        "what": f"row {row}",
        "concurrency": conc,
        "qps": qps,
        "p50_ms": p50 if p50 is not None else p99 / 2,
        "p99_ms": p99,
        "failures": 0,
        "loadavg": [1.0, 1.0, 1.0],
        **extra,
    }


def _rows(b_qps=950.0, c64=(520.0, 45.0), d_qps=50.0):
    return [
        _r("a", 1000.0, 80.0),
        _r("e", 300.0, 200.0),
        _r("b", b_qps, 120.0, conc=2),
        _r("c", 400.0, 30.0, conc=16),
        _r("c", 480.0, 60.0, conc=32),
        _r("c", *c64, conc=64),
        _r("d", d_qps, 500.0, conc=16),
        _r("d", d_qps, 900.0, conc=64),
    ]


def test_checks_pass_and_fail():
    by = {c["name"]: c for c in report.checks(_rows())}
    assert by["(b)/(a)"]["ok"] and by["(b)/(a)"]["value"] == pytest.approx(0.95)
    # conc 32 misses p99, conc 64 makes it: the best level within 50 ms is judged.
    c = by["(c)@>=32 / (a)"]
    assert c["ok"] and c["value"] == pytest.approx(0.52) and "concurrency 64" in c["text"]
    # 400/50 = 8x at 16 and 520/50 = 10.4x at 64 (32 has no naive level): the worst counts.
    assert by["(c)/(d)"]["ok"] and by["(c)/(d)"]["value"] == pytest.approx(8.0)
    assert by["(c)/(d)"]["text"] == "8.0x @16, 10.4x @64"
    assert by["(e)/(a)"]["ok"] is None

    bad = {c["name"]: c for c in report.checks(_rows(b_qps=800.0, c64=(700.0, 80.0)))}
    assert not bad["(b)/(a)"]["ok"]
    assert not bad["(c)@>=32 / (a)"]["ok"]  # fast enough but no level within 50 ms
    slow = {c["name"]: c for c in report.checks(_rows(d_qps=200.0))}
    assert not slow["(c)/(d)"]["ok"]  # 400 / 200 = 2x at concurrency 16


def test_checks_skip_what_was_not_measured():
    assert report.checks([_r("a", 1000.0, 80.0)]) == []
    assert [c["name"] for c in report.checks(_rows()[:3])] == ["(b)/(a)", "(e)/(a)"]


def _result(rows):
    return {
        "label": "unit",
        "started": "2026-01-01T00:00:00+00:00",
        "machine": {"cpus": 2, "cpu": "test cpu"},
        "loadavg_start": [1.0, 2.0, 3.0],
        "loadavg_end": [1.5, 2.0, 3.0],
        "weights": "untrained (random init): throughput only",
        "sizes": [{"n_items": 1000, "graph_k": 20, "rows": rows, "checks": report.checks(rows)}],
    }


def test_table_plot_and_html(tmp_path):
    rows = _rows()
    rows[3].update(recommend_avg_batch=5.5, retrieval_avg_batch=5.5, server_cpu_share=0.6)
    result = _result(rows)
    table = report.table_rows(rows)
    assert table[0][:4] == ["row", "what", "conc", "q/s"]
    assert table[3][6] == "0.95"  # (b) vs (a)
    assert table[4][8] == "5.5/5.5" and table[4][9] == "60%"
    text = report.format_table(result)
    assert "1,000 items" in text and "PASS  (b)/(a)" in text and "load avg at start 1.00" in text
    png = report.plot(result, tmp_path / "bench.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    html = report.write_html(result, tmp_path / "bench.html", png).read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "PASS" in html
    json.dumps(result)  # the result stays JSON-serialisable


# ----------------------------------------------------------------------------- driver, CLI


def test_parse_run_time():
    assert parse_run_time("30s") == 30
    assert parse_run_time("2m") == 120
    assert parse_run_time("1h30m5s") == 5405
    assert parse_run_time("45") == 45
    for bad in ("10x", "5m3"):
        with pytest.raises(ValueError):
            parse_run_time(bad)


def test_locust_command(tmp_path):
    cmd = locust_command(
        grpc_url="h:1",
        http_url="h:2",
        repo="r",
        out=tmp_path,
        protocol="grpc",
        users=4,
        run_time="5s",
        extra=["--k", "5"],
    )
    assert cmd[1:3] == ["-m", "locust"] and "--headless" in cmd
    assert cmd[cmd.index("--grpc-url") + 1] == "h:1"
    assert cmd[cmd.index("--csv") + 1] == str(tmp_path / "locust")
    assert cmd[cmd.index("--users") + 1] == "4" and "--spawn-rate" not in cmd
    assert cmd[-3:] == ["--k", "5", "TritonGrpcUser"]
    assert USER_CLASSES["both"] == ["TritonGrpcUser", "TritonHttpUser"]


def _bench_args(**kw):
    base = dict(
        items=None,
        out=None,
        run=None,
        repo=None,
        duration=None,
        concurrency=None,
        label=None,
        tiny=False,
        config=None,
        set=[],
    )
    return argparse.Namespace(**{**base, **kw})


def test_bench_config_from_flags():
    from loadtest.cli import bench_config

    cfg = bench_config(
        _bench_args(
            items=[100_000, 1_000_000],
            concurrency="8,32",
            set=["recommend.instances=1", "retrieval.max_queue_delay_us=200", "rows=a,c"],
        )
    )
    assert cfg.items == (100_000, 1_000_000) and cfg.concurrency == (8, 32)
    assert cfg.recommend.instances == 1 and cfg.retrieval.max_queue_delay_us == 200
    assert cfg.rows == ("a", "c") and not cfg.tiny
    tiny = bench_config(_bench_args(tiny=True, out="x", set=["duration_s=0.2"]))
    assert tiny.tiny and tiny.out == "x" and tiny.duration_s == 0.2
    assert tiny.concurrency == (1, 4) and tiny.items == (500,)


def test_bench_registered_in_cli():
    from northstar.cli import build_parser

    args = build_parser().parse_args(["bench", "--tiny", "--set", "label=x"])
    assert args.command == "bench" and args.tiny and args.set == ["label=x"]


# ----------------------------------------------------------------------------- thresholds


def _entry(name, method, n, fails, p99):
    return SimpleNamespace(
        name=name,
        method=method,
        num_requests=n,
        num_failures=fails,
        fail_ratio=fails / n if n else 0.0,
        get_response_time_percentile=lambda q, p99=p99: p99,
    )


def _stats(*entries):
    n = sum(e.num_requests for e in entries)
    f = sum(e.num_failures for e in entries)
    total = _entry("Aggregated", "", n, f, 0)
    return SimpleNamespace(total=total, entries={(e.name, e.method): e for e in entries})


def test_thresholds():
    ok = _stats(
        _entry("recommend", "grpc", 100, 0, 40), _entry("retrieval[64]", "grpc", 10, 0, 900)
    )
    assert threshold_failures(ok, max_p99_ms=50, max_fail_ratio=0.01) == []  # retrieval exempt
    slow = _stats(_entry("recommend", "http", 100, 0, 80))
    assert threshold_failures(slow, max_p99_ms=50, max_fail_ratio=0.01) == [
        "http recommend p99 80 ms > 50 ms"
    ]
    failing = _stats(_entry("recommend", "grpc", 100, 5, 10))
    (msg,) = threshold_failures(failing, max_p99_ms=50, max_fail_ratio=0.01)
    assert msg.startswith("failure ratio 0.0500")
    assert threshold_failures(_stats(), max_p99_ms=50, max_fail_ratio=0.01) == [
        "no requests were made"
    ]


def test_ceiling_is_the_mean_of_a_measurements():
    rows = [*_rows(), _r("a", 1400.0, 80.0)]  # (a) measured again at the end: mean 1200
    assert report.ceiling(rows) == {"qps": 1200.0}
    by = {c["name"]: c for c in report.checks(rows)}
    assert by["(b)/(a)"]["value"] == pytest.approx(950 / 1200)
    assert report.table_rows(rows)[3][6] == f"{950 / 1200:.2f}"


def test_load_spec_travels_to_the_child_as_json_not_pickle():
    from loadtest.loadgen import _spec_from_json, _spec_to_json

    grpc = LoadSpec("grpc", "h:1", (b"\x00\xffraw", b""), 4, 8, duration_s=1.0)
    http = LoadSpec("http", "http://h:2", ("/v2/models/x/infer",), 1, 2, duration_s=1.0)
    for spec in (grpc, http):
        assert _spec_from_json(_spec_to_json(spec)) == spec
