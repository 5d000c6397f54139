"""Cores a `recommend` instance may borrow while the server's other instances are idle.

Each of the N `recommend` instances (separate stub processes) runs the graph on its share
of the C cores (C / N intra-op threads), so that under load N graph runs never ask for
more threads than there are cores. A lone request then runs on one core while the others
sit idle. With slots, an instance whose peers are not running the graph right now may
run it on every core instead; when a peer wants its core back it waits for that one run.

Slot i is an advisory lock file (`flock`) in a folder private to one tritonserver process:

- an instance claims a free slot at start and keeps it for its life (a `claim-i` lock;
  the kernel releases it when the process dies, so a restarted instance claims again,
  and one that found every slot taken claims the first to be freed);
- every graph run holds its own slot (`slot-i`), waiting for it if a peer borrowed it;
- a wide run also takes every other slot that is free at this instant, never waiting,
  and runs wide only if it got all of them.

No run waits for anything but its own slot and a wide run waits for nothing, so no two
runs can wait for each other. The locks are `fcntl.flock` on descriptors opened once:
one system call each, and a blocked run sleeps in the kernel rather than polling.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def server_folder(model: str, server_pid: int | None = None) -> Path:
    """One folder per tritonserver process and model. A stub's server is its parent; the
    server's owner (serving.server) removes the folder when the server stops."""
    pid = os.getppid() if server_pid is None else server_pid
    return Path(tempfile.gettempdir()) / f"northstar-cores-{model}-{pid}"


class CoreSlots:
    """This instance's slot among `slots` in `folder`, claimed at start.

    When every slot is taken (a reload of the model overlaps its old instances for a
    moment), the instance runs unclaimed: narrow and without locks. It tries again at most
    once per `retry_s`, so once the old instances are gone it claims a freed slot.
    """

    def __init__(
        self,
        folder: str | Path,
        slots: int,
        *,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.folder = Path(folder)
        self.slots = int(slots)
        self.mine: int | None = None
        self._claim_fd: int | None = None  # held open (and locked) for the life of the process
        self._fds: list[int] = []
        self._retry_s, self._clock = retry_s, clock
        self._next_try = 0.0
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._claim():
            log.warning(
                "core slots: all %d slots in %s are claimed; this instance runs on its share "
                "of the cores until one is freed",
                self.slots,
                self.folder,
            )

    @classmethod
    def claim(cls, folder: str | Path, slots: int) -> CoreSlots | None:
        """None for a single instance: there is no peer to borrow a core from."""
        return cls(folder, slots) if slots >= 2 else None

    def _claim(self) -> bool:
        self._next_try = self._clock() + self._retry_s
        for i in range(self.slots):
            fd = os.open(self.folder / f"claim-{i}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._claim_fd, self.mine = fd, i
            self._fds = [
                os.open(self.folder / f"slot-{j}", os.O_RDWR | os.O_CREAT, 0o600)
                for j in range(self.slots)
            ]
            return True
        return False

    @contextlib.contextmanager
    def hold(self, *, widen: bool) -> Iterator[bool]:
        """Hold this instance's slot for one graph run; with `widen`, also every other slot
        if all are free now. Yields True when the run may use every core."""
        if self.mine is None and (self._clock() < self._next_try or not self._claim()):
            yield False  # unclaimed: the share of the cores, no locks
            return
        own = self._fds[self.mine]
        fcntl.flock(own, fcntl.LOCK_EX)  # waits only while a peer runs wide on our core
        taken: list[int] = []
        try:
            if widen:
                for i, fd in enumerate(self._fds):
                    if i == self.mine:
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        break
                    taken.append(fd)
            yield widen and len(taken) == len(self._fds) - 1
        finally:
            for fd in taken:
                fcntl.flock(fd, fcntl.LOCK_UN)
            fcntl.flock(own, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (*self._fds, self._claim_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds, self._claim_fd, self.mine = [], None, None
