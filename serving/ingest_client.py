"""Send interactions to the Triton `feedback` model, over gRPC or HTTP, with retries.

    from serving.ingest_client import send_interactions
    result = send_interactions("localhost:8001", events, protocol="grpc")
    result.accepted  # (n,) bool, in input order; result.reasons: "" or "field: problem"

The connection is serving.client's TritonTransport, the one every client goes through:
pass a URL (a connection is opened and closed here), a TritonTransport, a
RecommenderClient or a tritonclient InferenceServerClient; a passed connection is used as
it is and left open. With several replicas a batch that one cannot take goes to the next
(RecommenderClient's failover). The batches and their retries are
serving.ingest_batches', which `RecommenderClient.send_feedback` uses too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.retry import RetryPolicy
from feedback.ingest import MODEL_NAME
from serving.client import AsyncTritonTransport, RecommenderClient, TritonTransport, split_urls
from serving.ingest_batches import DEFAULT_RETRY, IngestResult, infer_feedback, send_batches


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
            return self.client._call(lambda t: infer_feedback(t, model, arrays))
        assert self.transport is not None
        return infer_feedback(self.transport, model, arrays)

    def close(self) -> None:
        if self.opened:
            (self.client or self.transport).close()


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
    Batching, retries and what a failed batch reports: serving.ingest_batches.send_batches.
    """
    sender = _Sender(client_or_url, protocol, timeout_s)
    try:
        return send_batches(
            sender.send, events, model_name=model_name, batch_size=batch_size, retry=retry
        )
    finally:
        sender.close()
