"""kill -9 under traffic, then `northstar serve` again: same production and canary split,
no acknowledged event lost, and the simulator rides through on retries.

The server runs as `python -m northstar serve` (the command an operator runs), on fixed
ports so clients reconnect to the same address. The canary is set on the live server
with `switch_routing` (the durable state: routing.json + the persisted version list). Traffic is
the closed-loop simulator in a background thread, with a retry deadline long enough to
outlast a restart; every batch it ran is reconciled against the event log afterwards.

The kill is timed by conditions, never by sleeping: the traffic has had N answers, then
a gate holds the simulator's next request (sent, awaiting its answer) while the server is
killed, and the restart begins only once that request has failed against the dead
server. So the kill always lands mid-traffic, however loaded the machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import psutil
import pytest

from common import procs
from serving.client import RecommenderClient
from serving.control import ready_versions, switch_routing
from serving.routing import RoutingState
from serving.server import free_port
from serving.testing import world_repo
from simulator import ClickMemory, SimReport, SimulateConfig, reconcile_many, simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

K = 10
READY = re.compile(r"tritonserver ready \(pid (\d+)\)")


def _serve(cmd: list[str], timeout_s: float = 180.0) -> tuple[subprocess.Popen, int, float]:
    """Start `northstar serve`; return (process, tritonserver pid, seconds to ready)."""
    t0 = time.monotonic()
    # spawn: it goes (and takes its tritonserver with it) even if pytest is killed
    proc = procs.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while time.monotonic() - t0 < timeout_s:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = READY.search(line)
        if m:
            return proc, int(m.group(1)), time.monotonic() - t0
    proc.kill()
    raise AssertionError("northstar serve did not get ready:\n" + "".join(lines))


def _versions(url: str, users: np.ndarray) -> np.ndarray:
    with RecommenderClient(url) as c:
        return np.array([r.model_version for r in c.recommend(users, k=3)])


class _GatedTraffic:
    """The simulator in a background thread, one simulate() batch after another, through
    recommend clients that count answers and can hold requests at a gate.

    `hold()` closes the gate: the simulator's next request waits there, sent and awaiting
    its answer, and `held` is set. `release()` lets it (and any behind it) go on to the
    server. `failed` is set when an attempt raises.
    """

    def __init__(self, sim: SimulateConfig):
        self.sim = sim
        self.reports: list[SimReport] = []
        self.errors: list[str] = []
        self.held = threading.Event()
        self.failed = threading.Event()
        self._answered = 0
        self._cv = threading.Condition()
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._memory = ClickMemory()
        self._thread = threading.Thread(target=self._loop, name="traffic", daemon=True)

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            cfg = replace(self.sim, seed=self.sim.seed + i)
            try:
                self.reports.append(simulate(cfg, client_factory=self._client, memory=self._memory))
            except Exception as exc:  # reported, and the test fails on it
                self.errors.append(f"{type(exc).__name__}: {exc}")
            i += 1

    def _client(self) -> _GatedClient:
        s = self.sim
        return _GatedClient(self, RecommenderClient(s.url, s.protocol, timeout_s=s.timeout_s))

    def gate(self) -> None:
        """Called by each request before it goes to the server: waits while held."""
        if not self._open.is_set():
            self.held.set()
            self._open.wait()

    def count_answer(self) -> None:
        with self._cv:
            self._answered += 1
            self._cv.notify_all()

    @property
    def answered(self) -> int:
        with self._cv:
            return self._answered

    def wait_answered(self, n: int, timeout_s: float = 600.0) -> bool:
        """Wait until `n` requests in all have been answered; False if the guard ran out."""
        with self._cv:
            return self._cv.wait_for(lambda: self._answered >= n, timeout=timeout_s)

    def hold(self) -> None:
        self.held.clear()
        self.failed.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.reports)

    @property
    def failed_requests(self) -> int:
        return sum(r.requests_failed for r in self.reports) + len(self.errors)

    def __enter__(self) -> _GatedTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.release()
        self._thread.join(timeout=300)  # the batch under way finishes: its report counts

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()


class _GatedClient:
    def __init__(self, traffic: _GatedTraffic, inner: RecommenderClient):
        self.traffic, self.inner = traffic, inner

    def recommend(self, *args, **kwargs):
        self.traffic.gate()
        try:
            out = self.inner.recommend(*args, **kwargs)
        except Exception:
            self.traffic.failed.set()
            raise
        self.traffic.count_answer()
        return out

    def close(self) -> None:
        self.inner.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_kill_9_under_traffic_then_restart_restores_routing_and_loses_no_event(tmp_path):
    # v1 routed as production, v2 exported but not routed (the canary below)
    ds, _, repo = world_repo(tmp_path, k=K, versions=2)
    events = tmp_path / "events.db"
    http, grpc, metrics = free_port(), free_port(), free_port()
    url = f"127.0.0.1:{grpc}"

    def cmd(n: int) -> list[str]:
        return [
            sys.executable, "-m", "northstar", "serve", "--repo", str(repo),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--event-log", str(events), "--log-file", str(tmp_path / f"tritonserver-{n}.log"),
        ]  # fmt: skip

    first, pid, _ = _serve(cmd(1))
    second = None
    try:
        switch_routing(repo, RoutingState(production=1, canary=2, canary_percent=50), url=url)
        users = ds.users["user_id"].to_numpy()[:200]
        want = RoutingState(production=1, canary=2, canary_percent=50).version_for(users)
        # recommend re-reads routing.json within a second; the guard only stops a hang.
        deadline = time.monotonic() + 120
        while not np.array_equal(got := _versions(url, users), want):
            assert time.monotonic() < deadline, "the canary split never took effect"
            time.sleep(0.2)
        assert set(got) == {1, 2}

        sim = SimulateConfig(
            world=str(tmp_path / "world"),
            users=200,
            requests=60,
            url=url,
            k=K,
            concurrency=4,
            seed=7,
            request_id_share=1.0,
            backoff_s=0.05,
            max_backoff_s=1.0,
            retry_deadline_s=180.0,  # longer than a restart on a loaded 2-core machine
        )
        with _GatedTraffic(sim) as traffic:
            assert traffic.wait_answered(120), "no traffic before the kill"
            # Traffic is in flight when the server dies: the gate holds the simulator's next
            # request (sent, awaiting its answer) across the kill, and lets it go to the
            # dead server before the restart begins.
            traffic.hold()
            assert traffic.held.wait(timeout=600), "the simulator sent no request to hold"
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            assert first.wait(timeout=60) == 1  # serve noticed its server died, and says so
            traffic.release()
            assert traffic.failed.wait(timeout=600), "no request met the dead server"
            answered_at_restart = traffic.answered
            second, _, _ = _serve(cmd(2))
            downtime_s = time.monotonic() - t_kill
            # Traffic goes on after the restart: the held requests retried into it, and more.
            assert traffic.wait_answered(answered_at_restart + 120), "no traffic after restart"
        assert traffic.finished, "the traffic thread did not stop"
        assert not traffic.errors, traffic.errors

        # The killed server's stubs do not outlive it (serve reaps them and their memory).
        orphans = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if (a := p.info.get("cmdline") or []) and len(a) > 5 and a[5] == str(pid)
        ]
        assert not orphans, f"stubs of the killed server still run: {orphans}"

        # Same production and canary split, from the durable state alone.
        assert sorted(ready_versions(url)) == [1, 2]
        assert np.array_equal(_versions(url, users), want)

        # Nothing acknowledged was lost or counted twice, in any batch, across the crash.
        labels = tmp_path / "labels"
        for rec in reconcile_many(traffic.reports, log_path=str(events), labels_dir=str(labels)):
            assert rec["ok"], rec
        figures = {  # printed for the record; only counts are asserted, never times
            "downtime_s": round(downtime_s, 1),
            "requests": traffic.requests,
            "requests_failed": traffic.failed_requests,
            "failed_attempts": sum(r.failed_attempts for r in traffic.reports),
            "retries": sum(r.retries for r in traffic.reports),
            "error_window_s": max(r.error_window_s for r in traffic.reports),
            "events_acknowledged": sum(r.accepted for r in traffic.reports),
        }
        print("recovery:", json.dumps(figures))
        assert traffic.failed_requests == 0, figures  # the retry deadline outlasts the restart
        assert figures["failed_attempts"] > 0, figures  # the kill did land mid-traffic
    finally:
        for proc in (first, second):
            if proc is not None:
                _stop(proc)


def test_a_picked_port_taken_before_triton_binds_it_is_retried_on_new_ports(tmp_path):
    import socket

    from serving.server import _PORT_TAKEN, ServerConfig, TritonServer
    from serving.testing import tiny_export

    _, repo, _ = tiny_export(tmp_path / "repo")
    server = TritonServer(ServerConfig.on_free_ports(repo))
    with socket.socket() as squatter:  # another process got the port first
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", server.grpc_port))
        squatter.listen()
        taken = server.grpc_port
        server.start()
        try:
            assert server.grpc_port != taken
            with RecommenderClient(server.grpc_url) as c:
                assert len(c.recommend([1000], k=3)[0].item_ids) == 3
            # The first attempt really failed on the port (its log is kept, appended to).
            assert _PORT_TAKEN.search(server.log_path.read_text())
        finally:
            server.stop()
