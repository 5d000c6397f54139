"""Event validation: every bad row gets one "field: problem" reason; bad batches raise."""

import json

import numpy as np
import pytest

from feedback.events import (
    IMPRESSION,
    INTERACTION,
    EventError,
    Impression,
    Interaction,
    to_columns,
    validate,
)

NOW = 1_750_000_000.0


def _interactions(n=1, **over):
    cols = {
        "event_id": np.array([f"e{i}" for i in range(n)], dtype=object),
        "user_id": np.arange(1, n + 1),
        "item_id": np.arange(10, 10 + n),
        "type": np.array(["click"] * n, dtype=object),
        "value": np.ones(n),
        "ts": np.full(n, NOW),
        "request_id": np.array([""] * n, dtype=object),
    }
    cols.update(
        {k: np.asarray(v, dtype=object if isinstance(v[0], str) else None) for k, v in over.items()}
    )
    return cols


def _reasons(kind, cols):
    return validate(kind, cols, now=NOW).reason_per_row()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("event_id", "", "event_id: empty"),
        ("event_id", "x" * 129, "event_id: longer than 128 characters"),
        ("user_id", -1, "user_id: negative"),
        ("item_id", -3, "item_id: negative"),
        ("type", "purchase", "type: not one of click|watch|like"),
        ("value", -2.0, "value: negative"),
        ("value", float("nan"), "value: missing"),
        ("value", float("inf"), "value: not finite"),
        ("ts", float("nan"), "ts: missing"),
        ("ts", 12345.0, "ts: before 2001-09-09 (unix seconds expected)"),
        ("ts", NOW * 1000, "ts: more than 86400 s in the future"),
        ("request_id", "r" * 200, "request_id: longer than 128 characters"),
    ],
)
def test_each_interaction_problem_is_named(field, value, reason):
    cols = _interactions(2)
    col = cols[field].astype(object) if isinstance(value, str) else cols[field].astype(float)
    col[1] = value
    cols[field] = col
    assert _reasons(INTERACTION, cols) == ["", reason]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("propensity", 0.0, "propensity: outside (0, 1]"),
        ("propensity", 1.5, "propensity: outside (0, 1]"),
        ("position", -1, "position: negative"),
        ("model_version", -1, "model_version: negative"),
        ("request_id", "", "request_id: empty"),  # impressions always have one
        ("score", float("inf"), "score: not finite"),
    ],
)
def test_each_impression_problem_is_named(field, value, reason):
    imp = Impression("i0", "r0", 1, 2, 0, 0.5, 3, 1.0, NOW)
    cols = to_columns([imp, imp])
    cols[field] = cols[field].copy()
    cols[field][1] = value
    assert _reasons(IMPRESSION, cols) == ["", reason]


def test_first_failing_field_wins_so_each_row_is_counted_once():
    cols = _interactions(1)
    cols["user_id"] = np.array([-1])
    cols["type"] = np.array(["nope"], dtype=object)
    v = validate(INTERACTION, cols, now=NOW)
    assert v.reasons == ["user_id: negative"]
    assert len(v.ok) == 0 and v.bad.tolist() == [0]


def test_types_from_the_wire_are_coerced_or_named():
    cols = {
        "event_id": np.array([b"a", b"b", b"\xff", None], dtype=object),  # Triton BYTES
        "user_id": np.array([1, 2.5, 3, 4], dtype=object),
        "item_id": np.array([1, 2, 3, 4]),
        "type": np.array([b"click", b"watch", b"like", b"like"], dtype=object),
        "value": np.array([1.0, 2.0, 3.0, "x"], dtype=object),
        "ts": np.full(4, NOW),
        "request_id": np.array([b"", None, b"r", b""], dtype=object),
    }
    v = validate(INTERACTION, cols, now=NOW)
    assert v.reason_per_row() == [
        "",
        "user_id: not an integer",
        "event_id: not UTF-8",
        "event_id: missing",
    ]
    assert v.columns["event_id"].tolist() == ["a"]
    assert v.columns["type"].tolist() == ["click"]
    assert v.columns["request_id"].tolist() == [""]  # None means "no request id"


def test_payload_keeps_the_offending_values():
    cols = _interactions(1, type=["purchase"])
    v = validate(INTERACTION, cols, now=NOW)
    assert json.loads(v.payloads[0])["type"] == "purchase"


def test_bad_batches_raise_naming_the_field():
    cols = _interactions(2)
    del cols["ts"]
    with pytest.raises(EventError, match=r"missing field.*'ts'"):
        validate(INTERACTION, cols, now=NOW)
    cols = _interactions(2)
    cols["user_id"] = np.array([1, 2, 3])
    with pytest.raises(EventError, match="different lengths"):
        validate(INTERACTION, cols, now=NOW)
    with pytest.raises(EventError, match=r"unknown field.*'colour'"):
        validate(INTERACTION, {**_interactions(1), "colour": np.array(["red"])}, now=NOW)


def test_request_id_column_is_optional_for_interactions():
    cols = _interactions(2)
    del cols["request_id"]
    v = validate(INTERACTION, cols, now=NOW)
    assert v.columns["request_id"].tolist() == ["", ""]


def test_dataclasses_round_trip_through_columns():
    rows = [
        Interaction("a", 1, 2, "watch", 30.0, NOW, "r1"),
        Interaction("b", 1, 3, "like", 1.0, NOW),
    ]
    v = validate(INTERACTION, to_columns(rows), now=NOW)
    assert v.reasons == []
    assert v.columns["request_id"].tolist() == ["r1", ""]
    assert v.columns["user_id"].dtype == np.int64
