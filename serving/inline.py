"""`recommend` running `retrieval`'s graph in its own process (`retrieval_call: inline`).

On the cpu target `retrieval` is itself a Python model running model.onnx through
onnxruntime, so a BLS call costs two more hops between processes for every batch
(recommend stub -> server -> retrieval stub and back). Inline, each `recommend`
instance holds one onnxruntime session per routed version and runs the graph on its
own batch. `retrieval` stays loaded in Triton for batched clients, and it still
decides which versions exist: `routing.json` only names versions Triton loaded, and
this only loads versions `routing.json` names.

The cost is memory: every `recommend` instance holds each routed version's item
table once more (n_items × d float32). A version exported with an
int8 table or an ANN index (models/compact_export.py) runs the same way: RetrievalRunner
opens its int8 model.onnx, or its user tower and faiss index (models/ann.py).

Borrowing idle cores (`solo_threads`, serving/core_slots.py): each instance runs the
graph on its share of the cores, so a lone request leaves the others idle. With slots,
an instance whose peers are not running the graph runs a one-row batch on `solo_threads`
cores through a second session of the same version. That session holds the item table
once more again, so it is opened only for versions the exact or int8 graph serves (an ANN
version's faiss threads are a process-wide setting).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from models.snapshot import UserFeatures
from serving import repository as layout
from serving.backend import RetrievalRunner
from serving.core_slots import CoreSlots

log = logging.getLogger(__name__)


# A top-level `backend: "python"` line: what layout.config_target reads from the parsed
# config. Scanned as text because the gpu image has no protobuf/tritonclient to parse with.
_PYTHON_BACKEND = re.compile(r'^backend:\s*"python"\s*$', re.MULTILINE)


def resolve_retrieval_call(mode: str, repo: str | Path) -> str:
    """`auto` -> "inline" when `retrieval` is a Python model (cpu target), else "bls".

    Decided where the stub starts rather than at export, so a repository re-exported for
    the other target (with tuned configs kept) still gets the right mode.
    """
    if mode != "auto":
        return mode
    try:
        text = (Path(repo) / layout.RETRIEVAL / layout.CONFIG_FILE).read_text()
    except FileNotFoundError:
        return "bls"  # nothing exported yet: BLS fails per request with Triton's reason
    return "inline" if _PYTHON_BACKEND.search(text) else "bls"


def inline_threads(instances: int) -> int:
    """Intra-op threads per instance when not set: the cores shared among the instances.

    onnxruntime's own default (one thread per core) in every instance oversubscribes the
    cores as soon as two instances run the graph at once; 2 instances x 1 thread beat
    2 x 2 on 2 cores (loadtest/RESULTS.md, step 3).
    """
    return max(1, available_cores() // max(1, instances))


def available_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset sets)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


class InlineRetrieval:
    """`retrieve(version, features)` for serving.recommender, without a BLS call."""

    def __init__(
        self,
        repo: str | Path,
        *,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        solo_threads: int = 0,
        slots_folder: str | Path | None = None,
        instances: int = 1,
    ):
        self.repo = Path(repo)
        self.intra_op_threads = int(intra_op_threads)
        self.allow_spinning = bool(allow_spinning)
        # Widening needs peers sharing `slots_folder` (to know they are idle) and more
        # threads than this instance's share; otherwise no slot is claimed at all.
        widens = slots_folder is not None and solo_threads > self.intra_op_threads > 0
        self.slots = CoreSlots.claim(slots_folder, instances) if widens else None
        self.solo_threads = int(solo_threads) if self.slots is not None else 0
        self.wide_runs = 0  # graph runs that borrowed the idle cores
        self._batch_rows: int | None = None  # users in the dynamic batch (see `batch`)
        # A Python model instance runs one execute() at a time, so no locking here.
        self._runners: dict[int, RetrievalRunner] = {}
        self._wide: dict[int, RetrievalRunner | None] = {}
        self._unloadable: set[int] = set()  # routed versions whose warm-up failed (follow)

    def runner(self, version: int) -> RetrievalRunner:
        r = self._runners.get(version)
        if r is None:
            r = self._runners[version] = self._open(version, self.intra_op_threads)
            log.info("inline retrieval: loaded version %d", version)
        return r

    def wide_runner(self, version: int) -> RetrievalRunner | None:
        """The version's session for a lone row on `solo_threads` cores; None when this
        instance never widens or the version answers from an ANN index.

        On the exact fp32 graph it runs without prepacking: for one row the plain kernel
        streams the item table once, which beats the layout prepacked for blocked GEMM by
        a wide margin (loadtest/RESULTS.md, step 7). Its float sums differ from the packed
        kernel's in the last bits (scores within 3e-7), so two items that tie that closely
        may swap places between the sessions. The int8 graph keeps its packed integer
        kernel, which is faster there even for one row."""
        if self.slots is None:
            return None
        if version not in self._wide:
            narrow = self.runner(version)
            self._wide[version] = (
                None
                if narrow.ann is not None
                else self._open(version, self.solo_threads, prepack=narrow.mode != "exact")
            )
        return self._wide[version]

    def _open(self, version: int, threads: int, *, prepack: bool = True) -> RetrievalRunner:
        return RetrievalRunner(
            layout.version_dir(self.repo, version),
            intra_op_threads=threads,
            allow_spinning=self.allow_spinning,
            prepack=prepack,
        )

    def __call__(self, version: int, features: UserFeatures) -> tuple[np.ndarray, np.ndarray]:
        runner = self.runner(version)
        # Snapshot lookups are valid by construction; validating is cheap next to the graph
        # and turns a snapshot/graph mismatch into a clear error instead of a wrong answer.
        feeds = runner.validate(features.feeds(runner.input_names))
        if self.slots is None:
            ((ids, scores),) = runner.run([feeds])
            return ids, scores
        # Only a lone request widens: the wide session's unpacked kernel (see wide_runner) is
        # the fastest for one row and slower than the packed one from two rows up. Lone
        # means the whole batch, not this version's share of it: a canary's single row in a
        # batch with production's would otherwise run differently from production's rows,
        # and the canary's latency guardrail would compare two different kernels.
        rows = self._batch_rows if self._batch_rows is not None else len(features.user_index)
        wide = self.wide_runner(version) if rows == 1 else None
        # Even a run that cannot widen holds its slot, so a peer never widens over it.
        with self.slots.hold(widen=wide is not None) as widened:
            ((ids, scores),) = (wide if widened else runner).run([feeds])
        self.wide_runs += widened
        return ids, scores

    @contextlib.contextmanager
    def batch(self, rows: int) -> Iterator[None]:
        """Calls inside answer one dynamic batch of `rows` users, split across versions."""
        self._batch_rows = int(rows)
        try:
            yield
        finally:
            self._batch_rows = None

    def retain(self, versions: Iterable[int]) -> None:
        """Drop the sessions of versions that left the routing (their memory goes with them)."""
        keep = {int(v) for v in versions}
        for v in self._runners.keys() - keep:
            del self._runners[v]
            self._wide.pop(v, None)
            log.info("inline retrieval: released version %d", v)

    def follow(self, versions: Iterable[int]) -> None:
        """On every routing re-read: drop the versions that left, load and run once the ones
        that arrived. A new canary's sessions are then ready before its first users come:
        loading them lazily made its first requests the slowest it served, and on a busy
        machine that alone could trip the canary's latency guardrail."""
        versions = [int(v) for v in versions]
        self.retain(versions)
        self._unloadable &= set(versions)
        # A version that failed to load is not tried again every re-read (each try logs);
        # its requests still try, fail and fall back as before.
        new = [v for v in versions if v not in self._runners and v not in self._unloadable]
        self._unloadable |= set(self.warm(new))

    def warm(self, versions: Iterable[int]) -> list[int]:
        """Load (and run once) the given versions so the first request pays no load.
        Returns the versions that failed to load."""
        failed = []
        for v in versions:
            try:
                r = self.runner(int(v))
                zeros = {n: np.zeros((1, w), dtype=np.int64) for n, w in r.widths.items()}
                r.run([zeros])
                wide = self.wide_runner(int(v))
                if wide is not None:
                    wide.run([zeros])
            except Exception as exc:  # a request will retry, fail and fall back as usual
                log.warning("inline retrieval: version %s did not load: %s", v, exc)
                failed.append(int(v))
        return failed

    @property
    def versions(self) -> list[int]:
        return sorted(self._runners)
