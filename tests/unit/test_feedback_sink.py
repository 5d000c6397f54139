"""The embedded event log: durable acks, one row per event_id, several writer processes."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from feedback.events import IMPRESSION, INTERACTION
from feedback.sink import (
    EVENT_LOG_ENV,
    EventSink,
    EventSource,
    impression_rows,
    open_sink,
    open_source,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = time.time()


def _batch(ids, ts=NOW, **over):
    n = len(ids)
    cols = {
        "event_id": np.asarray(ids, dtype=object),
        "user_id": np.arange(n) + 1,
        "item_id": np.arange(n) + 100,
        "type": np.full(n, "click", dtype=object),
        "value": np.ones(n),
        "ts": np.full(n, ts),
        "request_id": np.full(n, "", dtype=object),
    }
    cols.update(over)
    return cols


def test_sink_and_source_are_the_interfaces(tmp_path):
    log = open_sink(tmp_path / "events.db")
    assert isinstance(log, EventSink) and isinstance(log, EventSource)
    with pytest.raises(NotImplementedError, match="idempotent producer"):
        open_sink("kafka://broker:9092/events")
    assert open_sink(f"sqlite://{tmp_path}/other.db").path == tmp_path / "other.db"


def test_same_event_id_is_stored_once(tmp_path):
    log = open_sink(tmp_path / "events.db")
    rows = _batch(["a", "b", "c"])

    def take(*idx):  # the same events again, exactly as first sent
        return {k: v[list(idx)] for k, v in rows.items()}

    r1 = log.write_interactions(take(0, 1, 0))  # a duplicate inside one batch
    assert (r1.inserted, r1.duplicates, r1.accepted.tolist()) == (2, 1, [True, True, True])
    r2 = log.write_interactions(take(1, 2))  # a retry overlapping the first
    assert (r2.inserted, r2.duplicates) == (1, 1)
    df = log.read(INTERACTION)
    assert df["event_id"].tolist() == ["a", "b", "c"]
    assert log.count(INTERACTION) == 3


def test_malformed_rows_go_to_quarantine_with_counts_per_reason(tmp_path):
    log = open_sink(tmp_path / "events.db")
    types = np.array(["click", "buy", "buy", "watch"], dtype=object)
    users = np.array([1, 2, 3, -4])
    r = log.write_interactions(_batch(["a", "b", "c", "d"], type=types, user_id=users))
    assert r.accepted.tolist() == [True, False, False, False]
    assert (r.inserted, r.quarantined) == (1, 3)
    assert log.quarantine_counts() == {
        INTERACTION: {"type: not one of click|watch|like": 2, "user_id: negative": 1}
    }
    assert log.count(INTERACTION) == 1  # never silently into the log
    q = log.quarantined()
    assert len(q) == 3 and '"type": "buy"' in q["payload"].iloc[0]


def test_read_is_a_contiguous_offset_range(tmp_path):
    log = open_sink(tmp_path / "events.db")
    for k in range(3):
        log.write_interactions(_batch([f"{k}-{j}" for j in range(4)]))
    snap = log.snapshot()
    assert snap == {IMPRESSION: 0, INTERACTION: 12}
    part = log.read(INTERACTION, after=4, upto=8, with_meta=True)
    assert part["seq"].tolist() == [5, 6, 7, 8]
    assert part["event_id"].tolist() == ["1-0", "1-1", "1-2", "1-3"]
    assert log.read(INTERACTION, after=12).empty


def test_threads_share_one_sink(tmp_path):
    log = open_sink(tmp_path / "events.db")
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda k: log.write_interactions(_batch([f"{k}-{j}" for j in range(50)])), range(20)
            )
        )
    assert log.count(INTERACTION) == 1000


def test_impression_rows_from_a_ranked_batch():
    rows = impression_rows(
        request_ids=["r1", "r2"],
        user_ids=np.array([7, 8]),
        item_ids=np.array([[5, -1, 6], [9, 4, -1]]),
        scores=np.array([[3, 0, 1], [2, 1, 0]]),
        model_version=np.array([2, 3]),
        propensity=np.array([[1, 0, 0.5], [0.9, 0.9, 0]]),
        ts=NOW,
    )
    assert rows["event_id"].tolist() == ["r1:0", "r1:1", "r2:0", "r2:1"]
    assert rows["item_id"].tolist() == [5, 6, 9, 4]
    assert rows["position"].tolist() == [0, 1, 0, 1]  # the padding slot is not a position
    assert rows["model_version"].tolist() == [2, 2, 3, 3]
    assert rows["propensity"].tolist() == [1, 0.5, 0.9, 0.9]


# ---------------------------------------------------------------------------- durability

FULL = 2  # what `PRAGMA synchronous` reads back as for FULL (EXTRA is 3, NORMAL 1)


@pytest.fixture
def connections(monkeypatch):
    """Every SQLite connection opened while the test runs (this process only)."""
    opened = []
    real = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    return opened


def _synchronous(conns):
    return [c.execute("PRAGMA synchronous").fetchone()[0] for c in conns]


def test_every_connection_that_writes_runs_synchronous_full(tmp_path, monkeypatch, connections):
    """A kill -9 test cannot see this: the page cache survives a process kill even with
    fsync off. Only synchronous=FULL makes an acknowledged commit survive power loss."""
    from types import SimpleNamespace

    from feedback.hook import impression_logger

    log = open_sink(tmp_path / "events.db")
    assert log.write_interactions(_batch(["a"])).inserted == 1
    # The path `recommend` and the `feedback` model take: the log named by the env var.
    monkeypatch.setenv(EVENT_LOG_ENV, str(tmp_path / "events.db"))
    logger = impression_logger()
    shown = SimpleNamespace(
        request_id=np.array(["r1", "r1"], dtype=object),
        user_id=np.array([1, 1]),
        item_id=np.array([5, 6]),
        position=np.array([0, 1]),
        score=np.array([0.9, 0.8]),
        model_version=np.array([1, 1]),
        propensity=np.array([1.0, 1.0]),
    )
    assert logger.write(shown).inserted == 2
    assert len(connections) == 2
    assert _synchronous(connections) == [FULL, FULL]

    # A connection never crosses fork(): the child opens its own, FULL as well.
    before = len(connections)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        try:
            ok = log.write_interactions(_batch(["b"])).inserted == 1
            mine = connections[before:]
            os._exit(0 if ok and len(mine) == 1 and _synchronous(mine) == [FULL] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert log.count(INTERACTION) == 2


def test_a_sink_without_fsync_on_commit_is_refused(tmp_path):
    for weak in ("NORMAL", "OFF"):
        with pytest.raises(ValueError, match="power loss"):
            open_sink(tmp_path / "events.db", synchronous=weak)
    strict = open_sink(tmp_path / "events.db", synchronous="EXTRA")
    assert strict.write_interactions(_batch(["a"])).inserted == 1


# ---------------------------------------------------------------------------- processes

_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from feedback.sink import open_sink
    log = open_sink(sys.argv[1])
    start, stop, size = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for b in range(start, stop):
        ids = np.array([f"b{b:05d}-{j:04d}" for j in range(size)], dtype=object)
        n = len(ids)
        log.write_interactions({
            "event_id": ids, "user_id": np.arange(n) + 1, "item_id": np.arange(n) + 1,
            "type": np.full(n, "click", dtype=object), "value": np.ones(n),
            "ts": np.full(n, time.time()), "request_id": np.full(n, "", dtype=object)})
        print(b, flush=True)  # the acknowledgement: printed only after the write returned
""")


def _writer(path, start, stop, size=200):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(start), str(stop), str(size)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _batches_in_log(path):
    ids = open_source(path).read(INTERACTION)["event_id"]
    assert not ids.duplicated().any()
    per_batch = ids.str.slice(0, 6).value_counts()
    return ids, per_batch


def test_kill_9_mid_stream_loses_no_acknowledged_event(tmp_path):
    path = tmp_path / "events.db"
    proc = _writer(path, 0, 100_000)
    acked = []
    try:
        while len(acked) < 25:  # let it get well into the stream, then kill it mid-write
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            acked.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ids, per_batch = _batches_in_log(path)
    stored = {int(b[1:]) for b in per_batch.index}
    assert set(acked) <= stored  # every acknowledged batch survived
    assert (per_batch == 200).all()  # transactions are atomic: no half batch
    assert stored == set(range(len(stored)))  # and nothing past what was written

    # The client retries everything from the start after the crash: still stored once.
    retry = _writer(path, 0, max(stored) + 3)
    assert retry.wait(timeout=60) == 0
    ids, per_batch = _batches_in_log(path)
    assert len(ids) == 200 * (max(stored) + 3)


def test_concurrent_writer_processes_store_each_event_once(tmp_path):
    path = tmp_path / "events.db"
    open_sink(path).close()
    # Overlapping ranges: batches 10..19 are written by two processes at once.
    procs = [_writer(path, 0, 20, 100), _writer(path, 10, 30, 100), _writer(path, 30, 35, 100)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    ids, _ = _batches_in_log(path)
    assert len(ids) == 35 * 100


def test_a_replay_is_acknowledged_and_a_conflicting_reuse_of_an_event_id_is_refused(tmp_path):
    import time as _time

    from feedback.sink import open_sink, open_source

    sink = open_sink(tmp_path / "events.db")
    now = _time.time()

    def batch(value, eid="e-1"):
        return {
            "event_id": np.array([eid], dtype=object),
            "user_id": np.array([7]),
            "item_id": np.array([9]),
            "type": np.array(["watch"], dtype=object),
            "value": np.array([value]),
            "ts": np.array([now]),
            "request_id": np.array([""], dtype=object),
        }

    first = sink.write_interactions(batch(30.0))
    assert first.inserted == 1 and first.reasons == [""]
    replay = sink.write_interactions(batch(30.0))  # a retry after a lost acknowledgement
    assert replay.duplicates == 1 and replay.reasons == [""]
    other = sink.write_interactions(batch(99.0))  # same id, other content
    assert not other.accepted[0]
    assert other.reasons == ["event_id: already stored with different content"]
    # inside one batch too: the second copy with other content is refused
    both = {k: np.concatenate([batch(1.0, "e-2")[k], batch(2.0, "e-2")[k]]) for k in batch(0)}
    res = sink.write_interactions(both)
    assert res.reasons == ["", "event_id: already stored with different content"]
    src = open_source(tmp_path / "events.db")
    stored = src.read("interaction")
    assert stored.set_index("event_id")["value"].to_dict() == {"e-1": 30.0, "e-2": 1.0}
    assert src.quarantine_counts()["interaction"] == {
        "event_id: already stored with different content": 2
    }
