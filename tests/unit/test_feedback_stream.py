"""The feedback stream on a real redis-server: produce, consume into SQLite, recover, trim, lag.

Never a mocked Redis. Loops with deadlines bound hangs only; nothing here is timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feedback.consume import (
    INTERACTION_FRAME_COLUMNS,
    KILL_AFTER_COMMIT_ENV,
    ConsumerConfig,
    EmbeddedStreamSink,
    LogWriter,
    StreamConsumer,
    interactions_handler,
)
from feedback.events import IMPRESSION, INTERACTION
from feedback.ids import uuid7_batch
from feedback.lag import format_lag, lag_metrics, stream_lag
from feedback.sink import SqliteEventLog, impression_rows, open_sink, open_source
from feedback.stream import StreamConfig, StreamSink, connect, partition_of, trim

ROOT = Path(__file__).resolve().parents[2]
NOW = time.time()
HANG_S = 120.0  # bound on a hang, never a timing assertion


def _interactions(n: int, seed: int = 0, users: int = 50) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "event_id": uuid7_batch(n, rng=rng),
        "user_id": rng.integers(0, users, n),
        "item_id": rng.integers(0, 1000, n),
        "type": rng.choice(np.asarray(["click", "watch", "like"], dtype=object), n),
        "value": rng.random(n),  # 0..1: a click or like is bounded at 1
        "ts": np.full(n, NOW),
        "request_id": np.full(n, "", dtype=object),
    }


def _impressions(b: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return impression_rows(
        request_ids=uuid7_batch(b, rng=rng),
        user_ids=rng.integers(0, 50, b),
        item_ids=rng.integers(0, 1000, (b, 5)),
        scores=rng.random((b, 5)),
        model_version=3,
        ts=NOW,
    )


def _cfg(redis_server, **kw) -> StreamConfig:
    return StreamConfig.from_url(redis_server.url, partitions=kw.pop("partitions", 3), **kw)


def _drain(cfg: StreamConfig, log: SqliteEventLog, **kw) -> StreamConsumer:
    c = StreamConsumer(cfg, ConsumerConfig(consumer=kw.pop("consumer", "t"), **kw), LogWriter(log))
    c.run(until_idle=True)
    return c


def _log_group(cfg: StreamConfig, group: str = "log"):
    return [g for g in stream_lag(connect(cfg), cfg) if g.group == group]


# ---------------------------------------------------------------------------- no server


def test_partition_is_a_function_of_the_user():
    users = np.arange(10_000, dtype=np.int64)
    p = partition_of(users, 4)
    assert p.min() == 0 and p.max() == 3
    assert np.array_equal(p, partition_of(users, 4))
    counts = np.bincount(p)
    assert counts.min() > 2_000  # spread, not all in one
    # structured ids (all even) still spread
    assert len(np.unique(partition_of(users * 2, 4))) == 4


def test_stream_config_from_url_takes_its_own_parameters():
    cfg = StreamConfig.from_url("redis://h:1/2?prefix=x&partitions=8&socket_keepalive=true")
    assert cfg.prefix == "x" and cfg.partitions == 8
    assert cfg.url == "redis://h:1/2?socket_keepalive=true"
    assert cfg.stream_key(7) == "x:events:7"


def test_embedded_sink_feeds_the_same_handler(tmp_path):
    frames: list[pd.DataFrame] = []
    with SqliteEventLog(tmp_path / "e.db") as log:
        sink = EmbeddedStreamSink(log, [interactions_handler(frames.append)])
        rows = _interactions(20)
        rows["type"][0] = "nope"
        res = sink.write_interactions(rows)
        assert res.inserted == 19 and res.reasons[0] == "type: not one of click|watch|like"
        assert log.count(INTERACTION) == 19
    assert list(frames[0].columns) == list(INTERACTION_FRAME_COLUMNS)
    assert len(frames[0]) == 19 and frames[0]["user_id"].dtype == np.int64


# ---------------------------------------------------------------------------- real redis


@pytest.mark.integration
def test_round_trip_every_event_once(redis_server, tmp_path):
    sink = open_sink(redis_server.url + "?partitions=3")
    assert isinstance(sink, StreamSink)
    imps = _impressions(200)
    ints = _interactions(3000)
    r1 = sink.write_impressions(imps)
    r2 = sink.write_interactions(ints)
    assert (r1.inserted, r1.duplicates, r1.quarantined) == (1000, 0, 0)
    assert r2.accepted.all() and r2.inserted == 3000
    with SqliteEventLog(tmp_path / "events.db") as log:
        c = _drain(sink.cfg, log)
        assert c.stats.events == 4000
        got = log.read(INTERACTION)
        assert sorted(got["event_id"]) == sorted(ints["event_id"])
        assert sorted(log.read(IMPRESSION)["event_id"]) == sorted(imps["event_id"])
        assert log.quarantine_counts() == {}
        # values survive the wire exactly
        want = pd.DataFrame(ints).set_index("event_id").sort_index()
        have = got.set_index("event_id").sort_index()
        assert np.array_equal(have["value"].to_numpy(), want["value"].to_numpy())
        assert np.array_equal(have["user_id"].to_numpy(), want["user_id"].to_numpy())
    with pytest.raises(ValueError, match="not readable by the join"):
        open_source(redis_server.url)


@pytest.mark.integration
def test_duplicate_replay_is_acknowledged_and_stored_once(redis_server, tmp_path):
    cfg = _cfg(redis_server)
    sink = StreamSink(cfg)
    rows = _interactions(500)
    first, again = sink.write_interactions(rows), sink.write_interactions(rows)
    assert first.accepted.all() and again.accepted.all()
    conflict = {k: v[:1].copy() for k, v in rows.items()}
    conflict["item_id"] = conflict["item_id"] + 1  # same event_id, other content
    sink.write_interactions(conflict)
    with SqliteEventLog(tmp_path / "events.db") as log:
        _drain(cfg, log)
        assert log.count(INTERACTION) == 500
        assert log.quarantine_counts() == {
            INTERACTION: {"event_id: already stored with different content": 1}
        }


@pytest.mark.integration
def test_bad_rows_refused_with_reasons_then_quarantined(redis_server, tmp_path):
    cfg = _cfg(redis_server)
    rows = _interactions(10)
    rows["type"][2] = "purchase"
    rows["user_id"] = rows["user_id"].astype(object)
    rows["user_id"][5] = "u5"
    rows["ts"][7] = NOW + 10 * 86_400
    res = StreamSink(cfg).write_interactions(rows)
    assert res.inserted == 7 and res.quarantined == 3
    assert res.reasons[2] == "type: not one of click|watch|like"
    assert res.reasons[5] == "user_id: not an integer"
    assert res.reasons[7].startswith("ts: ")
    assert not res.accepted[[2, 5, 7]].any() and res.accepted.sum() == 7
    with SqliteEventLog(tmp_path / "events.db") as log:
        _drain(cfg, log)
        assert log.count(INTERACTION) == 7
        q = log.quarantined()
        assert sorted(q["reason"]) == sorted(res.reasons[i] for i in (2, 5, 7))
        assert json.loads(q[q["reason"] == "user_id: not an integer"]["payload"].iloc[0])[
            "user_id"
        ] == ("u5")


@pytest.mark.integration
def test_malformed_entries_are_quarantined_and_do_not_block(redis_server, tmp_path):
    cfg = _cfg(redis_server, partitions=1)
    sink = StreamSink(cfg)
    sink.write_interactions(_interactions(10, seed=1))
    client = connect(cfg)
    key = cfg.stream_key(0)
    client.xadd(key, {"garbage": b"\xff\x00"})
    client.xadd(key, {"kind": "interaction", "v": "1", "n": "3", "data": b"not arrow"})
    client.xadd(key, {"kind": "interaction", "v": "1", "n": "x", "data": b""})
    client.xadd(key, {"kind": "quarantine", "v": "1", "n": "1", "data": b"{]"})
    sink.write_interactions(_interactions(10, seed=2))  # after the garbage: still stored
    with SqliteEventLog(tmp_path / "events.db") as log:
        c = _drain(cfg, log)
        assert log.count(INTERACTION) == 20
        assert log.quarantine_counts() == {
            "stream": {
                "stream entry: kind is not impression|interaction|quarantine": 1,
                "stream entry: quarantine data is not [kind, reason, payload]s": 1,
            },
            INTERACTION: {
                "stream entry: data is not an Arrow IPC stream": 1,
                "stream entry: n is not an integer": 1,
            },
        }
        assert c.stats.errors == 0
        payload = json.loads(log.quarantined()["payload"].iloc[0])
        assert payload["stream"] == key and "garbage" in payload["fields"]
    assert all(g.lag == 0 and g.pending == 0 for g in _log_group(cfg))


def _consume_cmd(url: str, log: Path, consumer: str) -> list[str]:
    return [
        sys.executable, "-m", "northstar", "feedback", "consume",
        "--url", url, "--log", str(log), "--consumer", consumer,
        "--set", "count=2", "block_ms=100", "progress_every_s=0",
    ]  # fmt: skip


@pytest.mark.integration
def test_consumer_sigkilled_between_commit_and_ack_then_restarted(redis_server, tmp_path):
    url = redis_server.url + "?partitions=2"
    cfg = StreamConfig.from_url(url)
    sink = StreamSink(cfg)
    bad = _interactions(30, seed=99)
    bad["type"][:3] = "nope"  # a quarantine entry travels too: it must not double either
    sink.write_interactions(bad)
    want = list(bad["event_id"][3:])
    for s in range(20):
        rows = _interactions(100, seed=s)
        sink.write_interactions(rows)
        want += list(rows["event_id"])
    log_path = tmp_path / "events.db"
    env = {**os.environ, KILL_AFTER_COMMIT_ENV: "3"}
    crashed = subprocess.run(
        _consume_cmd(url, log_path, "c1"), env=env, cwd=ROOT, timeout=HANG_S, capture_output=True
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    # Killed after a commit and before its XACK: stored rows with entries still pending.
    with SqliteEventLog(log_path) as log:
        stored = log.count(INTERACTION)
    assert 0 < stored < len(want)
    assert sum(g.pending for g in _log_group(cfg)) > 0

    env.pop(KILL_AFTER_COMMIT_ENV)
    proc = subprocess.Popen(_consume_cmd(url, log_path, "c1"), env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            groups = _log_group(cfg)
            if groups and all(g.lag == 0 and g.pending == 0 for g in groups):
                break
            assert proc.poll() is None, "consumer exited"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_S) == 0  # graceful: finishes its batch, then exits
    finally:
        if proc.poll() is None:
            proc.kill()
    with SqliteEventLog(log_path) as log:
        got = log.read(INTERACTION)["event_id"]
        assert len(got) == len(want) and got.is_unique
        assert set(got) == set(want)
        assert log.quarantine_counts() == {INTERACTION: {"type: not one of click|watch|like": 3}}
    assert sum(g.events_behind for g in _log_group(cfg)) == 0


@pytest.mark.integration
def test_second_consumer_autoclaims_idle_pending(redis_server, tmp_path):
    cfg = _cfg(redis_server, partitions=2)
    sink = StreamSink(cfg)
    for s in range(4):
        sink.write_interactions(_interactions(50, seed=s))
    client = connect(cfg)
    # "dead" takes entries and dies without acknowledging them
    client.xreadgroup("log", "dead", dict.fromkeys(cfg.stream_keys(), ">"), count=100)
    assert sum(g.pending for g in _log_group(cfg)) == 8
    with SqliteEventLog(tmp_path / "events.db") as log:
        live = StreamConsumer(cfg, ConsumerConfig(consumer="live", min_idle_ms=0), LogWriter(log))
        assert live.poll(block_ms=0) == 0  # nothing new: all were delivered to "dead"
        assert live.claim_idle() == 8
        assert live.stats.claimed == 8
        assert log.count(INTERACTION) == 200
    assert all(g.pending == 0 and g.lag == 0 for g in _log_group(cfg))
    info = {c["name"]: c["pending"] for c in client.xinfo_consumers(cfg.stream_key(0), "log")}
    assert info[b"dead"] == 0


@pytest.mark.integration
def test_trim_keeps_what_a_lagging_group_has_not_acknowledged(redis_server, tmp_path):
    cfg = _cfg(redis_server, partitions=1, groups=("log", "features"))
    cfg = StreamConfig(**{**cfg.__dict__, "retain_entries": 2, "retain_s": float("inf")})
    sink = StreamSink(cfg)
    for s in range(10):
        sink.write_interactions(_interactions(20, seed=s))
    client = connect(cfg)
    key = cfg.stream_key(0)
    with SqliteEventLog(tmp_path / "events.db") as log:
        _drain(cfg, log, trim_every_s=0)
    assert trim(client, cfg) == {}  # "features" acknowledged nothing: all kept
    assert client.xlen(key) == 10
    seen: list[pd.DataFrame] = []
    feat = StreamConsumer(
        cfg,
        ConsumerConfig(group="features", consumer="f", count=4),
        interactions_handler(seen.append),
    )
    feat.poll(block_ms=0)  # acknowledges 4 entries
    client.xreadgroup("features", "f", {key: ">"}, count=1)  # a 5th: delivered, pending
    assert trim(client, cfg) == {0: 4}  # exactly below the oldest unacknowledged
    first = client.xrange(key, count=1)[0][0]
    assert first == client.xpending(key, "features")["min"]
    feat.run(until_idle=True)  # recovers its pending one, then the rest
    assert sum(len(f) for f in seen) == 200
    assert client.xlen(key) == 2  # acknowledged by all: only the retained newest two
    assert all(g.events_behind == 0 for g in stream_lag(client, cfg))


@pytest.mark.integration
def test_lag_numbers_match(redis_server, tmp_path):
    cfg = _cfg(redis_server, partitions=1)
    sink = StreamSink(cfg)
    sizes = [10, 20, 30, 40, 50, 60, 70]
    for i, n in enumerate(sizes):
        sink.write_interactions(_interactions(n, seed=i))
    (g,) = _log_group(cfg)
    assert (g.length, g.lag, g.pending, g.events_behind) == (7, 7, 0, sum(sizes))
    assert g.oldest_unacked_age_s >= 0
    with SqliteEventLog(tmp_path / "events.db") as log:
        c = StreamConsumer(cfg, ConsumerConfig(consumer="a", count=3), LogWriter(log))
        assert c.poll(block_ms=0) == 3
    connect(cfg).xreadgroup("log", "b", {cfg.stream_key(0): ">"}, count=2)
    (g,) = _log_group(cfg)
    assert (g.lag, g.pending, g.events_behind) == (2, 2, sum(sizes[3:]))
    text = lag_metrics([g])
    assert (
        'northstar_stream_lag_entries{partition="0",stream="northstar:events:0",group="log"} 2.0'
        in text
    )
    assert "northstar_stream_events_behind" in text and "# TYPE" in text
    table = format_lag([g])
    assert "log" in table and "events behind" in table

    url = redis_server.url + "?partitions=1"
    out = subprocess.run(
        [sys.executable, "-m", "northstar", "feedback", "lag", "--url", url, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["lag"], row["pending"], row["events_behind"]) == (2, 2, sum(sizes[3:]))


@pytest.mark.integration
def test_acknowledged_events_survive_redis_kill_9(redis_server, tmp_path):
    cfg = _cfg(redis_server)
    sink = StreamSink(cfg)
    want = []
    for s in range(5):
        rows = _interactions(200, seed=s)
        assert sink.write_interactions(rows).accepted.all()  # acknowledged
        want += list(rows["event_id"])
    sink.close()
    redis_server.kill()  # SIGKILL: no shutdown save; only the AOF (fsync always) remains
    redis_server.start()
    with SqliteEventLog(tmp_path / "events.db") as log:
        _drain(cfg, log)
        got = log.read(INTERACTION)["event_id"]
        assert sorted(got) == sorted(want)


@pytest.mark.integration
def test_stream_bench_smoke(redis_server, tmp_path):
    from feedback.bench import StreamBenchConfig, format_stream_bench, run_stream_bench

    res = run_stream_bench(
        StreamBenchConfig(
            events=2000,
            batch=500,
            partitions=2,
            rate=2000,
            seconds=1.0,
            url=redis_server.url,
            dir=str(tmp_path),
        )
    )
    assert res["drain"]["stored"] == 2000
    assert res["rate"]["stored"] == res["rate"]["events"]
    assert "stream ingest" in format_stream_bench(res)
