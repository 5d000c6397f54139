"""Time-ordered ids (UUIDv7 layout, RFC 9562) for events and requests.

Why time-ordered: the log enforces one row per event_id with a UNIQUE index. Random ids
(UUIDv4) land on random pages of that index, so every batch rewrites pages all over it,
and ingest slows down as the log grows (measured in feedback/bench.py). Ids that start
with the clock land at the right edge of the index: one batch touches a handful of pages
whatever the size of the log. Random ids from other clients are still accepted; they only
cost more.
"""

from __future__ import annotations

import time

import numpy as np


def uuid7_batch(
    n: int, ts: float | np.ndarray | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(n,) object array of UUIDv7 hex strings; `ts` scalar or (n,) unix seconds.

    Pass a seeded `rng` for reproducible ids (the simulator does); the default draws from
    the OS. The ms prefix comes from `ts`, so seeded runs at equal `ts` give equal ids.
    """
    rng = np.random.default_rng() if rng is None else rng
    ms = np.broadcast_to(
        (np.asarray(time.time() if ts is None else ts, dtype=np.float64) * 1000).astype(np.int64),
        (n,),
    )
    rand_a = rng.integers(0, 1 << 12, size=n, dtype=np.int64)
    rand_b = rng.integers(0, 1 << 62, size=n, dtype=np.int64)
    hi = (ms.astype(np.uint64) << np.uint64(16)) | np.uint64(0x7000) | rand_a.astype(np.uint64)
    lo = (np.uint64(0b10) << np.uint64(62)) | rand_b.astype(np.uint64)
    if np.ndim(ts) == 0:
        # One clock reading for the batch: sort the random tails too, so that the batch is
        # one ascending run (RFC 9562 allows any monotonic scheme within a millisecond).
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
    out = np.empty(n, dtype=object)
    for k, (h, lo_k) in enumerate(zip(hi.tolist(), lo.tolist(), strict=True)):
        out[k] = f"{h:016x}{lo_k:016x}"
    return out
