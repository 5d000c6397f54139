"""The canary's durable state: who serves, who is on trial, and every decision with its numbers.

One JSON file, `STATE_DIR/state.json`, mode 0600:

    {"production": {"version": 3, "run": "...", "mlflow_version": "2", "since": ...},
     "canary": {"version": 4, "percent": 10, "started": ..., "msprt_p": 0.41, ...} | null,
     "bias": [{"version": 3, "arp": ..., "exposure_gini": ...}, ...],   # one per production
     "last_retrain": {"id": ..., "ts": ..., "label_ts": ...} | null,   # canary or rejected
     "last_attempt": {"id": ..., "ts": ..., "status": ...} | null,     # any outcome
     "in_progress": {"id": ..., "pid": ..., "started": ...} | null,
     "history": [{"id", "ts", "kind", "decision", "reasons": [...], "evidence": {...}}, ...]}

Writes are atomic (temp file, fsync, os.replace, fsync of the folder), so a reader or a
killed writer never leaves half a file. Read-modify-write goes through `StateStore.update`,
which holds an fcntl lock on `state.lock` for its duration.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.files import PRIVATE_FILE, private_dir, write_private

STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
RETRAIN_LOCK_FILE = "retrain.lock"


def empty_state() -> dict[str, Any]:
    return {
        "production": None,
        "canary": None,
        "bias": [],
        "last_retrain": None,
        "last_attempt": None,
        "in_progress": None,
        "history": [],
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


class Busy(RuntimeError):
    """Another process holds the lock (a retrain is already running)."""


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[None]:
    """fcntl.flock on `path`; the kernel drops it when the holder dies, even on kill -9."""
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise Busy(f"{path} is held by another process") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


class StateStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return empty_state()
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: not valid JSON ({exc})") from exc
        return {**empty_state(), **state}

    def save(self, state: dict[str, Any]) -> None:
        write_private(self.path, json.dumps(state, indent=1, default=_jsonable))

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """`with store.update() as s: s[...] = ...`: locked read, then one atomic write."""
        with file_lock(self.dir / LOCK_FILE):
            state = self.load()
            yield state
            self.save(state)

    def record(self, kind: str, decision: str, reasons: list[str], evidence: dict, **extra):
        """Append one decision to the history; returns the entry."""
        entry = {
            "id": extra.pop("id", None) or new_id(kind),
            "ts": time.time(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": kind,
            "decision": decision,
            "reasons": list(reasons),
            "evidence": evidence,
            **extra,
        }
        with self.update() as s:
            s["history"].append(entry)
        return entry

    def retrain_lock(self, *, blocking: bool = False):
        return file_lock(self.dir / RETRAIN_LOCK_FILE, blocking=blocking)


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)
