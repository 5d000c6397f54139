"""What a run left behind: the servers it started that still run after it ended.

A run (a test session, say) marks what it starts: an environment variable that children
inherit (`mark`, a key and a value unique to the run) and a registry of the process groups
common/procs.spawn started (`registry`). Neither alone finds everything:
- nginx and redis-server write their process title over their environment, so the mark is
  gone from them;
- a server whose parent died belongs to init, no longer to the run's process tree;
- a server started some other way is found only as the run's descendant.
So a process is the run's when it carries the mark, or descends from the run's own process,
or has lost its environment and sits in a group the run started; and everything below such a
process is the run's too. Processes of other runs (their own mark) are never the run's.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.procs import read_registry

# What a leak is made of: the servers and daemons the tests and benchmarks start.
SERVER_NAMES = {
    "tritonserver": "tritonserver",
    "triton_python_backend_stub": "triton stub",
    "redis-server": "redis-server",
    "nginx": "nginx",
    "raylet": "ray",
    "gcs_server": "ray",
    "locust": "locust",
}


CLOCK_SLACK_S = 2.0


@dataclass(frozen=True)
class Leftover:
    pid: int
    kind: str
    cmdline: str
    created: float  # its create_time: a later process given the same pid is not it

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.kind}): {self.cmdline[:200]}"


def kind_of(proc: psutil.Process) -> str | None:
    """Which kind of server `proc` is, or None for anything else."""
    try:
        name = proc.name()
        argv = proc.cmdline()
    except psutil.Error:
        return None
    words = [name] + [a for a in argv[:1] if a]
    for word in words:
        # "nginx: master process ...", "redis-server 127.0.0.1:6379": the title's first word
        base = os.path.basename(word.split(" ")[0].rstrip(":"))
        if base in SERVER_NAMES:
            return SERVER_NAMES[base]
        if base.startswith("triton_python"):  # the name is cut to 15 characters
            return SERVER_NAMES["triton_python_backend_stub"]
        if base.startswith("ray::"):  # a Ray worker's title
            return "ray"
    sep = os.sep
    if any(f"{sep}ray{sep}" in a for a in argv[1:3]):  # Ray's Python daemons and workers
        return "ray"
    if any(a == "locust" for a in argv[1:3]):  # python -m locust
        return "locust"
    return None


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _environ(proc: psutil.Process) -> dict[str, str] | None:
    """Its environment; None where it is unreadable or was written over (empty)."""
    try:
        env = proc.environ()
    except psutil.Error:
        return None
    return env or None


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _in_started_group(proc: psutil.Process, groups: dict[int, float], since: float) -> bool:
    try:
        pgid = os.getpgid(proc.pid)
        created = proc.create_time()
    except (OSError, psutil.Error):
        return False
    # create_time counts from the boot time, which Linux gives in whole seconds
    if pgid not in groups or created + CLOCK_SLACK_S < since:
        return False
    try:  # a live leader must be the one recorded, not a later process given the same id
        return abs(psutil.Process(pgid).create_time() - groups[pgid]) < 0.01
    except psutil.Error:
        return True  # the leader is gone; the group id stays ours while a member lives


def find_leftovers(
    mark: tuple[str, str],
    *,
    registry: str | Path | None = None,
    root_pid: int | None = None,
    since: float = 0.0,
) -> list[Leftover]:
    """The servers the run marked `mark` started that still run. `root_pid`: the run's own
    process, if it is this machine's (its descendants are the run's). `since`: when the run
    began (a wall-clock time): nothing older belongs to it."""
    key, value = mark
    groups = read_registry(registry) if registry else {}
    below_root = {p.pid for p in _descendants(root_pid)} if root_pid is not None else set()
    ours: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid == root_pid or kind_of(proc) is None:
            continue
        env = _environ(proc)
        if env is not None and key in env:
            mine = env[key] == value  # another run's mark: never ours
        else:
            mine = proc.pid in below_root or (
                env is None and _in_started_group(proc, groups, since)
            )
        if mine:
            ours[proc.pid] = proc
    for proc in list(ours.values()):  # what a leftover started is left over with it
        for child in _descendants(proc.pid):
            ours.setdefault(child.pid, child)
    found = []
    for proc in ours.values():
        if not _running(proc):
            continue
        with contextlib.suppress(psutil.Error):
            kind = kind_of(proc) or proc.name()
            argv = " ".join(a for a in proc.cmdline() if a)  # titles pad with empty words
            found.append(Leftover(proc.pid, kind, argv, proc.create_time()))
    return sorted(found, key=lambda leftover: leftover.pid)


def wait_for_leftovers(mark: tuple[str, str], *, grace_s: float = 10.0, **kw) -> list[Leftover]:
    """find_leftovers, once what is still exiting has had `grace_s` to finish (a stub whose
    server was killed notices soon after and exits on its own)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = find_leftovers(mark, **kw)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def kill(leftovers: list[Leftover]) -> None:
    """SIGKILL each leftover (those already gone are skipped) and wait for it to go."""
    procs = []
    for leftover in leftovers:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(leftover.pid)
            if abs(proc.create_time() - leftover.created) < 0.01:
                proc.kill()
                procs.append(proc)
    psutil.wait_procs(procs, timeout=10)
