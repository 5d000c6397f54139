"""Issue 31's input hardening, in-process: request caps, event value bounds, routing
validated like an input (salt range, unknown versions, FIFOs), and the smaller ones."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from feedback.events import (
    DEFAULT_MAX_WATCH_S,
    INTERACTION,
    MAX_QUARANTINED_CHARS,
    validate,
)
from feedback.sink import SqliteEventLog
from online.routing_store import RoutingStore, check_routing_dict
from serving import repository as layout
from serving.backend import InputError
from serving.control import ServerError, switch_routing
from serving.recommender import OnlineState, Recommender, RequestLimits
from serving.routing import RoutingState, StoreRouting
from serving.testing import tiny_export

NOW = 1.7e9


@pytest.fixture
def repo(tmp_path):
    _, repo, _ = tiny_export(tmp_path / "repo", k=10, overfetch=10)
    return repo


# ---------------------------------------------------------------------------- defect 3


def _uids(n):
    return np.arange(n, dtype=np.int64)[:, None]


def test_request_caps_refuse_too_many_users_and_too_many_impressions(tmp_path):
    rec = Recommender(tmp_path, limits=RequestLimits(max_users_per_request=4,
                                                     max_impressions_per_request=20))  # fmt: skip
    ok = rec.parse(_uids(4), np.full((4, 1), 5, np.int32), max_k=100)
    assert ok.ks.sum() == 20
    with pytest.raises(InputError, match=r"'user_id' has 5 rows: at most 4 .*max_users_per_req"):
        rec.parse(_uids(5), None, max_k=100)
    with pytest.raises(InputError, match=r"'k' asks for 21 items .*at most 20 .*max_impressions"):
        rec.parse(_uids(3), np.array([[7], [7], [7]], np.int32), max_k=100)
    # default_k counts too: 4 users x default 10 is over 20
    with pytest.raises(InputError, match="max_impressions_per_request"):
        rec.parse(_uids(4), None, max_k=100)


def test_request_limits_come_from_model_parameters():
    assert RequestLimits.from_params({}) == RequestLimits()
    got = RequestLimits.from_params({"max_users_per_request": "8", "default_k": "3"})
    assert got.max_users_per_request == 8
    with pytest.raises(ValueError, match="max_impressions_per_request='lots'"):
        RequestLimits.from_params({"max_impressions_per_request": "lots"})
    with pytest.raises(ValueError, match="max_users_per_request=0"):
        RequestLimits(max_users_per_request=0)
    # The attack in the issue (256 users, k=100) is over the default impressions bound.
    assert RequestLimits().max_impressions_per_request < 256 * 100


# ---------------------------------------------------------------------------- defect 4


def _interactions(types, values):
    n = len(types)
    return {
        "event_id": np.array([f"e{i}" for i in range(n)], dtype=object),
        "user_id": np.arange(n),
        "item_id": np.arange(n),
        "type": np.array(types, dtype=object),
        "value": np.asarray(values, dtype=np.float64),
        "ts": np.full(n, NOW),
        "request_id": np.array([""] * n, dtype=object),
    }


def test_value_is_bounded_per_event_type():
    types = ["click", "click", "like", "like", "watch", "watch", "watch", "click", "watch"]
    values = [1.0, 1.5, 0.0, 3e38, 3600.0, DEFAULT_MAX_WATCH_S + 1, np.inf, np.nan, -1.0]
    v = validate(INTERACTION, _interactions(types, values), now=NOW)
    assert v.reason_per_row() == [
        "",
        "value: above 1 for a click or like",
        "",
        "value: above 1 for a click or like",
        "",
        f"value: above {DEFAULT_MAX_WATCH_S:g} s for a watch",
        "value: not finite",
        "value: missing",
        "value: negative",
    ]
    # The bound on watch seconds is a setting, of validate and of the SQLite log.
    short = validate(INTERACTION, _interactions(["watch"], [120.0]), now=NOW, max_watch_s=60)
    assert short.reasons == ["value: above 60 s for a watch"]


def test_the_log_takes_the_watch_bound(tmp_path):
    cols = _interactions(["watch"], [120.0])
    cols["ts"] = np.array([time.time()])
    with SqliteEventLog(tmp_path / "events.db", max_watch_s=60) as log:
        assert log.write_interactions(cols).reasons == ["value: above 60 s for a watch"]


def test_fp32_max_from_triton_is_refused():
    # Triton's `value` input is FP32: 3e38 arrives as a finite float32.
    cols = _interactions(["click", "watch"], [0, 0])
    cols["value"] = np.array([3e38, 3e38], dtype=np.float32)
    v = validate(INTERACTION, cols, now=NOW)
    assert len(v.bad) == 2


# ---------------------------------------------------------------------------- defect 9


def test_a_changed_and_an_unchanged_copy_of_a_stored_event_refuse_only_the_changed(tmp_path):
    with SqliteEventLog(tmp_path / "events.db") as log:
        first = _interactions(["click"], [1.0])
        assert log.write_interactions(first).accepted.all()
        both = {k: np.concatenate([v, v]) for k, v in first.items()}
        both["item_id"] = np.array([99, 0])  # row 0 changed, row 1 is the stored copy
        res = log.write_interactions(both)
        assert res.accepted.tolist() == [False, True]
        assert res.reasons == ["event_id: already stored with different content", ""]
        # the other order too
        both["item_id"] = np.array([0, 99])
        assert log.write_interactions(both).accepted.tolist() == [True, False]
        assert log.count(INTERACTION) == 1
        # Not stored yet: the batch's first copy is the reference, as before.
        fresh = {k: np.concatenate([v, v]) for k, v in _interactions(["like"], [1.0]).items()}
        fresh["event_id"] = np.array(["new", "new"], dtype=object)
        fresh["item_id"] = np.array([5, 6])
        assert log.write_interactions(fresh).accepted.tolist() == [True, False]


def test_quarantine_caps_each_offending_value(tmp_path):
    huge = "x" * 1_000_000
    cols = _interactions(["click", "click"], [1.0, 1.0])
    cols["event_id"] = np.array([huge, huge.encode() + b"\xff"], dtype=object)
    with SqliteEventLog(tmp_path / "events.db") as log:
        res = log.write_interactions(cols)
        assert not res.accepted.any()
        stored = log.quarantined()["payload"].map(json.loads)
    ids = [p["event_id"] for p in stored]
    assert ids[0] == "x" * MAX_QUARANTINED_CHARS + "...[truncated: 1000000 characters]"
    assert ids[1].endswith("...[truncated: 1000001 bytes]")
    assert all(len(json.dumps(p)) < 4 * MAX_QUARANTINED_CHARS for p in stored)
    # A short bad value is kept whole.
    v = validate(INTERACTION, _interactions(["purchase"], [1.0]), now=NOW)
    assert json.loads(v.payloads[0])["type"] == "purchase"


# ---------------------------------------------------------------------------- defect 6


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"production": 1, "salt": 2**70}, "salt="),
        ({"production": 1, "salt": -1}, "salt="),
        ({"production": 2**64}, "production="),
        ({"production": True}, "production="),
        ({"production": 1.5}, "production="),
        ({"production": "1"}, "production="),
        ({"production": 1, "canary": 2, "canary_percent": 101}, "canary_percent="),
    ],
)
def test_routing_out_of_range_is_refused_where_it_is_read(bad, match):
    with pytest.raises(ValueError, match=match):
        RoutingState.from_dict(bad)
    with pytest.raises(ValueError, match=match.rstrip("=")):
        check_routing_dict(bad)


def test_the_largest_salt_routes_without_overflow():
    r = RoutingState(production=1, canary=2, canary_percent=50, salt=2**63 - 1)
    got = r.version_for(np.arange(1000))
    assert set(got.tolist()) == {1, 2}


def test_a_routing_naming_an_unknown_version_keeps_the_last_good_and_counts_it(repo):
    errors = []
    state = OnlineState(repo, check_interval_s=0.0)
    state.on_error.append(lambda path, msg: errors.append(msg))
    state.refresh()
    assert state.routing.production == 1
    path = layout.routing_path(repo)
    for bad in ('{"production": 99}', '{"production": 1, "salt": 1180591620717411303424}'):
        path.write_text(bad)
        state.refresh()
        assert state.routing == RoutingState(production=1)
        assert state.max_k() == 10  # requests are still answerable
    assert len(errors) == 2 and "version 99" in errors[0] and "salt" in errors[1]
    assert len(state.problems()) == 1


def test_a_fifo_in_place_of_routing_json_does_not_hang(repo):
    state = OnlineState(repo, check_interval_s=0.0)
    state.refresh()
    path = layout.routing_path(repo)
    path.unlink()
    os.mkfifo(path)
    done = threading.Event()

    def read():
        state.refresh()
        assert state.routing.production == 1
        with pytest.raises(ValueError, match="not a regular file"):
            RoutingState.load(path)
        done.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    if not done.is_set():  # unblock the reader before failing
        with open(path, "w"):
            pass
        pytest.fail("reading a FIFO in place of routing.json blocked")
    assert any("not a regular file" in p for p in state.problems())


def test_switch_routing_refuses_an_unknown_or_torn_version_without_a_url(repo):
    before = layout.routing_path(repo).read_text()
    with pytest.raises(ServerError, match="version 7 is not a complete published version"):
        switch_routing(repo, RoutingState(production=7))
    torn = layout.version_dir(repo, 2)
    torn.mkdir()
    (torn / layout.META_FILE).write_text("{}")  # meta without model.onnx or features
    with pytest.raises(ServerError, match="version 2 is not a complete"):
        switch_routing(repo, RoutingState(production=1, canary=2, canary_percent=10))
    assert layout.routing_path(repo).read_text() == before


def test_the_store_record_is_checked_when_written_and_when_read(repo, redis_server):
    rs = RoutingStore.from_url(redis_server.url)
    try:
        with pytest.raises(ValueError, match="salt"):
            rs.initialize({"production": 1, "salt": 2**70})
        assert rs.read() is None  # nothing was written
        rs.initialize({"production": 1})
        errors = []
        state = OnlineState(repo)
        sr = StoreRouting(
            rs,
            on_error=errors.append,
            check=lambda r: state._check_routing(r, where="store"),
        )
        assert sr.refresh() and sr.routing() == RoutingState(production=1)
        # Written by hand (redis-cli HSET), past every writer's checks:
        for bad in ('{"production": 99}', '{"production": 1, "salt": 1180591620717411303424}'):
            rs.redis.hset(rs.key, mapping={"current": bad, "epoch": sr.epoch + 1})
            assert sr.refresh()
            assert sr.routing() == RoutingState(production=1)
        assert len(errors) == 2 and sr.errors == 2
        rs.redis.delete(rs.key)  # deleting the bad record leaves the good one in service
        assert sr.refresh() and sr.routing() == RoutingState(production=1)
    finally:
        rs.close()
