"""Child processes that never outlive what started them.

Every server this project starts (tritonserver, nginx, redis-server, Locust, benchmark peers)
goes through `spawn`:

- its own session, so its own process group: a terminal's Ctrl-C reaches only us, and we stop
  it in order; and `stop_group` ends whatever it forked too (Triton's Python-backend stubs,
  nginx's workers, Ray's daemons), even after the leader itself is gone;
- on Linux a parent-death signal (prctl PR_SET_PDEATHSIG): a parent killed with SIGKILL runs
  no cleanup at all, and the kernel still signals the child;
- when $NORTHSTAR_PROC_REGISTRY names a file, one line per group started is appended to it
  (`pgid create_time argv0`), so a test session can list afterwards what it started, even the
  processes whose environment is gone (nginx and redis-server write their process title over
  it) and whose parent died (common/leftovers.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import psutil

log = logging.getLogger(__name__)

REGISTRY_ENV = "NORTHSTAR_PROC_REGISTRY"
_PR_SET_PDEATHSIG = 1


def _load_prctl():
    # Looked up here, in the parent: a forked child of a threaded parent should not dlopen.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc (or no prctl): no parent-death signal
        return None


_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn`: the child gets `sig` when the thread that forks it exits (the kernel
    tracks the thread, not the process). None where the platform has no such signal."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig))
        # The parent died between fork and prctl: no one is left to send the signal.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def spawn(
    cmd: Sequence[str],
    *,
    parent_death_signal: int = signal.SIGTERM,
    **popen_kw,
) -> subprocess.Popen:
    """`subprocess.Popen(cmd, **popen_kw)` in a new session and process group, signalled with
    `parent_death_signal` when we die, and recorded in $NORTHSTAR_PROC_REGISTRY when set."""
    # PR_SET_PDEATHSIG follows the forking thread: a child started from a worker thread would
    # die when that thread ends, long before its owner meant to stop it. Only the main thread
    # sets it (no server here is started from another thread).
    on_main = threading.current_thread() is threading.main_thread()
    preexec = die_with_parent(parent_death_signal) if on_main else None
    proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=preexec, **popen_kw)
    _record(proc.pid, cmd[0])
    return proc


def _record(pid: int, argv0: str) -> None:
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:  # already gone: nothing left to find later
        return
    # One short write with O_APPEND: lines from concurrent processes never interleave.
    with contextlib.suppress(OSError), open(path, "a") as f:
        f.write(f"{pid} {created!r} {os.path.basename(argv0)}\n")


def read_registry(path: str | os.PathLike) -> dict[int, float]:
    """{process group id: its leader's create_time} from a registry file."""
    groups: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                groups[int(parts[0])] = float(parts[1])
    return groups


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal every process left in the group (none left: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(
    proc: subprocess.Popen,
    *,
    sig: int = signal.SIGTERM,
    timeout_s: float = 10.0,
    sweep: bool = True,
) -> int:
    """Ask the group's leader to stop with `sig` (it stops its own children in order), SIGKILL
    the whole group if it has not exited after `timeout_s`; reap it; then, with `sweep`,
    SIGKILL what is still in the group. Returns the leader's exit code.

    The group outlives its leader while any member lives, and its id is not handed out again
    until then, so the sweep reaches only what this leader started.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0f s; killing its group", proc.pid, timeout_s)
            kill_group(proc.pid)
            proc.wait()
    if sweep:
        kill_group(proc.pid)
    return proc.returncode
