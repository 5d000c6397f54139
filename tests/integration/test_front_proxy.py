"""Bounded request bodies, on a real tritonserver behind the real nginx front proxy.

Triton 2.51 has no body limit and inflates a gzip body in memory, so a small body that
unpacks to hundreds of MB grows its RSS by as much (docs/results.md, "Front proxy"). Here the same
bomb, an oversized plain body (sized and chunked), and oversized or compressed gRPC messages
are refused by the proxy with a reason, Triton's memory does not move, and the server keeps
answering. Also pinned: what Triton itself decides for a second raw_input_contents.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
import zlib

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.client import RecommenderClient
from serving.server import ServerConfig, TritonServer
from serving.testing import tiny_export

pytestmark = pytest.mark.integration

MAX_BODY = 1 << 20  # 1 MiB: small enough that the oversized bodies below stay cheap to build
BOMB_MB = 300
# Triton's RSS may move a little with ordinary traffic (allocator arenas, a warm cache);
# the bomb without the proxy adds far more (docs/results.md, "Front proxy").
RSS_SLACK = 64 << 20


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    root = tmp_path_factory.mktemp("front-proxy")
    _, repo, _ = tiny_export(root / "model_repository", k=10, overfetch=10)
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            front_proxy="on",
            proxy_max_body_bytes=MAX_BODY,
            log_file=str(root / "tritonserver.log"),
        )
    ).start()
    try:
        yield server
    finally:
        server.stop()


def _gzip_bomb(unpacked_mb: int) -> bytes:
    """A valid KServe JSON request whose junk parameter inflates to `unpacked_mb` MB."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    head = b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":[1]}],'
    out = [z.compress(head + b'"parameters":{"junk":"')]
    chunk = b"a" * (1 << 20)
    out += [z.compress(chunk) for _ in range(unpacked_mb)]
    out.append(z.compress(b'"}}'))
    out.append(z.flush())
    return b"".join(out)


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _assert_still_serving(server: TritonServer) -> None:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=30) as r:
        assert r.status == 200
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with RecommenderClient(url, protocol) as client:
            assert len(client.recommend([1, 2], k=3)[0].item_ids) == 3


def test_requests_pass_through_the_proxy_on_both_protocols(proxied):
    assert proxied.proxy is not None and proxied.proxy.process.poll() is None
    _assert_still_serving(proxied)


def test_a_gzip_bomb_is_refused_before_triton_reads_it(proxied):
    triton = psutil.Process(proxied.process.pid)
    before = triton.memory_info().rss
    body = _gzip_bomb(BOMB_MB)
    assert len(body) < MAX_BODY  # under the size bound: only the encoding rule stops it
    status, answer = _post(
        f"http://{proxied.http_url}/v2/models/recommend/infer",
        body,
        {"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert status == 415
    assert "Content-Encoding 'gzip' refused" in answer["error"]
    assert triton.memory_info().rss < before + RSS_SLACK
    _assert_still_serving(proxied)


def test_an_oversized_body_is_refused_with_the_limit(proxied):
    junk = b"a" * (MAX_BODY + 1)
    body = b'{"inputs":[],"parameters":{"junk":"' + junk + b'"}}'
    status, answer = _post(f"http://{proxied.http_url}/v2/models/recommend/infer", body)
    assert status == 413
    assert f"over {MAX_BODY} bytes" in answer["error"]
    _assert_still_serving(proxied)


def test_an_oversized_chunked_body_is_cut_off_while_it_streams(proxied):
    """No Content-Length to check up front: nginx counts the chunks as they arrive."""
    host, port = proxied.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    chunks = (b"a" * 65536 for _ in range((MAX_BODY // 65536) + 4))
    try:
        conn.request("POST", "/v2/models/recommend/infer", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # nginx may answer 413 and close while we still send: refused either way
    finally:
        conn.close()
    _assert_still_serving(proxied)


def test_grpc_messages_that_are_too_large_or_compressed_are_refused(proxied):
    client = grpcclient.InferenceServerClient(proxied.grpc_url)
    try:
        big = np.ones((MAX_BODY // 8 + 1024, 1), np.int64)
        inp = grpcclient.InferInput("user_id", list(big.shape), "INT64")
        inp.set_data_from_numpy(big)
        with pytest.raises(InferenceServerException) as exc:
            client.infer("recommend", [inp])
        assert "RESOURCE_EXHAUSTED" in str(exc.value.status())
        assert f"over {MAX_BODY} bytes" in exc.value.message()

        one = grpcclient.InferInput("user_id", [1, 1], "INT64")
        one.set_data_from_numpy(np.ones((1, 1), np.int64))
        with pytest.raises(InferenceServerException) as exc:
            client.infer("recommend", [one], compression_algorithm="gzip")
        assert "UNIMPLEMENTED" in str(exc.value.status())
        assert "grpc-encoding gzip refused" in exc.value.message()
    finally:
        client.close()
    _assert_still_serving(proxied)


def test_a_second_raw_input_content_is_ignored_by_triton(proxied):
    """Triton's decision, pinned so a change is noticed: it reads raw_input_contents[i] for
    input i and ignores extra entries (the Python backend never sees them). The answer is for
    the first user id; the extra bytes only count against the proxy's body limit."""
    channel = grpc.insecure_channel(proxied.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def ask(*users: int):
        req = service_pb2.ModelInferRequest(model_name="recommend")
        t = req.inputs.add()
        t.name, t.datatype = "user_id", "INT64"
        t.shape.extend([1, 1])
        req.raw_input_contents.extend(np.array([[u]], np.int64).tobytes() for u in users)
        reply = stub.ModelInfer(req, timeout=60)
        return np.frombuffer(reply.raw_output_contents[0], np.int64).tolist()

    try:
        assert ask(1, 2) == ask(1)
    finally:
        channel.close()
