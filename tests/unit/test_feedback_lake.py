"""The Parquet lake: partitioned event files committed with their stream offsets.

Real redis-server for the stream paths; never a mocked store. Nothing here is timed.
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

from feedback.consume import KILL_AFTER_COMMIT_ENV, ConsumerConfig, LakeWriter, StreamConsumer
from feedback.events import IMPRESSION, INTERACTION
from feedback.ids import uuid7_batch
from feedback.join import JoinConfig, read_labels, read_statuses, run_join
from feedback.lake import COMMITS, ParquetLake, hour_of, is_lake, open_event_source
from feedback.sink import SqliteEventLog, impression_rows
from feedback.stream import StreamConfig, StreamSink, partition_of

ROOT = Path(__file__).resolve().parents[2]
T = 1_750_000_000.0
HANG_S = 120.0  # bound on a hang, never a timing assertion


def _impressions(b: int, seed: int, ts: float) -> dict:
    rng = np.random.default_rng(seed)
    return impression_rows(
        request_ids=uuid7_batch(b, rng=rng),
        user_ids=rng.integers(0, 40, b),
        item_ids=rng.integers(0, 500, (b, 4)),
        scores=rng.random((b, 4)),
        model_version=2,
        ts=ts + rng.random(b) * 7200,
    )


def _clicks(imps: dict, seed: int, frac: float = 0.3) -> dict:
    """Clicks on a share of the impressions, some with the request id, some late."""
    rng = np.random.default_rng(seed)
    n = len(imps["event_id"])
    pick = np.flatnonzero(rng.random(n) < frac)
    delay = rng.lognormal(np.log(90), 1.5, len(pick))
    with_req = rng.random(len(pick)) < 0.6
    kind = rng.choice(np.asarray(["click", "watch", "like"], dtype=object), len(pick))
    # Within each type's bounds: click and like 0..1, watch a number of seconds.
    value = np.where(kind == "watch", rng.random(len(pick)) * 30, 1.0)
    return {
        "event_id": uuid7_batch(len(pick), rng=rng),
        "user_id": np.asarray(imps["user_id"])[pick],
        "item_id": np.asarray(imps["item_id"])[pick],
        "type": kind,
        "value": value,
        "ts": np.asarray(imps["ts"])[pick] + delay,
        "request_id": np.where(with_req, np.asarray(imps["request_id"])[pick], "").astype(object),
    }


def test_what_is_a_lake(tmp_path):
    assert is_lake(tmp_path) and is_lake("s3://bucket/events") and is_lake("file:///x/y")
    assert is_lake(str(tmp_path / "new") + "/")
    assert not is_lake(tmp_path / "events.db") and not is_lake("sqlite:///x.db")
    assert not is_lake("redis://localhost:6379/0")
    assert isinstance(open_event_source(tmp_path / "events.db"), SqliteEventLog)
    assert isinstance(open_event_source(tmp_path), ParquetLake)
    assert list(hour_of(np.array([T, T + 3600]))) == ["2025-06-15T15", "2025-06-15T16"]


def test_files_are_partitioned_by_hour_and_user_bucket(tmp_path):
    lake = ParquetLake(tmp_path / "lake", buckets=4)
    imps = _impressions(50, 0, T)
    assert lake.write_impressions(imps).inserted == 200
    files = lake.files(IMPRESSION)
    assert len(files) > 4  # two or three hours times four buckets
    for f in files:
        df = lake.read_files(IMPRESSION, [f["path"]])
        assert f"hour={f['hour']}/bucket={f['bucket']:04d}/" in f["path"]
        assert set(hour_of(df["ts"].to_numpy())) == {f["hour"]}
        assert set(partition_of(df["user_id"].to_numpy(), 4)) == {f["bucket"]}
        assert (f["rows"], f["min_ts"], f["max_ts"]) == (len(df), df["ts"].min(), df["ts"].max())
    with pytest.raises(ValueError, match="4 buckets"):
        ParquetLake(tmp_path / "lake", buckets=8)


def test_a_resent_event_is_stored_once(tmp_path):
    lake = ParquetLake(tmp_path / "lake", buckets=4)
    imps = _impressions(30, 1, T)
    clicks = _clicks(imps, 1)
    lake.write_impressions(imps)
    first = lake.write_interactions(clicks)
    again = lake.write_interactions(clicks)  # a client retry after a lost response
    assert first.inserted == len(clicks["event_id"]) and first.duplicates == 0
    assert again.inserted == 0 and again.duplicates == len(clicks["event_id"])
    assert again.accepted.all()
    # One writer per lake; a restarted writer still dedupes: it reads the ids back.
    with pytest.raises(RuntimeError, match="another writer"):
        ParquetLake(tmp_path / "lake").write_interactions(clicks)
    lake.close()
    reopened = ParquetLake(tmp_path / "lake")
    assert reopened.write_interactions(clicks).duplicates == len(clicks["event_id"])
    got = reopened.read(INTERACTION)["event_id"]
    assert got.is_unique and set(got) == set(clicks["event_id"])


def test_bad_rows_are_quarantined_with_the_same_reasons_as_sqlite(tmp_path):
    rows = _clicks(_impressions(20, 2, T), 2, frac=0.5)
    rows["type"][:2] = "nope"
    rows["ts"][2] = 5.0
    lake = ParquetLake(tmp_path / "lake", buckets=2)
    db = SqliteEventLog(tmp_path / "events.db")
    a, b = lake.write_interactions(rows), db.write_interactions(rows)
    assert a.reasons == b.reasons and a.quarantined == 3
    assert lake.quarantine_counts() == db.quarantine_counts()


def test_a_file_without_its_commit_record_is_invisible_and_the_retry_replaces_it(
    tmp_path, monkeypatch
):
    lake = ParquetLake(tmp_path / "lake", buckets=2)
    imps = _impressions(20, 3, T)
    lake.write_impressions(imps)
    clicks = _clicks(imps, 3)
    real_put = ParquetLake._put

    def crash_at_commit(self, rel, data):
        if rel.startswith(COMMITS):
            raise OSError("killed before the commit record")
        real_put(self, rel, data)

    monkeypatch.setattr(ParquetLake, "_put", crash_at_commit)
    with pytest.raises(OSError):
        lake.write_interactions(clicks)
    monkeypatch.setattr(ParquetLake, "_put", real_put)
    lake.close()  # the writer is gone; a new one takes over
    orphans = list((tmp_path / "lake" / INTERACTION).rglob("c000000000002.parquet"))
    assert orphans  # the data files are there...
    fresh = ParquetLake(tmp_path / "lake")
    assert fresh.snapshot()[INTERACTION] == 1 and fresh.count(INTERACTION) == 0  # ...unread
    assert fresh.write_interactions(clicks).inserted == len(clicks["event_id"])
    assert fresh.count(INTERACTION) == len(clicks["event_id"])
    assert fresh.read(INTERACTION)["event_id"].is_unique


def _feed(writers, seed: int, ts: float) -> None:
    imps = _impressions(60, seed, ts)
    clicks = _clicks(imps, seed)
    for w in writers:
        w.write_impressions(imps)
        w.write_interactions(clicks)


def _same_join(a: Path, b: Path) -> None:
    la = read_labels(a).sort_values("event_id").reset_index(drop=True)
    lb = read_labels(b).sort_values("event_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(la, lb)
    sa = read_statuses(a).sort_values("event_id").reset_index(drop=True)
    sb = read_statuses(b).sort_values("event_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(sa, sb)


@pytest.mark.parametrize("url", ["path", "file"])
def test_the_join_reads_a_lake_as_it_reads_sqlite(tmp_path, url):
    db = SqliteEventLog(tmp_path / "events.db")
    root = tmp_path / "lake"
    lake = ParquetLake(root.as_uri() if url == "file" else root, buckets=4)
    for run, seed in enumerate([10, 11, 12]):
        _feed([db, lake], seed, T + run * 3600)
        for log, out in [(db.path, "a"), (lake.url, "b")]:
            rep = run_join(JoinConfig(log=str(log), out=str(tmp_path / out)))
            assert not rep.noop
        _same_join(tmp_path / "a", tmp_path / "b")
    again = run_join(JoinConfig(log=lake.url, out=str(tmp_path / "b")))
    assert again.noop
    assert sum(read_statuses(tmp_path / "b")["status"].value_counts()) == db.count(INTERACTION)


def _round_trip(redis_server):
    url = redis_server.url + "?partitions=2"
    cfg = StreamConfig.from_url(url)
    sink = StreamSink(cfg)
    bad = _clicks(_impressions(20, 98, T), 98, frac=0.5)
    bad["type"][:3] = "nope"
    sink.write_interactions(bad)
    want_imps, want_clicks = [], list(bad["event_id"][3:])
    for s in range(12):
        imps = _impressions(10, s, T)
        clicks = _clicks(imps, s)
        sink.write_impressions(imps)
        sink.write_interactions(clicks)
        want_imps += list(imps["event_id"])
        want_clicks += list(clicks["event_id"])
    return url, cfg, want_imps, want_clicks


def test_consumer_writes_the_lake_once_with_offsets(redis_server, tmp_path):
    _url, cfg, want_imps, want_clicks = _round_trip(redis_server)
    lake = ParquetLake(tmp_path / "lake", buckets=4)
    c = StreamConsumer(cfg, ConsumerConfig(consumer="t", count=3), LakeWriter(lake))
    c.run(until_idle=True)
    assert set(lake.offsets()) == set(cfg.stream_keys())
    got = lake.read(INTERACTION)["event_id"]
    assert got.is_unique and set(got) == set(want_clicks)
    assert set(lake.read(IMPRESSION)["event_id"]) == set(want_imps)
    assert lake.quarantine_counts() == {INTERACTION: {"type: not one of click|watch|like": 3}}
    # A redelivered batch (crash after the commit, before the XACK) is skipped whole.
    entries_before = lake.last_seq()
    from feedback.stream import connect, decode_entry

    client = connect(cfg)
    replay = [
        decode_entry(key, i.decode(), fields)
        for key in cfg.stream_keys()
        for i, fields in client.xrange(key, count=5)
    ]
    w = lake.write_upstream(replay)
    assert w.seq is None and w.skipped_entries == len(replay)
    assert lake.last_seq() == entries_before


@pytest.mark.integration
def test_consumer_sigkilled_between_commit_and_ack_writes_the_lake_once(redis_server, tmp_path):
    url, _cfg, want_imps, want_clicks = _round_trip(redis_server)
    root = tmp_path / "lake"
    ParquetLake(root, buckets=4)
    cmd = [
        sys.executable, "-m", "northstar", "feedback", "consume", "--url", url,
        "--log", str(root), "--consumer", "c1",
        "--set", "count=2", "block_ms=100", "progress_every_s=0",
    ]  # fmt: skip
    env = {**os.environ, KILL_AFTER_COMMIT_ENV: "3"}
    crashed = subprocess.run(cmd, env=env, cwd=ROOT, timeout=HANG_S, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    assert 0 < ParquetLake(root).count(INTERACTION) < len(want_clicks)
    env.pop(KILL_AFTER_COMMIT_ENV)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            lake = ParquetLake(root)
            if lake.count(INTERACTION) >= len(want_clicks) and lake.count(IMPRESSION) >= len(
                want_imps
            ):
                break
            assert proc.poll() is None, "consumer exited"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lake = ParquetLake(root)
    got = lake.read(INTERACTION)["event_id"]
    assert len(got) == len(want_clicks) and got.is_unique and set(got) == set(want_clicks)
    assert set(lake.read(IMPRESSION)["event_id"]) == set(want_imps)
    assert lake.count(IMPRESSION) == len(want_imps)
    assert lake.quarantine_counts() == {INTERACTION: {"type: not one of click|watch|like": 3}}
    recs = [json.loads(p.read_text()) for p in sorted((root / COMMITS).glob("*.json"))]
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))


def test_the_simulators_reconciliation_holds_on_a_lake(tmp_path):
    """Acknowledged = stored once, re-sends and quarantine included, on the lake."""
    from simulator import SimulateConfig, reconcile, simulate
    from simulator.doubles import LocalRecommender, SinkSender
    from training.synth import SynthConfig, World

    World.generate(SynthConfig.preset("tiny")).save(tmp_path / "world")
    lake = ParquetLake(tmp_path / "lake", buckets=4)
    local = LocalRecommender(tmp_path / "world", lake, epsilon=0.2, seed=1)
    cfg = SimulateConfig(
        world=str(tmp_path / "world"),
        users=60,
        requests=100,
        seed=5,
        concurrency=1,  # one writer per lake
        request_id_share=1.0,
        malformed_share=0.04,
        orphan_share=0.03,
        resend_share=0.05,
    )
    rep = simulate(cfg, client_factory=lambda: local, sender=SinkSender(lake))
    assert rep.resent > 0 and rep.rejected
    rec = reconcile(rep, log_path=lake.url, labels_dir=str(tmp_path / "labels"))
    assert rec["impressions_logged"] == rep.items_returned
    assert rec["interactions_in_log"] == rep.accepted  # re-sends stored once
    assert rec["statuses"] == rep.expected and rec["status_mismatches"] == 0
    assert rec["quarantine"] == rep.rejected
    assert rec["ok"]
