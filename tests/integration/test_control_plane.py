"""The control plane is locked: without the admin key a client can infer, not administer.

Each refusal is checked over HTTP and over gRPC against the session's real tritonserver,
and each is followed by proof that the server kept serving and nothing changed.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving import auth
from serving import repository as layout
from serving.client import RecommenderClient
from serving.control import ready_versions

pytestmark = pytest.mark.integration

PROTOCOLS = ("http", "grpc")


def _client(served, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(served.http_url)
    return grpcclient.InferenceServerClient(served.grpc_url)


def _index(client, protocol, **kw):
    if protocol == "grpc":
        return client.get_model_repository_index(as_json=True, **kw)["models"]
    return client.get_model_repository_index(**kw)


# Every control-plane call a client could try, keyed by what it would do.
ADMIN_CALLS = {
    "unload recommend": lambda c, p, **kw: c.unload_model(layout.RECOMMEND, **kw),
    "load retrieval": lambda c, p, **kw: c.load_model(layout.RETRIEVAL, **kw),
    "repository index": lambda c, p, **kw: _index(c, p, **kw),
    "model config": lambda c, p, **kw: c.get_model_config(layout.RETRIEVAL, **kw),
    "shared memory status": lambda c, p, **kw: c.get_system_shared_memory_status(**kw),
    "trace settings": lambda c, p, **kw: c.update_trace_settings(
        settings={"trace_file": "/tmp/northstar-pwned.json"}, **kw
    ),
    "log settings": lambda c, p, **kw: c.update_log_settings(
        settings={"log_file": "/tmp/northstar-pwned.log"}, **kw
    ),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("call", sorted(ADMIN_CALLS))
def test_control_plane_refuses_without_the_key(served, protocol, call):
    client = _client(served, protocol)
    try:
        before = ready_versions(served.grpc_url)  # sends the key: allowed
        with pytest.raises(InferenceServerException) as err:
            ADMIN_CALLS[call](client, protocol)
        assert auth.header_name(protocol) in str(err.value), str(err.value)  # names the header
        wrong = {auth.header_name(protocol): "not-the-key-0123456789"}
        with pytest.raises(InferenceServerException):
            ADMIN_CALLS[call](client, protocol, headers=wrong)
        # Refused means refused: the same versions are still served, and inference works.
        assert ready_versions(served.grpc_url) == before
        assert client.is_model_ready(layout.RECOMMEND)
    finally:
        client.close()
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with RecommenderClient(url, protocol) as c:
        (rec,) = c.recommend(np.array([1000]), k=3)
        assert len(rec.item_ids) == 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_clients_keep_inference_health_metadata_and_statistics(served, protocol):
    client = _client(served, protocol)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(layout.RETRIEVAL, str(served.version))
        meta = client.get_model_metadata(layout.RECOMMEND)
        meta = meta if isinstance(meta, dict) else {"name": meta.name}
        assert meta["name"] == layout.RECOMMEND
        client.get_inference_statistics(layout.RECOMMEND)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_key_unlocks_the_control_plane(served, protocol):
    client = _client(served, protocol)
    try:
        hdrs = auth.headers(protocol)
        assert hdrs, "the test session sets NORTHSTAR_ADMIN_KEY (tests/conftest.py)"
        names = {m["name"] for m in _index(client, protocol, headers=hdrs)}
        assert {layout.RETRIEVAL, layout.RECOMMEND} <= names
        cfg = client.get_model_config(layout.RETRIEVAL, headers=hdrs)
        assert cfg  # a dict over HTTP, a protobuf over gRPC
    finally:
        client.close()
