"""Send interactions to the Triton `feedback` model, over gRPC or HTTP, with retries.

    from serving.ingest_client import send_interactions
    result = send_interactions("localhost:8001", events, protocol="grpc")
    result.accepted  # (n,) bool, in input order; result.reasons: "" or "field: problem"

The connection is serving.client's TritonTransport, the one every client goes through:
pass a URL (a connection is opened and closed here), a TritonTransport, a
RecommenderClient (`RecommenderClient.send_feedback` delegates here) or a tritonclient
InferenceServerClient; a passed connection is used as it is and left open. With several
replicas a batch that one cannot take goes to the next (RecommenderClient's failover). Retrying is
safe because the log stores an event_id once: a batch whose response was lost is re-sent
and the second copy is ignored.
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
from serving.client import AsyncTritonTransport, RecommenderClient, TritonTransport, split_urls

log = logging.getLogger(__name__)

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


def _tensor_array(name: str, values: np.ndarray) -> np.ndarray:
    dtype = INPUTS[name]
    if dtype == "BYTES":
        out = np.empty((len(values), 1), dtype=object)
        out[:, 0] = [
            v if isinstance(v, bytes) else ("" if v is None else str(v)).encode() for v in values
        ]
        return out
    return np.asarray(values, dtype=_NUMPY[dtype]).reshape(-1, 1)


class _Sender:
    """Where batches go: one connection, or a RecommenderClient's replicas with its
    failover (an unreachable replica is skipped and the batch goes to the next one)."""

    def __init__(self, client_or_url: Any, protocol: str, timeout_s: float):
        self.client: RecommenderClient | None = None
        self.transport: TritonTransport | None = None
        self.opened = False
        if client_or_url is None or isinstance(client_or_url, str):
            if len(split_urls(client_or_url)) > 1:
                self.client = RecommenderClient(client_or_url, protocol, timeout_s=timeout_s)
            else:
                self.transport = TritonTransport(client_or_url, protocol, timeout_s=timeout_s)
            self.opened = True
        elif isinstance(client_or_url, AsyncTritonTransport) or isinstance(
            getattr(client_or_url, "transport", None), AsyncTritonTransport
        ):
            raise TypeError("client_or_url: an asyncio client; send_interactions is sync")
        elif isinstance(client_or_url, TritonTransport):
            self.transport = client_or_url
        elif isinstance(client_or_url, RecommenderClient):
            self.client = client_or_url
        elif hasattr(client_or_url, "infer"):  # a tritonclient InferenceServerClient
            module = type(client_or_url).__module__
            proto = "http" if module.startswith("tritonclient.http") else protocol
            self.transport = TritonTransport(
                protocol=proto, timeout_s=timeout_s, client=client_or_url
            )
        else:
            raise TypeError(
                "client_or_url: expected a URL (or several, comma-separated), a "
                "TritonTransport, a RecommenderClient or a tritonclient client, got "
                f"{type(client_or_url).__name__}"
            )

    def send(self, model: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.client is not None:
            return self.client._call(lambda t: _infer(t, model, arrays))
        assert self.transport is not None
        return _infer(self.transport, model, arrays)

    def close(self) -> None:
        if self.opened:
            (self.client or self.transport).close()


def _infer(transport: TritonTransport, model: str, arrays: dict[str, np.ndarray]):
    inputs = [transport.make_input(name, arr, INPUTS[name]) for name, arr in arrays.items()]
    r = transport.infer(model, inputs, transport.requested_outputs(OUTPUTS))
    return r.as_numpy("accepted").reshape(-1), r.as_numpy("reason").reshape(-1)


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

    `client_or_url`: a URL ("host:port"; None: the protocol's localhost port) or several
    ("a:8001,b:8001": replicas, with failover), opened with `protocol` and `timeout_s` and
    closed at the end; or a connection to borrow (a TritonTransport, a RecommenderClient,
    whose replicas are used with its failover, a tritonclient client), which keeps its own
    protocol and timeout and stays open.
    A batch that still fails when the retry policy gives up is reported (failed_batches,
    and "send failed: ..." reasons) rather than raised, so a caller can count and move on.
    A request the server rejects as malformed (an input error) is not retried.
    """
    cols = as_columns(events)
    n = len(cols["event_id"])
    accepted = np.zeros(n, dtype=bool)
    reasons = [""] * n
    res = IngestResult(accepted, reasons)
    sender = _Sender(client_or_url, protocol, timeout_s)

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
                        ok, why = sender.send(model_name, arrays)
                accepted[sl] = ok.astype(bool)
                reasons[sl] = [w.decode() if isinstance(w, bytes) else str(w) for w in why]
            except Exception as exc:
                msg = _message(exc)
                res.failed_batches += 1
                res.errors.append(msg)
                reasons[sl] = [f"send failed: {msg}"] * (sl.stop - sl.start)
                log.warning("feedback batch %d failed: %s", res.batches, msg)
    finally:
        sender.close()
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
