"""Ingest logic of the `feedback` model, its config contract, and the recommend-side hook."""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from feedback.events import INTERACTION, EventError
from feedback.hook import EVENT_LOG_PARAM, ImpressionLogger, event_log_location, impression_logger
from feedback.ingest import INPUTS, OUTPUTS, RequestOutcome, ingest, parse_request
from feedback.sink import EVENT_LOG_ENV, open_sink
from serving.ingest_batches import as_columns, tensor_array

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "model_repository" / "feedback" / "config.pbtxt"
NOW = time.time()
_TRITON = {
    "BYTES": mc.TYPE_STRING,
    "INT64": mc.TYPE_INT64,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BOOL": mc.TYPE_BOOL,
}


def test_config_parses_and_matches_the_ingest_contract():
    cfg = text_format.Parse(CONFIG.read_text(), mc.ModelConfig())
    assert cfg.name == "feedback" and cfg.backend == "python"
    # Each request alone: batched with others, one malformed BYTES input failed them all
    # inside Triton's Python backend (issue 31).
    assert cfg.max_batch_size > 0 and not cfg.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        (n, _TRITON[t], [1]) for n, t in INPUTS.items()
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
        (n, _TRITON[t], [1]) for n, t in OUTPUTS.items()
    ]
    assert EVENT_LOG_PARAM in cfg.parameters


def _request(n=2, **over):
    cols = {
        name: tensor_array(name, np.asarray(v))
        for name, v in {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": np.arange(n) + 1,
            "item_id": np.arange(n) + 5,
            "type": ["click"] * n,
            "value": np.ones(n),
            "ts": np.full(n, NOW),
            "request_id": [""] * n,
        }.items()
    }
    cols.update(over)
    return cols


def test_parse_request_names_the_missing_or_inconsistent_input():
    req = _request()
    del req["ts"]
    with pytest.raises(EventError, match="input 'ts' is missing"):
        parse_request(req.get)
    req = _request()
    req["item_id"] = np.array([[1], [2], [3]])
    with pytest.raises(EventError, match="input 'item_id' has 3 rows"):
        parse_request(req.get)


def test_one_write_per_batch_and_results_split_per_request(tmp_path):
    log = open_sink(tmp_path / "events.db")
    calls = []
    real = log.write_interactions
    log.write_interactions = lambda cols: calls.append(len(cols["event_id"])) or real(cols)
    a = parse_request(_request(2).get)
    b = parse_request(
        _request(3, type=tensor_array("type", np.array(["like", "buy", "watch"], dtype=object))).get
    )
    b["event_id"] = np.array([b"x0", b"x1", b"x2"], dtype=object)
    bad = EventError("input 'ts' is missing")
    out = ingest(log, [a, bad, b])
    assert calls == [5]  # the dynamic batch is written once
    assert out[1] is bad
    assert isinstance(out[0], RequestOutcome) and out[0].accepted.shape == (2, 1)
    assert out[2].accepted[:, 0].tolist() == [True, False, True]
    assert out[2].reason[:, 0].tolist() == [b"", b"type: not one of click|watch|like", b""]
    assert log.count(INTERACTION) == 4


def test_client_columns_fill_ids_and_request_ids():
    cols = as_columns(
        {
            "user_id": [1, 2],
            "item_id": [3, 4],
            "type": ["click", "like"],
            "value": [1.0, 1.0],
            "ts": [NOW, NOW + 1],
        }
    )
    assert len(set(cols["event_id"])) == 2 and list(cols["request_id"]) == ["", ""]
    assert tensor_array("event_id", cols["event_id"]).shape == (2, 1)


@dataclass
class ServedRows:  # the shape of feedback.events.ServedImpressions
    request_id: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    position: np.ndarray
    score: np.ndarray
    model_version: np.ndarray
    propensity: np.ndarray | None = None  # None: a deterministic policy


def test_impression_logger_is_a_drop_in_for_the_serving_hook(tmp_path):
    log = open_sink(tmp_path / "events.db")
    logger = ImpressionLogger(log, clock=lambda: NOW)
    rows = ServedRows(
        np.array(["ab", "ab", "cd"], dtype=object),
        np.array([1, 1, 2]),
        np.array([7, 8, 7]),
        np.array([0, 1, 0], dtype=np.int32),
        np.array([0.9, 0.8, 0.7], dtype=np.float32),
        np.array([3, 3, 4]),
    )
    assert logger.write(rows).inserted == 3
    assert logger.write(rows).duplicates == 3  # the same batch logged twice: stored once
    df = log.read("impression")
    assert df["event_id"].tolist() == ["ab:0", "ab:1", "cd:0"]
    assert df["propensity"].tolist() == [1.0] * 3  # no exploration: deterministic policy
    assert (df["ts"] == NOW).all()


def test_event_log_location_prefers_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(EVENT_LOG_ENV, raising=False)
    assert event_log_location({}) is None and impression_logger({}) is None
    assert event_log_location({"event_log": "/x.db"}) == "/x.db"
    monkeypatch.setenv(EVENT_LOG_ENV, str(tmp_path / "env.db"))
    assert event_log_location({"event_log": "/x.db"}) == str(tmp_path / "env.db")
    assert impression_logger({}).sink.path == tmp_path / "env.db"


# ---------------------------------------------------------------- one Triton transport


class FakeTriton:
    """A tritonclient client's `infer`, answering like the `feedback` model (all accepted)."""

    def __init__(self, fail_first: int = 0):
        self.calls, self.fail_first, self.closed = [], fail_first, False

    def infer(self, model, inputs, outputs=None, **kwargs):
        self.calls.append((model, [i.name() for i in inputs], kwargs))
        if len(self.calls) <= self.fail_first:
            raise ConnectionError("connection refused")
        n = inputs[0].shape()[0]
        ok, reasons = np.ones(n, dtype=bool), np.array([b""] * n, dtype=object)

        class Result:
            def as_numpy(self, name):
                return (ok if name == "accepted" else reasons).reshape(-1, 1)

        return Result()

    def close(self):
        self.closed = True


def _cols(n):
    return {
        "user_id": np.arange(n) + 1,
        "item_id": np.arange(n) + 5,
        "type": np.array(["click"] * n, dtype=object),
        "value": np.ones(n),
        "ts": np.full(n, NOW),
    }


def test_transport_defaults_per_protocol_and_refuses_an_unknown_one():
    from serving.client import DEFAULT_URLS, RecommenderClient, TritonTransport

    for protocol in ("grpc", "http"):
        t = TritonTransport(protocol=protocol, timeout_s=2.0)
        assert (t.url, t.protocol, t.owns_client) == (DEFAULT_URLS[protocol], protocol, True)
        t.close()
    with pytest.raises(ValueError, match="protocol='udp'"):
        TritonTransport(protocol="udp")
    client = RecommenderClient("example:1234", "http", timeout_s=3.0)
    assert (client.url, client.protocol, client.timeout_s) == ("example:1234", "http", 3.0)
    client.close()


def test_send_interactions_borrows_a_transport_and_leaves_it_open():
    from common.retry import RetryPolicy
    from serving.client import RecommenderClient, TritonTransport
    from serving.ingest_client import send_interactions

    raw = FakeTriton(fail_first=1)
    transport = TritonTransport(protocol="grpc", timeout_s=4.0, client=raw)
    client = RecommenderClient(transport=transport)
    res = client.send_feedback(_cols(5), batch_size=2, retry=RetryPolicy(backoff_s=0.001))
    assert res.accepted.all() and res.reasons == [""] * 5
    assert (res.batches, res.retries, res.failed_batches) == (3, 1, 0)
    assert raw.calls[0][0] == "feedback" and raw.calls[0][2]["client_timeout"] == 4.0
    assert set(raw.calls[0][1]) == set(INPUTS)  # event_id and request_id filled in
    res = send_interactions(transport, _cols(1))  # a TritonTransport itself works too
    assert res.accepted.all()
    transport.close()
    assert not raw.closed  # a borrowed tritonclient client is never closed here


def test_a_batch_that_never_gets_through_is_reported_not_raised():
    from common.retry import RetryPolicy
    from serving.client import TritonTransport
    from serving.ingest_client import send_interactions

    raw = FakeTriton(fail_first=100)
    res = send_interactions(
        TritonTransport(client=raw), _cols(3), retry=RetryPolicy(retries=2, backoff_s=0.001)
    )
    assert (res.failed_batches, res.retries, res.n_accepted) == (1, 2, 0)
    assert res.reasons == ["send failed: connection refused"] * 3
    with pytest.raises(TypeError, match="client_or_url"):
        send_interactions(object(), _cols(1))
