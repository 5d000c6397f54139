"""The canary's durable state: who serves, who is on trial, and every decision with its numbers.

One JSON file, `STATE_DIR/state.json`, mode 0600:

    {"production": ProductionRecord | null,
     "canary": CanaryRecord | null,
     "bias": [{"version": 3, "arp": ..., "exposure_gini": ...}, ...],   # one per production
     "last_retrain": {"id": ..., "ts": ..., "label_ts": ...} | null,   # canary or rejected
     "last_attempt": {"id": ..., "ts": ..., "status": ...} | null,     # any outcome
     "in_progress": {"id": ..., "pid": ..., "started": ...} | null,
     "history": [{"id", "ts", "kind", "decision", "reasons": [...], "evidence": {...}}, ...]}

`ProductionRecord` and `CanaryRecord` are the two typed entries: the retrain pipeline and
the online half (`canary.online`) write them with `to_dict` and read them with `from_dict`
(or `from_state`), so both sides agree on the fields. A record read from an older file
keeps the keys it does not know, and writes them back.

Writes are atomic (`common.files.write_private`: temp file, fsync, os.replace, fsync of
the folder), so a reader or a killed writer never leaves half a file. Read-modify-write
goes through `StateStore.update`, which holds `state.lock` for its duration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import filelock

from common import jsonsafe
from common.files import PRIVATE_FILE, private_dir, write_private

STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
RETRAIN_LOCK_FILE = "retrain.lock"

R = TypeVar("R", bound="_Record")


class _Record:
    """to_dict / from_dict for the records state.json stores; unknown keys round-trip."""

    state_key: ClassVar[str]
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in _fields(self)}
        return {**self.extra, **own}

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        fields = {f.name: f for f in _fields(cls)}
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"{cls.__name__}: state entry {dict(d)} lacks {missing}")
        known = {k: v for k, v in d.items() if k in fields}
        return cls(**known, extra={k: v for k, v in d.items() if k not in fields})

    @classmethod
    def from_state(cls: type[R], state: Mapping[str, Any]) -> R | None:
        d = state.get(cls.state_key)
        return cls.from_dict(d) if d else None


def _fields(obj: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if f.name != "extra"]


@dataclass
class ProductionRecord(_Record):
    """state["production"]: the version `routing.json` serves as production."""

    state_key: ClassVar[str] = "production"
    version: int
    run: str  # the training run dir it was exported from
    since: float  # when this record was written (first retrain) or the promotion
    offline: dict[str, float] | None = None  # its offline metrics when last compared
    # The base dataset retrains start from; a window or fault copy never becomes one.
    base_data: str | None = None
    mlflow_version: str | None = None  # registered model version (alias `champion`)
    previous: int | None = None  # the production version it replaced (promotion)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class CanaryRecord(_Record):
    """state["canary"]: the version on trial beside production."""

    state_key: ClassVar[str] = "canary"
    version: int
    run: str
    percent: int  # share of users routed to it
    started: float  # when it was routed: the online comparison starts here
    retrain_id: str | None = None
    base_data: str | None = None
    msprt_p: float = 1.0  # the running minimum of the always-valid p-value
    looks: int = 0  # evaluations that updated msprt_p
    # canary.inference.SequentialState as a dict: the p-value with its direction and the
    # always-valid confidence sequence, carried from look to look.
    sequential: dict[str, Any] | None = None
    offline: dict[str, float] | None = None
    bias: dict[str, float] | None = None  # its ARP and exposure Gini, for the trend
    mlflow_version: str | None = None  # registered model version (alias `challenger`)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def promoted(self, *, previous: int | None, since: float | None = None) -> ProductionRecord:
        """The production record this canary becomes when it is promoted."""
        return ProductionRecord(
            version=self.version,
            run=self.run,
            since=time.time() if since is None else since,
            offline=self.offline,
            base_data=self.base_data,
            mlflow_version=self.mlflow_version,
            previous=previous,
        )


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
    """An exclusive lock on `path` (`filelock.FileLock`: flock on Linux, so the kernel drops
    it when the holder dies, even on kill -9). The lock file is owner-only (0600) in an
    owner-only folder. Without `blocking`, a held lock raises `Busy` at once.

    No soft fallback: on a filesystem without flock a marker file would outlive a killed
    holder and block every later retrain, so acquiring fails loudly there instead.
    """
    private_dir(path.parent)
    lock = filelock.FileLock(path, mode=PRIVATE_FILE, blocking=blocking, fallback_to_soft=False)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise Busy(f"{path} is held by another process") from exc
    try:
        yield
    finally:
        lock.release()


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
        # Strict JSON (NaN is written as null); an object JSON has no form for, as its str().
        write_private(self.path, jsonsafe.dumps(state, indent=1, default=str))

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
