"""The Ray join on a real multi-process cluster writes the same labels as the local join.

The fixture starts `ray start --head` and two worker nodes (`ray start --address`), each
`--block`ed in its own process group on loopback, and kills every process of those groups
at teardown. Nothing here is timed: loops wait for a condition, with a deadline that only
bounds a hang.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import ray
from ray._private.authentication_test_utils import reset_auth_token_state

from feedback.engine_ray import HOLD_ENV, read_worker_peaks, run_join_ray
from feedback.ids import uuid7_batch
from feedback.join import (
    JoinConfig,
    export_positives,
    read_labels,
    read_state,
    read_statuses,
    run_join,
)
from feedback.lake import ParquetLake
from feedback.metrics import compute_metrics
from feedback.sink import impression_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
# Loopback, but not "127.0.0.1": Ray replaces 127.0.0.1 and localhost in an address with
# the host's outward IP, and this cluster must not leave the loopback interface.
IP = "127.0.0.2"
HANG_S = 180.0  # bound on a hang, never a timing assertion
T = 1_750_000_000.0
W = 1800.0
BUCKETS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        p = psutil.Process(proc.pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _in_group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


class Cluster:
    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths
        self.port = _free_port()
        self.address = f"{IP}:{self.port}"
        # Ray 2.60 authenticates every RPC with a token; one made here, for this cluster.
        self.token = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        self._saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--num-cpus=1", f"--node-ip-address={IP}", *args],
            env=self.env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: teardown kills exactly it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.nodes.append(proc)
        return proc

    def start(self) -> None:
        self._start(
            ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.tmp}"]
        )
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)  # the driver
        reset_auth_token_state()  # this process read the mode when it imported ray
        ray.init(
            address=self.address,
            _node_ip_address=IP,
            logging_level="WARNING",
            configure_logging=False,
        )
        for i in range(2):
            # Nodes on one host: each its own temp folder, so their sockets differ.
            self._start([f"--address={self.address}", f"--temp-dir={self.tmp}/w{i}"])
        self.wait_nodes(3)

    def wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            alive = [x for x in ray.nodes() if x["Alive"] and x["Resources"].get("CPU")]
            if len(alive) >= n:
                return
            for proc in self.nodes:
                assert proc.poll() is None, f"ray start exited with {proc.returncode}"
            time.sleep(0.2)
        raise AssertionError(f"cluster: fewer than {n} nodes up")

    def node_of(self, pid: int) -> subprocess.Popen | None:
        for proc in self.nodes[1:]:
            if any(p.pid == pid for p in _tree(proc)):
                return proc
        return None

    def kill_node(self, proc: subprocess.Popen) -> None:
        for p in _tree(proc) + _in_group(proc.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_S)

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()
        procs: list[psutil.Process] = []
        for proc in reversed(self.nodes):
            procs += _tree(proc) + _in_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # ray start --block stops its node
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=30)
        for proc in self.nodes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.tmp, ignore_errors=True)
    left = [p.pid for proc in c.nodes for p in _in_group(proc.pid)]
    assert not left, f"ray processes left running: {left}"


# ---------------------------------------------------------------------------- events


def _batch(lake: ParquetLake, seed: int, t0: float) -> None:
    """Impressions, and interactions of every status: joined by request id and by (user,
    item), late, before the impression, orphans, and another user's request id."""
    rng = np.random.default_rng(seed)
    b = 40
    imps = impression_rows(
        request_ids=uuid7_batch(b, rng=rng),
        user_ids=rng.integers(0, 30, b),
        item_ids=rng.integers(0, 200, (b, 4)),
        scores=rng.random((b, 4)),
        model_version=1 + seed % 2,
        ts=t0 + np.sort(rng.random(b)) * 5400,
    )
    lake.write_impressions(imps)
    n = len(imps["event_id"])
    pick = np.flatnonzero(rng.random(n) < 0.35)
    k = len(pick)
    users = np.asarray(imps["user_id"])[pick].copy()
    items = np.asarray(imps["item_id"])[pick].copy()
    reqs = np.asarray(imps["request_id"], dtype=object)[pick].copy()
    ts = np.asarray(imps["ts"])[pick] + rng.lognormal(np.log(120), 1.6, k)
    mode = rng.choice(
        ["req", "ui", "early", "orphan", "other_user"], k, p=[0.5, 0.3, 0.05, 0.08, 0.07]
    )
    reqs[mode == "ui"] = ""
    ts[mode == "early"] -= 4000
    items[mode == "orphan"] += 10_000
    reqs[mode == "orphan"] = ""
    users[mode == "other_user"] = 1_000 + users[mode == "other_user"]  # other bucket, mostly
    kind = rng.choice(np.asarray(["click", "watch", "like"], dtype=object), k)
    lake.write_interactions(
        {
            "event_id": uuid7_batch(k, rng=rng),
            "user_id": users,
            "item_id": items,
            "type": kind,
            # within each type's bounds: watch seconds, click and like 1
            "value": np.where(kind == "watch", np.round(rng.random(k) * 60, 3), 1.0),
            "ts": ts,
            "request_id": reqs,
        }
    )


def _same(a: Path, b: Path) -> None:
    """Row by row: labels, statuses, pending and the totals."""
    la = read_labels(a).sort_values("event_id").reset_index(drop=True)
    lb = read_labels(b).sort_values("event_id").reset_index(drop=True)
    assert len(la) and la["event_id"].is_unique
    pd.testing.assert_frame_equal(la, lb)
    sa = read_statuses(a).sort_values("event_id").reset_index(drop=True)
    sb = read_statuses(b).sort_values("event_id").reset_index(drop=True)
    assert sb["event_id"].is_unique
    pd.testing.assert_frame_equal(sa, sb)
    ta, tb = read_state(a)["totals"], read_state(b)["totals"]
    assert ta == tb
    assert read_state(a)["pending_count"] == read_state(b)["pending_count"]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def test_same_labels_over_incremental_runs_and_a_rerun(cluster, tmp_path):
    lake = ParquetLake(tmp_path / "lake", buckets=BUCKETS)
    local, dist = tmp_path / "local", tmp_path / "ray"
    seen_statuses: set[str] = set()
    for step in range(3):
        _batch(lake, step, T + step * 3000)
        a = run_join(JoinConfig(log=lake.url, out=str(local), window_s=W))
        b = run_join_ray(JoinConfig(log=lake.url, out=str(dist), window_s=W))
        assert (a.labels_written, a.pending, a.statuses, a.reasons) == (
            b.labels_written,
            b.pending,
            b.statuses,
            b.reasons,
        )
        _same(local, dist)
        seen_statuses |= set(b.reasons)
    # The data reached every rule the buckets must agree on, cross-bucket ones included.
    assert {"request_id", "user_item", "after_window", "no_impression", "user_mismatch"} <= (
        seen_statuses
    )
    assert read_state(dist)["pending_count"] > 0
    # Every bucket ran on the cluster, on more than one node.
    assert len({w.split("/")[0] for w in read_worker_peaks(dist)}) >= 2

    before = _files(dist)
    again = run_join_ray(JoinConfig(log=lake.url, out=str(dist), window_s=W))
    assert again.noop and _files(dist) == before
    # Closing every window finalises the pending labels the same way on both.
    run_join(JoinConfig(log=lake.url, out=str(local), window_s=W, as_of=float("inf")))
    run_join_ray(JoinConfig(log=lake.url, out=str(dist), window_s=W, as_of=float("inf")))
    _same(local, dist)
    assert read_state(dist)["pending_count"] == 0
    # What reads the labels reads both alike: the north star and the retrain's positives.
    assert compute_metrics(read_labels(dist)) == compute_metrics(read_labels(local))
    n = export_positives(dist, tmp_path / "pos-ray.parquet")
    assert n > 0 and n == export_positives(local, tmp_path / "pos-local.parquet")
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "pos-ray.parquet"),
        pd.read_parquet(tmp_path / "pos-local.parquet"),
    )


def test_a_worker_killed_mid_run_then_rerun_gives_the_same_labels(cluster, tmp_path, monkeypatch):
    lake = ParquetLake(tmp_path / "lake", buckets=BUCKETS)
    local, dist = tmp_path / "local", tmp_path / "ray"
    _batch(lake, 10, T)
    run_join(JoinConfig(log=lake.url, out=str(local), window_s=W))
    run_join_ray(JoinConfig(log=lake.url, out=str(dist), window_s=W))
    _batch(lake, 11, T + 3000)
    run_join(JoinConfig(log=lake.url, out=str(local), window_s=W))

    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "hold").touch()
    monkeypatch.setenv(HOLD_ENV, str(hold))
    outcome: dict = {}

    def go() -> None:
        try:
            outcome["report"] = run_join_ray(JoinConfig(log=lake.url, out=str(dist), window_s=W))
        except Exception as exc:  # a failed run is allowed: the re-run must complete
            outcome["error"] = exc

    driver = threading.Thread(target=go)
    driver.start()
    victim = None
    deadline = time.monotonic() + HANG_S
    while victim is None and time.monotonic() < deadline:
        for marker in hold.glob("started-b*"):
            pid = int(marker.name.rsplit("-", 1)[1])
            node = cluster.node_of(pid)
            if node is not None:
                victim = (pid, node)
                break
        time.sleep(0.05)
    assert victim is not None, "no bucket task started on a worker node"
    os.kill(victim[0], signal.SIGKILL)  # the worker process running a bucket task
    (hold / "hold").unlink()
    driver.join(timeout=HANG_S)
    assert not driver.is_alive()

    if "report" in outcome:
        # The run completed: the killed task ran again, so a bucket started twice.
        started = [m.name.split("-")[1] for m in hold.glob("started-b*")]
        assert len(started) > len(set(started)), started
    monkeypatch.delenv(HOLD_ENV)
    rerun = run_join_ray(JoinConfig(log=lake.url, out=str(dist), window_s=W))
    assert rerun.noop == ("report" in outcome)  # committed already, or completed now
    print(f"killed worker {victim[0]}: the run {'completed' if 'report' in outcome else 'failed'}")
    _same(local, dist)
    st = read_state(dist)
    assert st["run"] == 2 and st["cursor"] == lake.last_seq()
    leftovers = [p for p in dist.rglob("*") if p.name.startswith(".")]
    assert not leftovers


def test_the_cli_joins_on_the_cluster_by_address(cluster, tmp_path):
    """`northstar feedback join --engine ray --address …`: a driver process of its own."""
    lake = ParquetLake(tmp_path / "lake", buckets=BUCKETS)
    _batch(lake, 20, T)
    local, dist = tmp_path / "local", tmp_path / "ray"
    run_join(JoinConfig(log=lake.url, out=str(local), window_s=W))
    cmd = [
        sys.executable, "-m", "northstar", "feedback", "join", "--engine", "ray",
        "--address", cluster.address, "--node-ip", IP,
        "--log", lake.url, "--out", str(dist), "--window", "30m",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, env=cluster.env, cwd=ROOT, timeout=HANG_S, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run 1: read" in done.stdout
    _same(local, dist)
