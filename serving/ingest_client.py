"""Send interactions to the Triton `feedback` model, over gRPC or HTTP, with retries.

    from serving.ingest_client import send_interactions
    result = send_interactions("localhost:8001", events, protocol="grpc")
    result.accepted  # (n,) bool, in input order; result.reasons: "" or "field: problem"

Written on tritonclient directly (serving/client.py belongs to serving); a thin method on
RecommenderClient can delegate here. Retrying is safe because the log stores an event_id
once: a batch whose response was lost is re-sent and the second copy is ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common.retry import RetryPolicy, retrying
from feedback.events import Interaction, to_columns
from feedback.ids import uuid7_batch
from feedback.ingest import INPUTS, MODEL_NAME, OUTPUTS

log = logging.getLogger(__name__)

DEFAULT_RETRY = RetryPolicy()  # frozen: safe as a shared default
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
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


def _tensor_array(name: str, values: np.ndarray) -> np.ndarray:
    dtype = INPUTS[name]
    if dtype == "BYTES":
        out = np.empty((len(values), 1), dtype=object)
        out[:, 0] = [
            v if isinstance(v, bytes) else ("" if v is None else str(v)).encode() for v in values
        ]
        return out
    return np.asarray(values, dtype=_NUMPY[dtype]).reshape(-1, 1)


class _Client:
    """A tritonclient InferenceServerClient for one protocol, created or borrowed."""

    def __init__(self, client_or_url: Any, protocol: str, timeout_s: float) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as mod
        elif protocol == "http":
            import tritonclient.http as mod
        else:
            raise ValueError(f"protocol={protocol!r}; expected 'grpc' or 'http'")
        self.mod, self.protocol, self.timeout_s = mod, protocol, timeout_s
        inner = getattr(client_or_url, "_client", None)  # serving.client.RecommenderClient
        if isinstance(client_or_url, str) or client_or_url is None:
            url = client_or_url or DEFAULT_URLS[protocol]
            kwargs = (
                {}
                if protocol == "grpc"
                else {"connection_timeout": timeout_s, "network_timeout": timeout_s}
            )
            self.client, self.owned = mod.InferenceServerClient(url, **kwargs), True
        elif hasattr(client_or_url, "infer"):
            self.client, self.owned = client_or_url, False
        elif inner is not None and hasattr(inner, "infer"):
            self.client, self.owned = inner, False
        else:
            raise TypeError("client_or_url: expected a URL or a tritonclient client")

    def infer(self, model: str, arrays: dict[str, np.ndarray]):
        inputs = []
        for name, arr in arrays.items():
            t = self.mod.InferInput(name, list(arr.shape), INPUTS[name])
            t.set_data_from_numpy(arr)
            inputs.append(t)
        outputs = [self.mod.InferRequestedOutput(n) for n in OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        r = self.client.infer(model, inputs, outputs=outputs, **kwargs)
        return r.as_numpy("accepted").reshape(-1), r.as_numpy("reason").reshape(-1)

    def close(self) -> None:
        if self.owned:
            self.client.close()


def send_interactions(
    client_or_url: Any,
    events: Any,
    *,
    protocol: str = "grpc",
    model_name: str = MODEL_NAME,
    batch_size: int = 1024,
    retry: RetryPolicy = DEFAULT_RETRY,
    timeout_s: float = 30.0,
) -> IngestResult:
    """Send events in batches; retry a failed batch with exponential backoff and jitter.

    A batch that still fails when the retry policy gives up is reported (failed_batches,
    and "send failed: ..." reasons) rather than raised, so a caller can count and move on.
    A request the server rejects as malformed (an input error) is not retried.
    """
    cols = as_columns(events)
    n = len(cols["event_id"])
    accepted = np.zeros(n, dtype=bool)
    reasons = [""] * n
    res = IngestResult(accepted, reasons)
    client = _Client(client_or_url, protocol, timeout_s)

    def _count(_exc: BaseException, _attempt: int) -> None:
        res.retries += 1

    try:
        for start in range(0, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            arrays = {
                name: _tensor_array(name, np.asarray(cols[name])[sl])
                for name in INPUTS
                if name in cols
            }
            res.batches += 1
            try:
                for attempt in retrying(retry, retry_if=_retryable, on_retry=_count):
                    with attempt:
                        ok, why = client.infer(model_name, arrays)
                accepted[sl] = ok.astype(bool)
                reasons[sl] = [w.decode() if isinstance(w, bytes) else str(w) for w in why]
            except Exception as exc:
                msg = _message(exc)
                res.failed_batches += 1
                res.errors.append(msg)
                reasons[sl] = [f"send failed: {msg}"] * (sl.stop - sl.start)
                log.warning("feedback batch %d failed: %s", res.batches, msg)
    finally:
        client.close()
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
