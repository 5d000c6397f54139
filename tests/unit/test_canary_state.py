"""canary.state, canary.prom, canary.offline.topk_overlap, canary.schedule triggers."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from canary.offline import topk_overlap
from canary.pipeline import RetrainConfig
from canary.prom import guardrails, parse_prometheus
from canary.schedule import ScheduleConfig, drift_features, tick, triggers
from canary.state import Busy, StateStore, file_lock, write_private


def test_state_roundtrip_atomic_and_private(tmp_path):
    store = StateStore(tmp_path / "st")
    assert store.load()["history"] == []
    with store.update() as s:
        s["production"] = {"version": 1}
    e = store.record("retrain", "rejected", ["ndcg 0.07 < 0.15"], {"ndcg": 0.07})
    st = store.load()
    assert st["production"] == {"version": 1}
    assert st["history"][-1]["id"] == e["id"] and st["history"][-1]["evidence"]["ndcg"] == 0.07
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o600"
    assert not list(store.dir.glob(".*.tmp"))  # no temp file left behind


def test_write_private_never_leaves_half_a_file(tmp_path):
    p = tmp_path / "f.json"
    write_private(p, json.dumps({"a": 1}))
    # a writer killed mid-write leaves only its temp file; the target keeps the old bytes
    code = (
        "import os, sys\n"
        f"fd = os.open({str(tmp_path / '.f.json.tmp')!r}, os.O_WRONLY | os.O_CREAT)\n"
        "os.write(fd, b'{\"a\": ')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    assert json.loads(p.read_text()) == {"a": 1}


def test_file_lock_excludes_and_is_released_on_kill(tmp_path):
    lock = tmp_path / "retrain.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
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
nv_inference_request_success{model="retrieval",version="2"} 95
nv_inference_request_success{model="recommend",version="1"} 1000
nv_inference_request_failure{model="retrieval",reason="OTHER",version="2"} 3
nv_inference_request_failure{model="retrieval",reason="BACKEND",version="2"} 2
nv_inference_request_failure{model="retrieval",reason="OTHER",version="1"} 0
nv_inference_request_summary_us{model="retrieval",version="1",quantile="0.99"} 24042
nv_inference_request_summary_us{model="retrieval",version="2",quantile="0.99"} NaN
nv_inference_request_summary_us{model="retrieval",version="2",quantile="0.5"} 100
"""


def test_prometheus_guardrails():
    samples = parse_prometheus(PROM)
    assert (
        "nv_inference_request_success",
        {"model": "retrieval", "version": "1"},
        900.0,
    ) in samples
    g = guardrails(PROM)
    assert set(g) == {1, 2}
    assert g[1].requests == 900 and g[1].failures == 0 and g[1].p99_ms == pytest.approx(24.042)
    assert g[2].requests == 100 and g[2].failures == 5 and g[2].error_rate == pytest.approx(0.05)
    assert g[2].p99_ms is None  # NaN quantile: no reading, not a zero


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
