"""A light closed-loop load generator that runs in its own process.

On a 2-core machine every CPU cycle the client spends is one the server does not
get, so the harness keeps per-request client work small:

- gRPC requests are `ModelInferRequest` protobufs serialised once, up front, and sent
  as bytes on a `grpc.aio` channel (what tritonclient.grpc.aio does per call, minus
  building InferInput objects and the protobuf every time); responses are parsed;
- HTTP requests (the naive peer) are prepared GET URLs on one aiohttp session;
- `concurrency` coroutines each keep one request in flight (a closed loop), like
  perf_analyzer's concurrency mode.

`LoadGenerator` runs each `LoadSpec` in a fresh `python -m loadtest.loadgen` process;
only the spec goes in and only the summary comes back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import aiohttp
import grpc
import numpy as np
from tritonclient.grpc import service_pb2

GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_NP_TO_TRITON = {
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.bool_): "BOOL",
}


@dataclass(frozen=True)
class LoadSpec:
    kind: Literal["grpc", "http"]
    url: str  # grpc: host:port; http: base URL, e.g. http://127.0.0.1:8080
    payloads: tuple  # grpc: serialised ModelInferRequest bytes; http: URL paths
    rows_per_request: int  # users per request, so that throughput is in queries (users)/s
    concurrency: int
    duration_s: float
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    # The window stays open past `duration_s` until this many requests have completed in it,
    # so a server slower than the window (a busy machine, a short smoke run) still gives a
    # measurement instead of zero requests; `window_s` reports how long it really was.
    min_requests: int = 1


@dataclass
class LoadResult:
    concurrency: int
    rows_per_request: int
    requests: int  # completed inside the measured window, failures included
    failures: int
    window_s: float
    qps: float  # rows (users) per second, successful requests only
    rps: float  # requests per second, successful only
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    client_cpu_s: float  # CPU the generator process used during warmup + window
    first_error: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def infer_request(
    model: str,
    inputs: dict[str, np.ndarray],
    outputs: tuple[str, ...] | list[str],
    *,
    version: str = "",
) -> bytes:
    """A serialised `ModelInferRequest` with raw (binary) input contents."""

    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, arr in inputs.items():
        arr = np.ascontiguousarray(arr)
        t = req.inputs.add()
        t.name = name
        t.datatype = _NP_TO_TRITON[arr.dtype]
        t.shape.extend(arr.shape)
        req.raw_input_contents.append(arr.tobytes())
    for name in outputs:
        req.outputs.add().name = name
    return req.SerializeToString()


def summarize(
    latencies_s: list[float],
    failures: int,
    window_s: float,
    *,
    concurrency: int,
    rows_per_request: int,
    client_cpu_s: float = 0.0,
    first_error: str = "",
) -> LoadResult:
    """Throughput and latency percentiles of the successful requests of one window."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1e3
    ok = len(lat)
    pct = np.percentile(lat, [50, 90, 99]) if ok else np.full(3, np.nan)
    window_s = max(window_s, 1e-9)
    return LoadResult(
        concurrency=concurrency,
        rows_per_request=rows_per_request,
        requests=ok + failures,
        failures=failures,
        window_s=window_s,
        qps=ok * rows_per_request / window_s,
        rps=ok / window_s,
        p50_ms=float(pct[0]),
        p90_ms=float(pct[1]),
        p99_ms=float(pct[2]),
        mean_ms=float(lat.mean()) if ok else float("nan"),
        max_ms=float(lat.max()) if ok else float("nan"),
        client_cpu_s=client_cpu_s,
        first_error=first_error,
    )


async def drive(call, spec: LoadSpec) -> LoadResult:
    """Keep `spec.concurrency` calls in flight; measure those that finish inside the window.

    The window opens after `warmup_s` (connections made, batchers and caches warm) and
    lasts `duration_s`, or until `min_requests` have completed in it; a request counts where
    it completes.
    """
    t0 = time.perf_counter()
    start, end = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s
    latencies: list[float] = []
    failures = 0
    first_error = ""
    n = len(spec.payloads)
    closed = end  # where the window really closed: later than `end` only to reach the minimum

    def short() -> bool:
        return len(latencies) + failures < spec.min_requests

    async def worker(i: int) -> None:
        nonlocal failures, first_error, closed
        j = i
        while True:
            payload = spec.payloads[j % n]
            j += spec.concurrency
            a = time.perf_counter()
            if a >= end and not short():
                return
            try:
                await call(payload)
                ok = True
            except Exception as exc:  # every failure counts; the first one is reported
                ok = False
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:500]
            b = time.perf_counter()
            if start <= b and (b <= end or short()):
                closed = max(closed, b)
                if ok:
                    latencies.append(b - a)
                else:
                    failures += 1

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
    cpu = time.process_time() - cpu0
    return summarize(
        latencies,
        failures,
        closed - start,
        concurrency=spec.concurrency,
        rows_per_request=spec.rows_per_request,
        client_cpu_s=cpu,
        first_error=first_error,
    )


async def _run_grpc(spec: LoadSpec) -> LoadResult:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(spec.url, options=options) as channel:
        rpc = channel.unary_unary(
            GRPC_INFER_METHOD,
            request_serializer=None,  # payloads are already bytes
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

        async def call(payload: bytes) -> None:
            response = await rpc(payload, timeout=spec.timeout_s)
            if not response.raw_output_contents:
                raise RuntimeError("response without outputs")

        return await drive(call, spec)


async def _run_http(spec: LoadSpec) -> LoadResult:
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    async with aiohttp.ClientSession(spec.url, connector=connector, timeout=timeout) as session:

        async def call(path: str) -> None:
            async with session.get(path) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")

        return await drive(call, spec)


def run(spec: LoadSpec) -> dict:
    """Run one spec to completion in this process; returns LoadResult as a dict."""
    runner = {"grpc": _run_grpc, "http": _run_http}[spec.kind]
    return asyncio.run(runner(spec)).to_dict()


class LoadGenerator:
    """`with LoadGenerator() as gen: gen.run(spec)`: each spec runs in a fresh child process.

    A plain `python -m loadtest.loadgen` child (spec in on stdin, summary out on stdout):
    unlike multiprocessing's spawn it does not re-import the caller's __main__, and it
    never forks a parent that holds torch or onnxruntime thread pools.
    """

    def run(self, spec: LoadSpec) -> LoadResult:
        proc = subprocess.run(
            [sys.executable, "-m", "loadtest.loadgen"],
            input=_spec_to_json(spec).encode(),
            capture_output=True,
            timeout=spec.warmup_s + spec.duration_s + 2 * spec.timeout_s + 60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"load generator exited with {proc.returncode}: {proc.stderr.decode()[-2000:]}"
            )
        return LoadResult(**json.loads(proc.stdout))

    def close(self) -> None:
        pass

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spec_to_json(spec: LoadSpec) -> str:
    """JSON, not pickle, even to our own child: unpickling runs code, and the rule here is
    simple (no pickle anywhere) rather than a judgement about which pipe is trusted."""
    d = asdict(spec)
    d["payloads"] = [
        base64.b64encode(p).decode() if isinstance(p, bytes) else p for p in spec.payloads
    ]
    return json.dumps(d)


def _spec_from_json(text: str) -> LoadSpec:
    d = json.loads(text)
    if d["kind"] == "grpc":
        d["payloads"] = tuple(base64.b64decode(p) for p in d["payloads"])
    else:
        d["payloads"] = tuple(d["payloads"])
    return LoadSpec(**d)


def main() -> None:
    spec = _spec_from_json(sys.stdin.read())
    sys.stdout.write(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
