"""Issue 31, defect 5 on a real tritonserver: a `feedback` request whose BYTES input carries
a length prefix of 2^32-1 is refused alone while other clients' events flow, and the model
still unloads afterwards. Acknowledged events: 0 lost, 0 doubled."""

from __future__ import annotations

import json
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from feedback.events import INTERACTION
from feedback.sink import open_source
from serving import auth
from serving.ingest_client import send_interactions
from serving.testing import ingest_only_server, wait_until

pytestmark = pytest.mark.integration


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def poison(http_url: str) -> tuple[int, str]:
    """One event whose event_id's length prefix says 2^32-1 bytes, sent with the HTTP
    binary-data extension (what a client library never builds, an attacker does)."""
    now = time.time()
    inputs = [
        ("event_id", "BYTES", struct.pack("<I", 2**32 - 1) + b"abc"),
        ("user_id", "INT64", np.array([1], np.int64).tobytes()),
        ("item_id", "INT64", np.array([1], np.int64).tobytes()),
        ("type", "BYTES", _bytes_tensor([b"click"])),
        ("value", "FP32", np.array([1], np.float32).tobytes()),
        ("ts", "FP64", np.array([now], np.float64).tobytes()),
        ("request_id", "BYTES", _bytes_tensor([b""])),
    ]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": [1, 1],
                    "datatype": dtype,
                    "parameters": {"binary_data_size": len(data)},
                }
                for name, dtype, data in inputs
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{http_url}/v2/models/feedback/infer",
        data=header + b"".join(data for _, _, data in inputs),
        method="POST",
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_poisoned_request_fails_alone_and_unload_does_not_hang(tmp_path):
    with ingest_only_server(tmp_path) as (server, log):
        failures: list[str] = []
        acked: list[str] = []
        sent = [0]
        stop = threading.Event()

        def client(k: int) -> None:
            while not stop.is_set():
                n = 4
                ev = {
                    "event_id": np.array([uuid.uuid4().hex for _ in range(n)], dtype=object),
                    "user_id": np.full(n, k),
                    "item_id": np.arange(n),
                    "type": np.array(["click"] * n, dtype=object),
                    "value": np.ones(n),
                    "ts": np.full(n, time.time()),
                    "request_id": np.array([""] * n, dtype=object),
                }
                res = send_interactions(server.grpc_url, ev)
                if res.accepted.all():
                    acked.extend(ev["event_id"].tolist())
                    sent[0] += 1
                else:
                    failures.append(str(res.reasons[0]))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: sent[0] >= 20, "good events flowing")
            for _ in range(30):  # each while good requests are in flight
                code, body = poison(server.http_url)
                assert code == 400 and "event_id" in body, (code, body)
                start = sent[0]
                wait_until(lambda s=start: sent[0] > s, "good events still flowing")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert failures == [], failures[:3]

        stored = open_source(log).read(INTERACTION)["event_id"]
        assert len(stored) == len(acked) and set(stored) == set(acked)  # 0 lost, 0 doubled

        client_ = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            client_.unload_model("feedback", headers=auth.headers())

            def state():
                index = client_.get_model_repository_index(as_json=True, headers=auth.headers())
                return next(
                    (m.get("state") for m in index.get("models", []) if m["name"] == "feedback"),
                    None,
                )

            assert wait_until(lambda: state() == "UNAVAILABLE", "feedback unloaded", bound_s=60)
        finally:
            client_.close()
