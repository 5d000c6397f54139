"""common/procs.py on real processes: a child started by `spawn` goes when its parent is
killed with SIGKILL (and one started without it does not), `stop_group` ends what the child
forked too, and the registry records each group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from common import procs

ROOT = Path(__file__).resolve().parents[2]
HANG_BOUND_S = 30  # waits below are for a condition; this only turns a hang into a failure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

# A parent that starts `sleep` (with or without spawn), prints its pid, and waits to be killed.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from common import procs
    cmd = ["sleep", "600"]
    if sys.argv[1] == "spawn":
        child = procs.spawn(cmd)
    else:
        child = subprocess.Popen(cmd, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(proc: psutil.Process, bound_s: float = HANG_BOUND_S) -> bool:
    deadline = time.monotonic() + bound_s
    while not _gone(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _child_of_killed_parent(how: str) -> psutil.Process:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        child = psutil.Process(int(parent.stdout.readline()))
    finally:
        parent.kill()  # SIGKILL: the parent runs no cleanup at all
        parent.wait()
        parent.stdout.close()
    return child


def test_a_spawned_child_goes_when_its_parent_is_killed_with_sigkill():
    child = _child_of_killed_parent("spawn")
    assert _wait_gone(child), f"pid {child.pid} outlived its SIGKILLed parent"


def test_without_spawn_the_child_outlives_its_killed_parent():
    # The control: what the test above would see if spawn set no parent-death signal.
    child = _child_of_killed_parent("popen")
    try:
        # The kernel signals at the parent's exit, which is over: a second is ample for a
        # signalled sleep to die, and it must not.
        assert not _wait_gone(child, bound_s=1.0)
    finally:
        child.kill()


def test_stop_group_ends_what_the_leader_forked():
    # The shell dies on SIGTERM; the sleep it started in the background would live on.
    leader = procs.spawn(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
    grandchild = psutil.Process(int(leader.stdout.readline()))
    leader.stdout.close()
    assert os.getpgid(grandchild.pid) == leader.pid  # its own group, the sleep in it
    rc = procs.stop_group(leader, timeout_s=HANG_BOUND_S)
    assert rc == -signal.SIGTERM
    assert _wait_gone(grandchild), "the leader's child outlived stop_group"


def test_stop_group_kills_a_leader_that_ignores_the_signal():
    leader = procs.spawn(["sh", "-c", "trap '' TERM; echo up; while :; do sleep 1; done"],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert leader.stdout.readline().strip() == "up"  # the trap is set
    leader.stdout.close()
    assert procs.stop_group(leader, timeout_s=0.5) == -signal.SIGKILL


def test_each_spawned_group_is_recorded(tmp_path, monkeypatch):
    registry = tmp_path / "procs"
    monkeypatch.setenv(procs.REGISTRY_ENV, str(registry))
    started = [procs.spawn(["sleep", "600"]) for _ in range(2)]
    try:
        groups = procs.read_registry(registry)
        assert set(groups) == {p.pid for p in started}
        for p in started:
            assert groups[p.pid] == psutil.Process(p.pid).create_time()
    finally:
        for p in started:
            procs.stop_group(p)
    assert procs.read_registry(tmp_path / "absent") == {}
