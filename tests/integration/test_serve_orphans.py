"""`northstar serve` killed with SIGKILL leaves nothing behind: its tritonserver, the
server's Python-backend stubs (and their shared memory), and nginx in front all go.

SIGKILL runs no cleanup in `serve`; what ends the rest is the parent-death signal each
server was started with (common/procs.py): tritonserver gets SIGTERM and stops its stubs,
nginx gets SIGTERM and stops its workers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.leftovers import kind_of
from serving.testing import tiny_export

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"tritonserver ready \(pid (\d+)\)")
HANG_BOUND_S = 120  # waits below are for a condition; this only turns a hang into a failure


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _serve(repo: Path, log: Path) -> tuple[subprocess.Popen, int]:
    cmd = [
        sys.executable, "-m", "northstar", "serve", "--repo", str(repo),
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--front-proxy", "on", "--log-file", str(log),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:  # ends when serve exits: a failed start is reported below
        lines.append(line)
        if m := READY.search(line):
            return proc, int(m.group(1))
    proc.wait()
    raise AssertionError("northstar serve did not get ready:\n" + "".join(lines))


def test_sigkill_of_serve_leaves_no_tritonserver_stub_or_nginx(tmp_path):
    _, repo, _ = tiny_export(tmp_path / "repo")
    serve, triton_pid = _serve(repo, tmp_path / "tritonserver.log")
    below: list[psutil.Process] = []
    try:
        below = [p for p in psutil.Process(serve.pid).children(recursive=True) if kind_of(p)]
        kinds = sorted(kind_of(p) for p in below)
        # what is about to be orphaned, so the test cannot pass on nothing
        assert triton_pid in {p.pid for p in below}
        assert kinds.count("tritonserver") == 1 and kinds.count("triton stub") >= 2, kinds
        assert kinds.count("nginx") >= 2, kinds  # master and worker
        shm = [Path("/dev/shm") / p.cmdline()[2] for p in below if kind_of(p) == "triton stub"]
        assert all(region.exists() for region in shm), shm

        serve.kill()  # SIGKILL: serve runs no cleanup at all
        assert serve.wait(timeout=HANG_BOUND_S) == -9

        deadline = time.monotonic() + HANG_BOUND_S
        while alive := [p for p in below if _running(p)]:
            assert time.monotonic() < deadline, "outlived serve: " + "; ".join(
                f"{p.pid} {kind_of(p)}" for p in alive
            )
            time.sleep(0.1)
        left = [region for region in shm if region.exists()]
        assert not left, f"the stubs' shared memory outlived them: {left}"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        serve.stdout.close()
        for p in below:  # a failed test leaves nothing either
            if _running(p):
                p.kill()
