"""Interactions to the Triton `feedback` model in batches, with retries: the part that both
`serving.ingest_client.send_interactions` and `RecommenderClient.send_feedback` use.

`send_batches(send, events)` turns events into the model's tensors, batch by batch, and
calls `send(model, arrays) -> (accepted, reasons)` under the retry policy; the caller
chooses where a batch goes (one connection, or a client's replicas with its failover).
Retrying is safe because the log stores an event_id once: a batch whose response was lost
is re-sent and the second copy is ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common.retry import RetryPolicy, retrying
from feedback.events import Interaction, to_columns
from feedback.ids import uuid7_batch
from feedback.ingest import INPUTS, MODEL_NAME, OUTPUTS

log = logging.getLogger(__name__)

# (model, tensors) -> (accepted, reason) per row; raises when the batch did not get through.
Send = Callable[[str, dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]

DEFAULT_RETRY = RetryPolicy()  # frozen: safe as a shared default
_NUMPY = {"INT64": np.int64, "FP32": np.float32, "FP64": np.float64, "BYTES": object}


@dataclass
class IngestResult:
    accepted: np.ndarray  # (n,) bool; False for quarantined and for failed batches
    reasons: list[str]  # (n,) "" = accepted; "field: problem"; "send failed: ..." if never acked
    batches: int = 0
    retries: int = 0
    failed_batches: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def n_accepted(self) -> int:
        return int(self.accepted.sum())

    def reason_counts(self) -> dict[str, int]:
        s = pd.Series([r for r in self.reasons if r], dtype=object)
        return {str(k): int(v) for k, v in s.value_counts().items()}


def as_columns(events: Any) -> dict[str, np.ndarray]:
    """Interactions as columns: a DataFrame, a dict of arrays, or a list of Interaction.

    A missing event_id column is filled with time-ordered ids (feedback.ids) and a missing
    request_id column with "" (attribute by user and item).
    """
    if isinstance(events, pd.DataFrame):
        cols = {c: events[c].to_numpy() for c in events.columns}
    elif isinstance(events, Mapping):
        cols = {c: np.asarray(v) for c, v in events.items()}
    elif isinstance(events, Sequence) and events and isinstance(events[0], Interaction):
        cols = to_columns(events)
    else:
        raise TypeError(
            "events: expected a DataFrame, a dict of columns or a list of "
            f"Interaction, got {type(events).__name__}"
        )
    n = len(next(iter(cols.values()))) if cols else 0
    if "event_id" not in cols:
        cols["event_id"] = uuid7_batch(n, ts=np.asarray(cols.get("ts", time.time()), float))
    if "request_id" not in cols:
        cols["request_id"] = np.full(n, "", dtype=object)
    return cols


def tensor_array(name: str, values: np.ndarray) -> np.ndarray:
    dtype = INPUTS[name]
    if dtype == "BYTES":
        out = np.empty((len(values), 1), dtype=object)
        out[:, 0] = [
            v if isinstance(v, bytes) else ("" if v is None else str(v)).encode() for v in values
        ]
        return out
    return np.asarray(values, dtype=_NUMPY[dtype]).reshape(-1, 1)


def infer_feedback(transport: Any, model: str, arrays: dict[str, np.ndarray]):
    """One batch of feedback tensors on `transport` (a serving.client.TritonTransport):
    (accepted, reason) per row."""
    inputs = [transport.make_input(name, arr, INPUTS[name]) for name, arr in arrays.items()]
    r = transport.infer(model, inputs, transport.requested_outputs(OUTPUTS))
    return r.as_numpy("accepted").reshape(-1), r.as_numpy("reason").reshape(-1)


def send_batches(
    send: Send,
    events: Any,
    *,
    model_name: str = MODEL_NAME,
    batch_size: int = 1024,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> IngestResult:
    """Send events in batches through `send`; retry a failed batch with exponential backoff
    and jitter. A batch that still fails when the retry policy gives up is reported
    (failed_batches, and "send failed: ..." reasons) rather than raised, so a caller can
    count and move on. A request the server rejects as malformed (an input error) is not
    retried."""
    cols = as_columns(events)
    n = len(cols["event_id"])
    accepted = np.zeros(n, dtype=bool)
    reasons = [""] * n
    res = IngestResult(accepted, reasons)

    def _count(_exc: BaseException, _attempt: int) -> None:
        res.retries += 1

    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        arrays = {
            name: tensor_array(name, np.asarray(cols[name])[sl]) for name in INPUTS if name in cols
        }
        res.batches += 1
        try:
            for attempt in retrying(retry, retry_if=_retryable, on_retry=_count):
                with attempt:
                    ok, why = send(model_name, arrays)
            accepted[sl] = ok.astype(bool)
            reasons[sl] = [w.decode() if isinstance(w, bytes) else str(w) for w in why]
        except Exception as exc:
            msg = _message(exc)
            res.failed_batches += 1
            res.errors.append(msg)
            reasons[sl] = [f"send failed: {msg}"] * (sl.stop - sl.start)
            log.warning("feedback batch %d failed: %s", res.batches, msg)
    return res


def _message(exc: Exception) -> str:
    m = getattr(exc, "message", None)
    text = m() if callable(m) else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    return not _is_input_error(_message(exc))


def _is_input_error(message: str) -> bool:
    # parse_request's errors name an input: resending the same tensors cannot succeed.
    return "input '" in message and (
        "missing" in message or "rows" in message or "shape" in message
    )
