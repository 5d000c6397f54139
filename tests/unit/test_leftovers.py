"""common/leftovers.py and the end-of-session check in tests/conftest.py, on real processes.

A leftover is made the way the issue saw one: a server whose parent died, so it belongs to
init. It is found by the session's mark when its environment still carries it, and through
the registry of spawned groups when the server wrote its process title over its environment
(redis-server does); a server with another session's mark, or in no group of ours, is not.
And an inner pytest session that leaves a redis-server running fails, naming it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from common import leftovers, procs
from serving.server import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "NORTHSTAR_TEST_SESSION"
HANG_BOUND_S = 30

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def _orphan(script: str, env: dict[str, str], *, via_spawn: bool = False) -> psutil.Process:
    """What `script` starts in the background, once the shell that started it has exited."""
    start = procs.spawn if via_spawn else subprocess.Popen
    shell = start(["bash", "-c", f"{script} & echo $!"], env=env, stdout=subprocess.PIPE)
    pid = int(shell.stdout.readline())
    shell.stdout.close()
    shell.wait()
    proc = psutil.Process(pid)
    assert proc.ppid() != os.getpid() and proc.ppid() != shell.pid  # an orphan now
    return proc


def _redis(port: int) -> str:
    # its output away from our pipe, which is closed once the pid is read
    return f"exec redis-server --port {port} --bind 127.0.0.1 --save '' >/dev/null 2>&1"


def _wait_titled(proc: psutil.Process, word: str) -> None:
    """Until redis-server has set its process title (written over its environment)."""
    deadline = time.monotonic() + HANG_BOUND_S
    while word not in " ".join(proc.cmdline()):
        assert time.monotonic() < deadline, proc.cmdline()
        time.sleep(0.05)


@pytest.fixture
def mark():
    return (KEY, uuid.uuid4().hex)


@pytest.fixture
def cleanup():
    started: list[psutil.Process] = []
    yield started
    for proc in started:
        if proc.is_running():
            proc.kill()


def test_a_marked_orphan_is_found_and_another_sessions_is_not(mark, cleanup):
    base = {"PATH": os.environ["PATH"]}
    # A "tritonserver" (argv[0]) that keeps its environment: found by the mark alone.
    ours = _orphan("exec -a tritonserver sleep 600", {**base, KEY: mark[1]})
    cleanup.append(ours)
    theirs = _orphan("exec -a tritonserver sleep 600", {**base, KEY: "another-checkout"})
    cleanup.append(theirs)
    plain = _orphan("exec sleep 600", {**base, KEY: mark[1]})  # not a server: not a leak
    cleanup.append(plain)
    found = leftovers.find_leftovers(mark)
    assert [(f.pid, f.kind) for f in found] == [(ours.pid, "tritonserver")]
    leftovers.kill(found)
    assert not ours.is_running() and theirs.is_running()
    assert leftovers.find_leftovers(mark) == []


@needs_redis
def test_a_server_that_wrote_over_its_environment_is_found_by_its_group(
    mark, cleanup, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # whatever redis-server writes stays in the test's folder
    registry = tmp_path / "procs"
    monkeypatch.setenv(procs.REGISTRY_ENV, str(registry))
    env = {"PATH": os.environ["PATH"], KEY: mark[1]}
    since = time.time()
    ours = _orphan(_redis(free_port()), env, via_spawn=True)
    cleanup.append(ours)
    # the same server, same mark, but in a group this session did not record
    stray = _orphan(_redis(free_port()), env)
    cleanup.append(stray)
    for proc in (ours, stray):
        _wait_titled(proc, "127.0.0.1:")
        assert KEY not in proc.environ()  # the mark is gone: only the group can tell
    found = leftovers.find_leftovers(mark, registry=registry, since=since)
    assert [(f.pid, f.kind) for f in found] == [(ours.pid, "redis-server")]
    # nothing started before the session is the session's, even in a recorded group
    assert leftovers.find_leftovers(mark, registry=registry, since=time.time() + 60) == []


INNER_TEST = """
from common.redis_server import RedisServer


def test_forgets_to_stop_its_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    print(f"LEAKED pid {server.process.pid}")
"""


INNER_CLEAN = """
from common.redis_server import RedisServer


def test_stops_its_server(tmp_path):
    RedisServer(tmp_path / "redis").start().stop()
"""


@needs_redis
def test_the_session_check_fails_a_run_that_leaves_a_server_running(pytester, cleanup):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_leak=INNER_TEST)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    out = result.stdout.str()
    pid = int(out.split("LEAKED pid ")[1].split()[0])
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    result.stdout.fnmatch_lines(
        [
            "*servers left running by the tests (now killed)*",
            f"pid {pid} (redis-server): *redis-server 127.0.0.1:*",
            "*1 passed*",
        ]
    )
    # the check killed it, and the server's own parent-death signal had nothing left to do
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@needs_redis
def test_the_session_check_passes_a_run_that_stops_its_server(pytester):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_clean=INNER_CLEAN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert "left running" not in result.stdout.str()


def test_kill_skips_a_pid_given_to_another_process(cleanup):
    proc = subprocess.Popen(["sleep", "600"])
    cleanup.append(psutil.Process(proc.pid))
    stale = leftovers.Leftover(proc.pid, "tritonserver", "sleep 600", created=0.0)
    leftovers.kill([stale])  # recorded with another create time: not this process
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
