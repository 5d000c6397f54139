"""canary.state, canary.prom parsing, canary.offline.topk_overlap, canary.schedule triggers."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from canary.offline import topk_overlap
from canary.pipeline import RetrainConfig
from canary.prom import parse_prometheus
from canary.schedule import ScheduleConfig, drift_features, tick, triggers
from canary.state import (
    LOCK_FILE,
    STATE_FILE,
    Busy,
    CanaryRecord,
    ProductionRecord,
    StateStore,
    file_lock,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_roundtrip_atomic_and_private(tmp_path):
    store = StateStore(tmp_path / "st")
    assert store.load()["history"] == []
    with store.update() as s:
        s["production"] = {"version": 1}
    e = store.record("retrain", "rejected", ["ndcg 0.07 < 0.15"], {"ndcg": 0.07})
    st = store.load()
    assert st["production"] == {"version": 1}
    assert st["history"][-1]["id"] == e["id"] and st["history"][-1]["evidence"]["ndcg"] == 0.07
    assert _mode(store.path) == 0o600 and _mode(store.dir / LOCK_FILE) == 0o600
    assert not list(store.dir.glob(".*.tmp*"))  # no temp file left behind


# What state.json held before the records were typed (pipeline.py and online.py wrote these
# dicts by hand); a file like it must still load, and keep what the records do not name.
OLD_STATE = {
    "production": {
        "version": 3,
        "run": "/runs/r3/run",
        "since": 1700000000.0,
        "offline": {"ndcg@10": 0.2},
        "base_data": "/data",
        "mlflow_version": "2",
    },
    "canary": {
        "version": 4,
        "run": "/runs/r4/run",
        "percent": 10,
        "started": 1700000100.0,
        "retrain_id": "retrain-x",
        "base_data": "/data",
        "msprt_p": 0.41,
        "offline": {"ndcg@10": 0.21},
        "bias": {"arp": 40.0, "exposure_gini": 0.5},
        "note": "written by a newer version",
    },
    "bias": [],
    "history": [],
}


def test_records_read_an_older_state_and_round_trip(tmp_path):
    store = StateStore(tmp_path)
    store.path.write_text(json.dumps(OLD_STATE))
    st = store.load()
    prod, canary = ProductionRecord.from_state(st), CanaryRecord.from_state(st)
    assert (prod.version, prod.mlflow_version, prod.previous) == (3, "2", None)
    assert (canary.version, canary.percent, canary.msprt_p, canary.looks) == (4, 10, 0.41, 0)
    assert canary.mlflow_version is None and canary.bias == {"arp": 40.0, "exposure_gini": 0.5}
    # written back, every old key is still there with its value, the unknown one included
    assert canary.to_dict().items() >= OLD_STATE["canary"].items()
    assert prod.to_dict().items() >= OLD_STATE["production"].items()
    assert CanaryRecord.from_dict(canary.to_dict()) == canary
    promoted = canary.promoted(previous=prod.version, since=5.0)
    assert promoted == ProductionRecord(
        version=4,
        run="/runs/r4/run",
        since=5.0,
        offline={"ndcg@10": 0.21},
        base_data="/data",
        previous=3,
    )
    assert CanaryRecord.from_state({"canary": None}) is None
    with pytest.raises(ValueError, match="lacks"):
        CanaryRecord.from_dict({"version": 4})


# Children that run the real StateStore.update -> write_private -> atomic write. The
# instrumentation only watches (and, for the stop points, holds the child where it is
# until the kill): every byte the child writes is written by the real code. It sees the
# temp file being opened for writing (builtins.open or os.fdopen on it) and each fsync
# (of the temp file before the rename, of the folder after it).
WATCH = r"""
import builtins, os, signal, stat, sys

real_open, real_fdopen, real_fsync = builtins.open, os.fdopen, os.fsync
on_temp_open = lambda f: f
on_fsync = lambda folder: None

def _open(file, mode="r", *args, **kw):
    f = real_open(file, mode, *args, **kw)
    temp = isinstance(file, (str, os.PathLike)) and ".tmp" in str(os.fspath(file))
    return on_temp_open(f) if temp and "w" in mode else f

def _fdopen(fd, mode="r", *args, **kw):
    f = real_fdopen(fd, mode, *args, **kw)
    return on_temp_open(f) if "w" in mode else f

def _fsync(fd):
    on_fsync(stat.S_ISDIR(os.fstat(fd).st_mode))
    real_fsync(fd)

builtins.open, os.fdopen, os.fsync = _open, _fdopen, _fsync
"""

# Held at one point of the write: prints "stopped" and waits there for the kill.
STOP_CHILD = (
    WATCH
    + r"""
from canary.state import StateStore

store, point, n = StateStore(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def stop():
    print("stopped", flush=True)
    while True:
        signal.pause()

class HalfWriter:  # the temp file gets the first half of the data, then the writer stops
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        stop()
    def __getattr__(self, name):
        return getattr(self.f, name)

def hold_mid_write(f):
    return HalfWriter(f) if point == "mid_write" else f

def hold_at_fsync(folder):
    if point == ("renamed" if folder else "written"):
        stop()

with store.update() as s:
    s["gen"], s["blob"] = 1, [1] * n
    # from here on, the only file work left is the save
    on_temp_open, on_fsync = hold_mid_write, hold_at_fsync
"""
)

# Keeps rewriting the state with the next generation, and says which one the moment its
# temp file is opened for writing; the test kills it right then, inside the write.
LOOP_CHILD = (
    WATCH
    + r"""
from canary.state import StateStore

store, n = StateStore(sys.argv[1]), int(sys.argv[2])
gen = store.load()["gen"]

def announce(f):
    print(gen, flush=True)
    return f

on_temp_open = announce
while True:
    gen += 1
    with store.update() as s:
        s["gen"], s["blob"] = gen, [gen] * n
"""
)

TEMPS = f".{STATE_FILE}.*.tmp*"  # common.files' temp names for state.json


def _seed(store: StateStore, gen: int = 0, n: int = 10) -> None:
    with store.update() as s:
        s["gen"], s["blob"] = gen, [gen] * n


def _check_whole(store: StateStore, allowed: set[int]) -> int:
    """state.json is one complete state of an allowed generation; leftover temp files are
    owner-only and never the state; the dead writer's lock is gone, the next write works."""
    state = json.loads(store.path.read_text())  # complete: it parses
    gen = state["gen"]
    assert gen in allowed, (gen, allowed)
    assert state["blob"] == [gen] * len(state["blob"])  # one generation, not a mix
    for tmp in store.dir.glob(TEMPS):
        assert tmp.name != STATE_FILE and _mode(tmp) == 0o600
    with file_lock(store.dir / LOCK_FILE, blocking=False):
        pass  # the kernel dropped the killed writer's lock
    with store.update() as s:
        s["after"] = True
    assert store.load()["gen"] == gen and store.load()["after"]
    return gen


@pytest.mark.parametrize(
    ("point", "survivor"),
    [("mid_write", 0), ("written", 0), ("renamed", 1)],
)
def test_a_writer_killed_inside_the_atomic_write_leaves_a_whole_state(tmp_path, point, survivor):
    store = StateStore(tmp_path / "st")
    _seed(store)
    child = subprocess.Popen(
        [sys.executable, "-c", STOP_CHILD, str(store.dir), point, "200000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "stopped", "the child never reached it"
        temps = list(store.dir.glob(TEMPS))
        if point == "mid_write":  # what a non-atomic write would have left in state.json
            (tmp,) = temps
            with pytest.raises(json.JSONDecodeError):
                json.loads(tmp.read_text())
        if point == "written":
            (tmp,) = temps
            assert json.loads(tmp.read_text())["gen"] == 1  # whole, but not yet the state
        if point == "renamed":
            assert not temps
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _check_whole(store, {survivor}) == survivor


def test_a_writer_killed_while_rewriting_large_states_leaves_previous_or_new(tmp_path):
    store = StateStore(tmp_path / "st")
    _seed(store)
    for stop_after in (1, 3, 6):  # kill at different points of a growing file
        first = store.load()["gen"]
        child = subprocess.Popen(
            [sys.executable, "-c", LOOP_CHILD, str(store.dir), "100000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(stop_after):
                line = child.stdout.readline()
                assert line, "the child stopped writing"
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        # the generation being written when it died: the last one it announced
        writing = max(int(x) for x in [line, *child.stdout.read().split()])
        assert writing >= first + stop_after
        # previous (writing - 1, or the seed's) or new (writing), never anything else
        _check_whole(store, {writing, writing - 1})


def test_file_lock_excludes_is_private_and_is_released_on_kill(tmp_path):
    lock = tmp_path / "locks" / "retrain.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from pathlib import Path\n"
            "from canary.state import file_lock\n"
            "os.umask(0)\n"
            "with file_lock(Path(sys.argv[1]), blocking=False):\n"
            "    print('held', flush=True)\n"
            "    while True:\n"
            "        signal.pause()\n",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _mode(lock) == 0o600 and _mode(lock.parent) == 0o700  # whatever the umask
        with pytest.raises(Busy), file_lock(lock, blocking=False):
            pass
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, blocking=False):  # the kernel dropped the dead holder's lock
        pass


PROM = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="retrieval",version="1"} 900
nv_inference_request_summary_us{model="retrieval",version="2",quantile="0.99"} NaN
weird_line_without_value
"""


def test_parse_prometheus_samples():
    samples = parse_prometheus(PROM)
    assert (
        "nv_inference_request_success",
        {"model": "retrieval", "version": "1"},
        900.0,
    ) in samples
    nan = [v for n, labels, v in samples if labels.get("quantile") == "0.99"]
    assert len(nan) == 1 and nan[0] != nan[0]  # NaN is kept as NaN, never as 0
    assert len(samples) == 2  # comments and malformed lines are skipped


def test_topk_overlap():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[3, 2, 9], [7, 8, -1]])
    assert topk_overlap(a=a, b=b) == pytest.approx((2 / 3 + 0) / 2)
    assert topk_overlap(a=a, b=a) == 1.0


def test_drift_features_and_triggers(tmp_path):
    train = pd.DataFrame({"user_id": [1, 1, 1, 2, 3, 3], "item_id": [10, 11, 10, 12, 10, 11]})
    recent = pd.DataFrame({"user_id": [9, 9, 9], "item_id": [99, 98, 97]})  # all unseen
    feats = drift_features(train, recent)
    assert feats["user_activity"][1].tolist() == [0.0, 0.0, 0.0]
    cfg = ScheduleConfig(
        cron="0 3 * * *",
        label_volume=2,
        psi_threshold=None,
        retrain=RetrainConfig(state_dir=str(tmp_path), labels=None),
    )
    now = time.mktime(time.strptime("2026-01-02 04:00", "%Y-%m-%d %H:%M"))
    fired = triggers(cfg, {"last_retrain": None}, now)
    assert fired["cron"]["fired"]  # never retrained
    fired = triggers(cfg, {"last_retrain": {"ts": now - 1800}}, now)
    assert not fired["cron"]["fired"]  # retrained after today's 03:00
    fired = triggers(cfg, {"last_retrain": {"ts": now - 2 * 3600}}, now)
    assert fired["cron"]["fired"]  # 03:00 came after the last retrain
    assert fired["labels"] == {"fired": False, "new_positives": 0}


def test_tick_reports_a_failure_instead_of_raising(tmp_path):
    cfg = ScheduleConfig(
        label_volume=None,
        psi_threshold=None,
        retrain=RetrainConfig(state_dir=str(tmp_path / "st"), repo=str(tmp_path / "no-repo")),
    )
    out = tick(cfg)
    assert out["retrain"]["status"] == "failed" and out["retrain"]["step"] == "collect"
    hist = StateStore(tmp_path / "st").load()["history"]
    assert hist[-1]["decision"] == "failed" and "untouched" in hist[-1]["reasons"][-1]
    again = tick(cfg)  # a persistent fault is not retried at every tick
    assert again["retrain"]["status"] == "backing off"
    assert len(StateStore(tmp_path / "st").load()["history"]) == len(hist)
