"""Interaction ingest for the Triton `feedback` model, without Triton in the way.

The model (model_repository/feedback/1/model.py) only turns request tensors into numpy
and results back into tensors; this module does the rest, so it is tested without a
server and the same code runs inside one:

1. per request: read the seven inputs; a missing input or a length mismatch fails *that
   request* with an error naming the field (the others in the batch go on);
2. all good requests Triton hands over at once are concatenated and written through the
   sink in ONE call (one transaction, one fsync) before any response is sent;
3. per event: accepted = stored or already stored; otherwise the quarantine reason.

The committed config runs each request alone (no dynamic batcher): Triton's Python
backend checks the BYTES inputs of everything it hands over together before this code
runs, so a malformed request batched with others failed them all (issue 31).

Why a Triton model and not a FastAPI service: see feedback/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from feedback.events import INTERACTION_FIELDS, EventError
from feedback.sink_api import EventSink

MODEL_NAME = "feedback"
# Triton dtypes of the model's inputs, in order; each is [B, 1] with B events.
INPUTS: dict[str, str] = {
    "event_id": "BYTES",
    "user_id": "INT64",
    "item_id": "INT64",
    "type": "BYTES",
    "value": "FP32",
    "ts": "FP64",
    "request_id": "BYTES",  # b"" = the client did not keep the request id
}
OUTPUTS: dict[str, str] = {"accepted": "BOOL", "reason": "BYTES"}
assert list(INPUTS) == list(INTERACTION_FIELDS)  # one schema, two spellings


@dataclass(frozen=True)
class RequestOutcome:
    accepted: np.ndarray  # (n, 1) bool
    reason: np.ndarray  # (n, 1) object: bytes, b"" when accepted


def parse_request(get: Callable[[str], np.ndarray | None]) -> dict[str, np.ndarray]:
    """Columns of one request; `get(name)` returns the input as numpy or None if absent."""
    cols: dict[str, np.ndarray] = {}
    n = None
    for name in INPUTS:
        arr = get(name)
        if arr is None:
            raise EventError(f"input '{name}' is missing; expected {INPUTS[name]} [n, 1]")
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise EventError(f"input '{name}' has shape {arr.shape}; expected [n, 1]")
        if n is None:
            n = len(arr)
        elif len(arr) != n:
            raise EventError(f"input '{name}' has {len(arr)} rows; 'event_id' has {n}")
        cols[name] = arr
    return cols


def ingest(
    sink: EventSink, requests: list[dict[str, np.ndarray] | Exception]
) -> list[RequestOutcome | Exception]:
    """Write every parsed request of a batch in one sink call; split the results back.

    Entries that are exceptions (parse errors) pass through in place. If the sink itself
    fails, the exception propagates: nothing was acknowledged, the client must retry.
    """
    good = [r for r in requests if not isinstance(r, Exception)]
    if not good:
        return list(requests)
    columns = {name: np.concatenate([r[name] for r in good]) for name in INPUTS}
    result = sink.write_interactions(columns)
    accepted = result.accepted
    reasons = np.asarray([r.encode() for r in result.reasons], dtype=object)
    out: list[RequestOutcome | Exception] = []
    start = 0
    for r in requests:
        if isinstance(r, Exception):
            out.append(r)
            continue
        sl = slice(start, start + len(r["event_id"]))
        start = sl.stop
        out.append(RequestOutcome(accepted[sl, None].copy(), reasons[sl, None].copy()))
    return out
