"""Clients for the served models, on tritonclient: gRPC or HTTP, sync or asyncio.

    with RecommenderClient("localhost:8001") as c:          # gRPC (default)
        recs = c.recommend([1001, 1002], k=10)
    async with AsyncRecommenderClient("localhost:8000", protocol="http") as c:
        recs = await c.recommend([1001], k=10)  # several URLs work here too

Several replicas (`tritonserver`s serving the same versions):

    with RecommenderClient(urls=["10.0.0.1:8001", "10.0.0.2:8001"]) as c:  # or "a,b"
        recs = c.recommend([1001], k=10)
        c.failover.retries                      # requests answered by another replica

`RecommenderClient` sends each request to the next replica in turn (round-robin); one
that cannot be reached (gRPC UNAVAILABLE, a refused or reset connection) is skipped for
`down_s` and the request goes to the next one, counted in `failover` (a recommend request
is a read: asking another replica is safe; feedback is idempotent by event_id, so a batch
re-sent to another replica is stored once). Other errors (a refused input, say) are
raised, never retried elsewhere. With one URL nothing changes.

The CLI, the load tests and the simulator all go through these classes. The
connection itself (protocol, default URL per protocol, timeouts, admin headers,
closing) lives once, in TritonTransport / AsyncTritonTransport: the clients and
`serving.ingest_client.send_interactions` are built on it; feedback batches and their
retries are serving.ingest_batches'. A sync HTTP client is
not thread-safe (geventhttpclient): use one per thread; the gRPC client can be shared.
"""

from __future__ import annotations

import importlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd

from models.features import (
    INPUT_HISTORY,
    INPUT_HISTORY_TS,
    INPUT_USER_CATS,
    INPUT_USER_INDEX,
    OUTPUT_ITEM_IDS,
    OUTPUT_SCORES,
    graph_input_names,
)
from models.snapshot import FeatureSnapshot
from serving import auth
from serving import repository as layout
from serving.discovery import split_urls
from serving.ingest_batches import DEFAULT_RETRY, infer_feedback, send_batches
from serving.routing import RoutingState

Protocol = Literal["grpc", "http"]
T = TypeVar("T")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
_REC_OUTPUTS = (
    layout.REC_ITEM_IDS,
    layout.REC_SCORES,
    layout.REC_MODEL_VERSION,
    layout.REC_REQUEST_ID,
    layout.REC_COLD_START,
)


@dataclass(frozen=True)
class Recommendation:
    user_id: int
    item_ids: np.ndarray  # (k,) int64 raw item ids, best first; padding removed
    scores: np.ndarray  # (k,) float32
    model_version: int  # the retrieval version that answered
    request_id: str  # one per user slate; impressions carry it
    cold_start: bool  # the user had no online features


@dataclass(frozen=True)
class ModelStats:
    name: str
    version: str
    inference_count: int  # requests' batch rows inferred
    execution_count: int  # model executions: < inference_count when batching happened
    success_count: int
    fail_count: int
    queue_ns: int  # total time requests waited in the queue
    compute_ns: int  # total compute_infer time


_CLIENT_MODULES = {
    ("grpc", False): "tritonclient.grpc",
    ("grpc", True): "tritonclient.grpc.aio",
    ("http", False): "tritonclient.http",
    ("http", True): "tritonclient.http.aio",
}


def _module(protocol: str, aio: bool = False):
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol={protocol!r}; expected 'grpc' or 'http'")
    # lazy: only the protocol asked for is loaded (tritonclient.http brings gevent along)
    return importlib.import_module(_CLIENT_MODULES[protocol, bool(aio)])


def _input(mod, name: str, arr: np.ndarray, dtype: str):
    t = mod.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _recommend_request(mod, user_ids, k) -> tuple[np.ndarray, list, list]:
    uid = np.asarray(user_ids, dtype=np.int64).reshape(-1, 1)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int32).reshape(-1, 1), uid.shape).copy()
    inputs = [_input(mod, layout.REC_USER_ID, uid, "INT64"), _input(mod, layout.REC_K, ks, "INT32")]
    return uid[:, 0], inputs, [mod.InferRequestedOutput(n) for n in _REC_OUTPUTS]


def _parse_recommendations(result, user_ids: np.ndarray) -> list[Recommendation]:
    ids = result.as_numpy(layout.REC_ITEM_IDS)  # (B, W)
    scores = result.as_numpy(layout.REC_SCORES)
    versions = result.as_numpy(layout.REC_MODEL_VERSION).reshape(-1)
    request_ids = result.as_numpy(layout.REC_REQUEST_ID).reshape(-1)
    cold = result.as_numpy(layout.REC_COLD_START).reshape(-1)
    out = []
    for i, uid in enumerate(user_ids):
        keep = ids[i] != layout.PAD_ITEM
        rid = request_ids[i]
        out.append(
            Recommendation(
                user_id=int(uid),
                item_ids=ids[i][keep],
                scores=scores[i][keep],
                model_version=int(versions[i]),
                request_id=rid.decode() if isinstance(rid, bytes) else str(rid),
                cold_start=bool(cold[i]),
            )
        )
    return out


def _retrieve_request(mod, user_index, user_cats, history, history_ts=None):
    arrays = {
        INPUT_USER_INDEX: np.ascontiguousarray(user_index, dtype=np.int64).reshape(-1, 1),
        INPUT_USER_CATS: np.ascontiguousarray(user_cats, dtype=np.int64),
        INPUT_HISTORY: np.ascontiguousarray(history, dtype=np.int64),
    }
    if history_ts is not None:  # only graphs with time gaps take it (models.features)
        arrays[INPUT_HISTORY_TS] = np.ascontiguousarray(history_ts, dtype=np.int64)
    inputs = [_input(mod, n, a, "INT64") for n, a in arrays.items()]
    return inputs, [mod.InferRequestedOutput(n) for n in (OUTPUT_ITEM_IDS, OUTPUT_SCORES)]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _stats(raw: dict) -> dict[str, ModelStats]:
    """Model statistics from either protocol (gRPC's JSON writes int64 as strings)."""
    out = {}
    for m in raw.get("model_stats", []):
        s = m.get("inference_stats", {})

        def ns(key, s=s):
            return int(s.get(key, {}).get("ns", 0))

        def cnt(key, s=s):
            return int(s.get(key, {}).get("count", 0))

        out[str(m.get("version", ""))] = ModelStats(
            name=m["name"],
            version=str(m.get("version", "")),
            inference_count=int(m.get("inference_count", 0)),
            execution_count=int(m.get("execution_count", 0)),
            success_count=cnt("success"),
            fail_count=cnt("fail"),
            queue_ns=ns("queue"),
            compute_ns=ns("compute_infer"),
        )
    return out


class _Transport:
    """What both transports share: protocol, default URL, timeouts, tensors, closing."""

    aio = False

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol = "grpc",
        *,
        timeout_s: float = 30.0,
        verbose: bool = False,
        client: Any = None,
    ):
        self.mod = _module(protocol, aio=self.aio)  # refuses an unknown protocol first
        self.protocol: Protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.owns_client = client is None
        self.client = self._connect(verbose) if client is None else client

    def _connect(self, verbose: bool):
        t = self.timeout_s
        if self.protocol == "grpc":  # the deadline goes with each call (client_timeout)
            return self.mod.InferenceServerClient(self.url, verbose=verbose)
        if self.aio:  # aiohttp: a total time per request
            return self.mod.InferenceServerClient(self.url, verbose=verbose, conn_timeout=t)
        return self.mod.InferenceServerClient(
            self.url, verbose=verbose, connection_timeout=t, network_timeout=t
        )

    def _infer_kwargs(self, version: int | None, timeout_s: float | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"model_version": "" if version is None else str(version)}
        if self.protocol == "grpc":
            kw["client_timeout"] = self.timeout_s if timeout_s is None else timeout_s
        return kw

    def make_input(self, name: str, arr: np.ndarray, dtype: str):
        """An InferInput holding `arr`; `dtype` is Triton's name ("INT64", "BYTES", ...)."""
        return _input(self.mod, name, arr, dtype)

    def requested_outputs(self, names: Iterable[str]) -> list:
        return [self.mod.InferRequestedOutput(n) for n in names]


class TritonTransport(_Transport):
    """One sync connection to a Triton server; what every client call goes through.

        with TritonTransport("localhost:8000", "http", timeout_s=5) as t:
            result = t.infer("feedback", inputs, outputs)

    `url` None: the protocol's localhost port (DEFAULT_URLS). gRPC gets `timeout_s` as a
    per-call deadline, HTTP as its connection and network timeouts. `client`: use this
    tritonclient InferenceServerClient instead of connecting; it is borrowed, and `close()`
    leaves it open.
    """

    def infer(
        self,
        model: str,
        inputs,
        outputs,
        *,
        version: int | None = None,
        timeout_s: float | None = None,
    ):
        """One request; `timeout_s` replaces the connection's gRPC deadline for this call."""
        return self.client.infer(
            model, inputs, outputs=outputs, **self._infer_kwargs(version, timeout_s)
        )

    def is_live(self) -> bool:
        return self.client.is_server_live()

    def is_ready(self) -> bool:
        return self.client.is_server_ready()

    def model_ready(self, name: str, version: int | None = None) -> bool:
        return self.client.is_model_ready(name, "" if version is None else str(version))

    def statistics(self, model: str) -> dict[str, ModelStats]:
        """Per-version Triton statistics (gRPC's JSON and HTTP's both read the same)."""
        if self.protocol == "grpc":
            return _stats(self.client.get_inference_statistics(model, as_json=True))
        return _stats(self.client.get_inference_statistics(model))

    def model_config(self, model: str) -> dict:
        """An operator call: the model-config API needs the admin key (serving/auth.py)."""
        hdrs = auth.headers(self.protocol)
        if self.protocol == "grpc":
            return self.client.get_model_config(model, headers=hdrs, as_json=True)["config"]
        return self.client.get_model_config(model, headers=hdrs)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def __enter__(self) -> TritonTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTritonTransport(_Transport):
    """TritonTransport on tritonclient's asyncio clients; the same methods, awaited."""

    aio = True

    async def infer(
        self,
        model: str,
        inputs,
        outputs,
        *,
        version: int | None = None,
        timeout_s: float | None = None,
    ):
        return await self.client.infer(
            model, inputs, outputs=outputs, **self._infer_kwargs(version, timeout_s)
        )

    async def is_live(self) -> bool:
        return await self.client.is_server_live()

    async def is_ready(self) -> bool:
        return await self.client.is_server_ready()

    async def model_ready(self, name: str, version: int | None = None) -> bool:
        return await self.client.is_model_ready(name, "" if version is None else str(version))

    async def statistics(self, model: str) -> dict[str, ModelStats]:
        if self.protocol == "grpc":
            return _stats(await self.client.get_inference_statistics(model, as_json=True))
        return _stats(await self.client.get_inference_statistics(model))

    async def close(self) -> None:
        if self.owns_client:
            await self.client.close()

    async def __aenter__(self) -> AsyncTritonTransport:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def unreachable(exc: BaseException) -> bool:
    """True when `exc` says the server could not be reached or went away mid-call (the
    request may be sent to another replica), False for an answer (a refused input, a model
    error): asking another replica would only repeat it."""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    status = getattr(exc, "status", None)
    status = (status() if callable(status) else status) or ""
    if "UNAVAILABLE" in str(status):
        return True
    m = getattr(exc, "message", None)
    text = str(m() if callable(m) else exc).lower()
    return any(
        p in text
        for p in (
            "failed to connect",
            "connection refused",
            "connection reset",
            "socket closed",
            "stream removed",
            "broken pipe",
        )
    )


@dataclass
class FailoverStats:
    """How a client with several replicas spread its requests."""

    requests: Counter = field(default_factory=Counter)  # url -> calls it answered
    failed: Counter = field(default_factory=Counter)  # url -> calls it could not take
    retries: int = 0  # calls sent again to another replica after one was unreachable


class _ClientBase:
    """What both clients share: transports (one per server URL), and how many users go in
    one request."""

    _transport_cls: type[_Transport]

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        protocol: Protocol = "grpc",
        *,
        urls: Iterable[str] | None = None,
        timeout_s: float = 30.0,
        max_batch_size: int = 256,
        retrieval_batch_size: int = 1024,
        verbose: bool = False,
        transport: _Transport | None = None,
        down_s: float = 1.0,
    ):
        addrs = split_urls(url, urls)
        if transport is not None:
            self.transports = [transport]
        else:
            self.transports = [
                self._transport_cls(u, protocol, timeout_s=timeout_s, verbose=verbose)
                for u in (addrs or [None])
            ]
        # The first server: what single-server callers (send_feedback, statistics) use.
        self.transport = self.transports[0]
        self.max_batch_size = max_batch_size  # recommend's max_batch_size
        self.retrieval_batch_size = retrieval_batch_size
        # A replica that could not be reached is skipped for this long (then tried again).
        self.down_s = down_s
        self.failover = FailoverStats()
        self._next = itertools.count()
        self._down_until = [0.0] * len(self.transports)
        self._lock = threading.Lock()

    @property
    def protocol(self) -> Protocol:
        return self.transport.protocol

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    def urls(self) -> list[str]:
        return [t.url for t in self.transports]

    def _order(self) -> list[int]:
        """Replicas to try for one call: round-robin, the ones marked down last."""
        n = len(self.transports)
        start = next(self._next) % n
        order = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        return [i for i in order if self._down_until[i] <= now] + [
            i for i in order if self._down_until[i] > now
        ]

    def _failed(self, i: int, exc: Exception) -> None:
        """Replica i could not take a call: mark it down, or raise `exc` when the error is
        not about reaching it (a refused input is the same on every replica)."""
        if not unreachable(exc):
            raise exc
        with self._lock:
            self._down_until[i] = time.monotonic() + self.down_s
            self.failover.failed[self.transports[i].url] += 1

    def _answered(self, i: int, retried: int) -> None:
        with self._lock:
            self._down_until[i] = 0.0
            self.failover.requests[self.transports[i].url] += 1
            self.failover.retries += retried

    @property
    def timeout_s(self) -> float:
        return self.transport.timeout_s


class RecommenderClient(_ClientBase):
    """Sync client. `recommend` calls the `recommend` model; `retrieve` calls `retrieval`.

    The connection is `self.transport` (a TritonTransport): pass one to share it, or a URL
    and protocol to open one that `close()` closes.
    """

    _transport_cls = TritonTransport
    transport: TritonTransport
    transports: list[TritonTransport]

    def _call(self, fn: Callable[[TritonTransport], T]) -> T:
        """`fn` on the next replica; on one that cannot be reached, on the next (counted).
        With one server: `fn` on it, errors raised as they come."""
        if len(self.transports) == 1:
            return fn(self.transport)
        last: BaseException | None = None
        retried = 0
        for i in self._order():
            try:
                out = fn(self.transports[i])
            except Exception as exc:
                self._failed(i, exc)
                last, retried = exc, retried + 1
                continue
            self._answered(i, retried)
            return out
        assert last is not None
        raise last

    def recommend(
        self, user_ids: int | Sequence[int] | np.ndarray, k: int | Sequence[int] = 10
    ) -> list[Recommendation]:
        """Top-k unseen items per user, in order. Sends max_batch_size users per request."""
        uid = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
        ks = np.broadcast_to(np.asarray(k, dtype=np.int32), uid.shape)
        out: list[Recommendation] = []
        mod = self.transport.mod
        for sl in _chunks(len(uid), self.max_batch_size):
            ids, inputs, outputs = _recommend_request(mod, uid[sl], ks[sl])
            result = self._call(lambda t, i=inputs, o=outputs: t.infer(layout.RECOMMEND, i, o))
            out += _parse_recommendations(result, ids)
        return out

    def retrieve(
        self,
        user_index: np.ndarray,
        user_cats: np.ndarray,
        history: np.ndarray,
        *,
        version: int | None = None,
        history_ts: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw `retrieval`: (item_ids (B, K), scores (B, K)), seen items included.

        `history_ts` (B, H): the history's unix seconds, for a version whose graph reads time
        gaps (its meta.json lists the input); leave it out for any other version."""
        n = len(user_index)
        ids, scores = [], []
        mod = self.transport.mod
        for sl in _chunks(n, self.retrieval_batch_size):
            ts = None if history_ts is None else history_ts[sl]
            inputs, outputs = _retrieve_request(mod, user_index[sl], user_cats[sl], history[sl], ts)
            r = self._call(
                lambda t, i=inputs, o=outputs: t.infer(layout.RETRIEVAL, i, o, version=version)
            )
            ids.append(r.as_numpy(OUTPUT_ITEM_IDS))
            scores.append(r.as_numpy(OUTPUT_SCORES))
        return np.concatenate(ids), np.concatenate(scores)

    def send_feedback(self, events, *, batch_size: int = 1024, retry=None):
        """Interactions (click, watch, like) to the `feedback` model, on this connection.

        `events`: a DataFrame, dict of columns or list of feedback.events.Interaction.
        Returns serving.ingest_batches.IngestResult: per-event accepted flag and reason.
        Resending is safe: the log keeps an event_id once.
        """
        # Through this client, so batches fail over across its replicas like reads do.
        return send_batches(
            lambda model, arrays: self._call(lambda t: infer_feedback(t, model, arrays)),
            events,
            batch_size=batch_size,
            retry=retry or DEFAULT_RETRY,
        )

    def is_live(self) -> bool:
        return self.transport.is_live()

    def is_ready(self) -> bool:
        return self.transport.is_ready()

    def model_ready(self, name: str = layout.RECOMMEND, version: int | None = None) -> bool:
        return self.transport.model_ready(name, version)

    def statistics(self, model: str = layout.RECOMMEND) -> dict[str, ModelStats]:
        """Per-version Triton statistics (inference_count, execution_count, queue time, ...)."""
        return self.transport.statistics(model)

    def model_config(self, model: str) -> dict:
        """An operator call: the model-config API needs the admin key (serving/auth.py)."""
        return self.transport.model_config(model)

    def close(self) -> None:
        for t in self.transports:
            t.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRecommenderClient(_ClientBase):
    """asyncio client (tritonclient.grpc.aio / tritonclient.http.aio); same methods, awaited,
    and the same round-robin with failover over several replicas."""

    _transport_cls = AsyncTritonTransport
    transport: AsyncTritonTransport

    transports: list[AsyncTritonTransport]

    async def _call(self, fn: Callable[[AsyncTritonTransport], Awaitable[T]]) -> T:
        """The sync client's failover, awaited: `fn` on the next replica, and on the next
        one (counted) when a replica cannot be reached."""
        if len(self.transports) == 1:
            return await fn(self.transport)
        last: BaseException | None = None
        retried = 0
        for i in self._order():
            try:
                out = await fn(self.transports[i])
            except Exception as exc:
                self._failed(i, exc)
                last, retried = exc, retried + 1
                continue
            self._answered(i, retried)
            return out
        assert last is not None
        raise last

    async def recommend(
        self, user_ids: int | Sequence[int] | np.ndarray, k: int | Sequence[int] = 10
    ) -> list[Recommendation]:
        uid = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
        ks = np.broadcast_to(np.asarray(k, dtype=np.int32), uid.shape)
        out: list[Recommendation] = []
        mod = self.transport.mod
        for sl in _chunks(len(uid), self.max_batch_size):
            ids, inputs, outputs = _recommend_request(mod, uid[sl], ks[sl])
            result = await self._call(
                lambda t, i=inputs, o=outputs: t.infer(layout.RECOMMEND, i, o)
            )
            out += _parse_recommendations(result, ids)
        return out

    async def retrieve(
        self,
        user_index: np.ndarray,
        user_cats: np.ndarray,
        history: np.ndarray,
        *,
        version: int | None = None,
        history_ts: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = [], []
        mod = self.transport.mod
        for sl in _chunks(len(user_index), self.retrieval_batch_size):
            ts = None if history_ts is None else history_ts[sl]
            inputs, outputs = _retrieve_request(mod, user_index[sl], user_cats[sl], history[sl], ts)
            r = await self._call(
                lambda t, i=inputs, o=outputs: t.infer(layout.RETRIEVAL, i, o, version=version)
            )
            ids.append(r.as_numpy(OUTPUT_ITEM_IDS))
            scores.append(r.as_numpy(OUTPUT_SCORES))
        return np.concatenate(ids), np.concatenate(scores)

    async def is_live(self) -> bool:
        return await self.transport.is_live()

    async def is_ready(self) -> bool:
        return await self.transport.is_ready()

    async def model_ready(self, name: str = layout.RECOMMEND, version: int | None = None) -> bool:
        return await self.transport.model_ready(name, version)

    async def statistics(self, model: str = layout.RECOMMEND) -> dict[str, ModelStats]:
        return await self.transport.statistics(model)

    async def close(self) -> None:
        for t in self.transports:
            await t.close()

    async def __aenter__(self) -> AsyncRecommenderClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def recommend_all_users(
    client: RecommenderClient,
    repo: str,
    *,
    k: int = 10,
    batch_size: int = 1024,
    version: int | None = None,
    keep_seen: bool = False,
    progress: bool = True,
):
    """Top-k for every user in a version's online snapshot, through `retrieval` in big batches.

    Returns a DataFrame (user_id, rank (1-based), item_id, score). Seen items are removed
    as `recommend` does, unless keep_seen.
    """
    # lazy: only this batch export needs them, and `northstar --help` imports this module
    from tqdm.auto import tqdm

    from serving.recommender import select_unseen

    if version is None:
        version = RoutingState.load(layout.routing_path(repo)).production
    meta = layout.read_meta(repo, version)
    k = min(int(k), int(meta["graph_k"]))
    time_gaps = INPUT_HISTORY_TS in graph_input_names(meta)
    snap = FeatureSnapshot.load(layout.features_path(repo, version))
    client.retrieval_batch_size = batch_size
    frames = []
    with tqdm(
        total=len(snap.user_ids), unit="user", disable=not progress, desc=f"retrieval v{version}"
    ) as bar:
        for sl in _chunks(len(snap.user_ids), batch_size):
            feats = snap.lookup(snap.user_ids[sl])
            ids, scores = client.retrieve(
                feats.user_index,
                feats.user_cats,
                feats.history,
                version=version,
                history_ts=feats.history_ts if time_gaps else None,
            )
            seen = [np.zeros(0, np.int64)] * len(ids) if keep_seen else feats.seen
            ks = np.full(len(ids), k, dtype=np.int64)
            ids, scores, counts = select_unseen(ids, scores, seen, ks)
            rows, pos = np.nonzero(np.arange(ids.shape[1])[None, :] < counts[:, None])
            frames.append(
                pd.DataFrame(
                    {
                        "user_id": snap.user_ids[sl][rows],
                        "rank": (pos + 1).astype(np.int32),
                        "item_id": ids[rows, pos],
                        "score": scores[rows, pos],
                    }
                )
            )
            bar.update(len(ids))
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame({"user_id": [], "rank": [], "item_id": [], "score": []})
    )
