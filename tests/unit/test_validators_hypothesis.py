"""Generated bad input for the input validators: a clear error naming the field, or a clean
result, and never any other exception.

- `serving.backend.check_int_matrix` (every `recommend` / `retrieval` request tensor):
  InputError naming the input.
- `feedback.events.validate` (every batch the event log takes): a reason "field: problem"
  per bad row, or EventError naming the field for a malformed batch.
- `common.config.build` / `load` (every config file and `--set`): ConfigError (or a
  config's own ValueError) naming the key.

Crashes hypothesis found once are kept as plain regression cases in `KNOWN_*_CRASHES`
(their minimal examples), beside the generated properties.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.config import ConfigError, build, load
from feedback.events import (
    IMPRESSION,
    INTERACTION,
    SCHEMAS,
    EventError,
    Validated,
    validate,
)
from feedback.ingest import parse_request
from serving.backend import InputError, check_int_matrix

# Modest and deterministic: the same examples on every run, no database in the tree.
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
NOW = 1_750_000_000.0

# ---------------------------------------------------------------------------- check_int_matrix

DTYPES = [np.int64, np.int32, np.int16, np.uint64, np.float32, np.float64, np.bool_]


@st.composite
def int_matrix_inputs(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    arr = draw(hnp.arrays(dtype, shape))
    width = draw(st.integers(1, 4))
    want = np.dtype(draw(st.sampled_from([np.int64, np.int32])))
    info = np.iinfo(want)
    low = draw(st.integers(int(info.min), 10))
    high = draw(st.none() | st.integers(low + 1, int(info.max)))
    rows = draw(st.none() | st.integers(0, 4))
    return arr, dict(width=width, dtype=want, low=low, high=high, rows=rows)


@SETTINGS
@given(int_matrix_inputs())
def test_check_int_matrix_accepts_or_names_the_input(case):
    arr, kw = case
    try:
        out = check_int_matrix("k", arr, what="items per user", **kw)
    except InputError as exc:
        assert "'k'" in str(exc), str(exc)
        return
    # Accepted: then it really is a valid (B, width) matrix of the wanted type and range.
    assert out is arr and out.dtype == kw["dtype"] and out.ndim == 2
    assert out.shape[1] == kw["width"] and out.shape[0] >= 1
    assert kw["rows"] is None or out.shape[0] == kw["rows"]
    assert (out >= kw["low"]).all() and (kw["high"] is None or (out < kw["high"]).all())


@SETTINGS
@given(
    st.sampled_from(["user_index", "user_cats", "history"]),
    st.integers(1, 4),
    st.lists(st.integers(0, 8), min_size=1, max_size=4),
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=4)),
)
def test_check_int_matrix_per_column_bounds_name_the_input(name, width, highs, arr):
    """Per-column bounds, as `retrieval` checks user_cats against each attribute's size."""
    high = np.resize(np.asarray(highs, dtype=np.int64) + 1, width)
    try:
        out = check_int_matrix(name, arr, width=width, low=0, high=high)
    except InputError as exc:
        assert f"'{name}'" in str(exc), str(exc)
        return
    assert out.shape[1] == width and ((out >= 0) & (out < high)).all()


def test_check_int_matrix_missing_input_is_named():
    with pytest.raises(InputError, match="missing required input 'user_id'"):
        check_int_matrix("user_id", None, width=1)


# ---------------------------------------------------------------------------- event validation

INT64_RANGE = (-(2**63), 2**63 - 1)

# Numbers at the edges: beyond int64, beyond float, integral floats, non-finite.
EDGE_NUMBERS = [2**63, -(2**63) - 1, 2.0**63, -(2.0**64), 1e19, 1e300, 10**400, -0.0]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(EDGE_NUMBERS),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.just("click"),
    st.just("x" * 200),  # longer than MAX_ID_CHARS
)


@st.composite
def column(draw, kind_of_field: str, n: int):
    """One well-formed column of n values: the right type (good and bad values), another
    numpy type, or an object array of anything; 1-D, or (n, 1) as Triton sends it."""
    how = draw(st.sampled_from(["typed", "numpy", "object"]))
    if how == "typed":
        if kind_of_field == "int":
            arr = draw(hnp.arrays(np.int64, n))
        elif kind_of_field == "float":
            arr = draw(hnp.arrays(draw(st.sampled_from([np.float32, np.float64])), n))
        else:
            arr = np.empty(n, dtype=object)
            strings = st.text(max_size=8) | st.binary(max_size=8)
            arr[:] = draw(st.lists(strings, min_size=n, max_size=n))
    elif how == "numpy":
        dtype = draw(st.sampled_from([np.int64, np.uint64, np.float64, np.bool_, "U4", "S4"]))
        elements = None
        if dtype == np.float64 and draw(st.booleans()):  # integral floats beyond int64
            elements = st.sampled_from([1e19, -1e300, 2.0**63, 0.5, 3.0])
        arr = draw(hnp.arrays(np.dtype(dtype), n, elements=elements))
    else:
        arr = np.empty(n, dtype=object)
        arr[:] = draw(st.lists(scalars, min_size=n, max_size=n))
    return arr.reshape(n, 1) if draw(st.booleans()) else arr


@st.composite
def event_batches(draw):
    """A batch of well-formed columns, and in about one batch of four a batch-level fault:
    a missing or unknown field, columns of different lengths, a column of the wrong shape."""
    kind = draw(st.sampled_from([IMPRESSION, INTERACTION]))
    n = draw(st.integers(0, 5))
    cols: dict[str, Any] = {f: draw(column(k, n)) for f, k in SCHEMAS[kind].items()}
    fault = draw(st.sampled_from([None, None, None, "missing", "unknown", "ragged", "shape"]))
    victim = draw(st.sampled_from(sorted(cols)))
    if fault == "missing":
        del cols[victim]
    elif fault == "unknown":
        cols["surprise"] = np.zeros(n)
    elif fault == "ragged":
        cols[victim] = draw(column(SCHEMAS[kind][victim], n + draw(st.integers(1, 3))))
    elif fault == "shape":
        c = np.asarray(cols[victim]).reshape(-1)
        cols[victim] = c[0] if len(c) else np.zeros((0, 2)) if n == 0 else np.stack([c, c], 1)
    return kind, cols, fault, ("surprise" if fault == "unknown" else victim)


def _check_validated(kind: str, cols: dict, v: Validated) -> None:
    schema = SCHEMAS[kind]
    assert v.n == np.asarray(cols["event_id"]).size  # one verdict per input row
    assert len(v.reasons) == len(v.bad) == len(v.payloads)
    assert sorted([*v.ok.tolist(), *v.bad.tolist()]) == list(range(v.n))
    for reason in v.reasons:
        name, sep, problem = reason.partition(": ")
        assert sep and problem and name in schema, reason
    for f, k in schema.items():  # clean rows only, in canonical types
        col = v.columns[f]
        assert len(col) == len(v.ok)
        if k == "int":
            assert col.dtype == np.int64
        elif k == "float":
            assert col.dtype == np.float64 and np.isfinite(col).all()
        else:
            assert all(isinstance(s, str) for s in col)


@SETTINGS
@given(event_batches())
def test_validate_gives_a_reason_per_bad_row_or_names_the_field(batch):
    kind, cols, fault, victim = batch
    schema = SCHEMAS[kind]
    if fault is None or (fault == "missing" and schema[victim] == "optional_id"):
        _check_validated(kind, cols, validate(kind, cols, now=NOW))  # rows, never the batch
        return
    with pytest.raises(EventError) as err:  # a malformed batch: the field at fault named
        validate(kind, cols, now=NOW)
    assert re.search(rf"'?\b{victim}\b", str(err.value)), (fault, victim, str(err.value))


@st.composite
def triton_interactions(draw):
    """Interactions as the `feedback` model receives them: its declared wire types
    (feedback.ingest.INPUTS), [n, 1], with any value those types can carry (NaN, ±inf,
    negative ids, bytes that are not UTF-8)."""
    n = draw(st.integers(1, 6))

    def raw_bytes():
        arr = np.empty((n, 1), dtype=object)
        arr[:, 0] = draw(
            st.lists(
                st.binary(max_size=10) | st.sampled_from([b"click", b"watch", b"like"]),
                min_size=n,
                max_size=n,
            )
        )
        return arr

    def floats(dtype):
        return draw(
            hnp.arrays(dtype, (n, 1), elements=st.floats(width=np.dtype(dtype).itemsize * 8))
        )

    return {
        "event_id": raw_bytes(),
        "user_id": draw(hnp.arrays(np.int64, (n, 1))),
        "item_id": draw(hnp.arrays(np.int64, (n, 1))),
        "type": raw_bytes(),
        "value": floats(np.float32),
        "ts": floats(np.float64),
        "request_id": raw_bytes(),
    }


@SETTINGS
@given(triton_interactions())
def test_whatever_the_wire_carries_is_stored_clean_or_quarantined_with_its_field(tensors):
    cols = parse_request(tensors.get)  # what the `feedback` model does with a request
    v = validate(INTERACTION, cols, now=NOW)  # never raises for well-formed tensors
    _check_validated(INTERACTION, cols, v)
    for i, reason in enumerate(v.reason_per_row()):
        value, ts = float(cols["value"][i]), float(cols["ts"][i])
        if not (math.isfinite(value) and math.isfinite(ts)):  # NaN or ±inf never gets in
            assert reason, f"row {i}: value={value}, ts={ts} was accepted"
        if reason.startswith(("value: ", "ts: ")):
            assert reason.split(": ", 1)[1] in (
                "missing",  # NaN
                "not finite",
                "negative",
                "before 2001-09-09 (unix seconds expected)",
                "more than 86400 s in the future",
            ), reason


# Minimal examples hypothesis once found: each must be refused with a reason naming the field.
KNOWN_EVENT_CRASHES = {
    "int field, integral float beyond int64": ("user_id", np.array([1e19])),
    "int field, object 1e300": ("item_id", np.array([1e300], dtype=object)),
    "float field, Python int beyond float": ("value", np.array([10**400], dtype=object)),
}


@pytest.mark.parametrize("case", sorted(KNOWN_EVENT_CRASHES))
def test_known_event_crash(case):
    name, bad = KNOWN_EVENT_CRASHES[case]
    cols = {
        "event_id": np.array(["a"], dtype=object),
        "user_id": np.array([1]),
        "item_id": np.array([2]),
        "type": np.array(["click"], dtype=object),
        "value": np.array([1.0]),
        "ts": np.array([time.time()]),
    }
    cols[name] = bad
    v = validate(INTERACTION, cols)
    assert v.reasons and v.reasons[0].startswith(f"{name}: ")


# ---------------------------------------------------------------------------- config parsing


@dataclass(frozen=True)
class Inner:
    n: int = 1
    name: str = "x"


@dataclass(frozen=True)
class Sample:
    """Every field type common.config coerces."""

    i: int = 0
    f: float = 0.0
    s: str = ""
    b: bool = False
    lit: Literal["a", "b"] = "a"
    opt: int | None = None
    tup: tuple[int, ...] = (1,)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.i < 0:
            raise ValueError(f"i={self.i}: expected >= 0")


FIELDS = ["i", "f", "s", "b", "lit", "opt", "tup", "inner"]
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["1", "-3", "2.5", "true", "no", "a", "b", "none", "1,2", "1,x", "nan"]),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from([*FIELDS, "inner_typo", ""]) | st.text(max_size=5)


def _names(text: str, key: str) -> bool:
    """`key` appears in `text` as a name (not inside another word), or quoted."""
    return repr(key) in text or bool(key and re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", text))


@SETTINGS
@given(st.dictionaries(keys, json_like, max_size=4))
def test_build_gives_a_config_or_an_error_naming_the_key(values):
    try:
        cfg = build(Sample, values)
    except ValueError as exc:  # ConfigError, or the config's own check in __post_init__
        assert any(_names(str(exc), k) for k in values), str(exc)
        return
    assert isinstance(cfg.i, int) and isinstance(cfg.f, float) and isinstance(cfg.s, str)
    assert isinstance(cfg.b, bool) and cfg.lit in ("a", "b") and isinstance(cfg.inner, Inner)
    assert cfg.opt is None or isinstance(cfg.opt, int)
    assert all(isinstance(x, int) for x in cfg.tup)


override_keys = st.sampled_from(
    [*FIELDS, "inner.n", "inner.name", "inner.zz", "zz", "i.x", "tup.x", "", "inner.n.x"]
)
override_values = st.sampled_from(
    ["", "1", "-1", "2.5", "true", "a", "none", "1,2", "x", "=", "nan"]
)
overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", override_keys, override_values) | st.text(max_size=6),
    max_size=4,
)


@SETTINGS
@given(overrides)
def test_load_overrides_give_a_config_or_an_error_naming_the_key(items):
    try:
        cfg = load(Sample, None, items)
    except ValueError as exc:
        text = str(exc)
        keys = [item.split("=", 1)[0] for item in items if "=" in item]
        named = [*keys, *(k.split(".")[0] for k in keys)]
        assert any(repr(item) in text for item in items) or any(_names(text, k) for k in named), (
            text
        )
        return
    assert isinstance(cfg, Sample)


# Minimal examples hypothesis once found: each must be a ConfigError naming the key.
KNOWN_CONFIG_CRASHES: dict[str, tuple[str, Any]] = {
    "nested config given a scalar": ("build", {"inner": 5}),  # TypeError
    "nested config given a string": ("build", {"inner": "x"}),  # ValueError, no key named
    "nested config given a list": ("build", {"inner": [1, 2]}),  # TypeError
    "tuple given a scalar": ("build", {"tup": 5}),  # TypeError
    "int given infinity": ("build", {"i": float("inf")}),  # OverflowError
    "a key that is not a string (YAML `1: 2`)": ("build", {1: 2}),  # TypeError
    "--set of a nested config to a scalar": ("load", ["inner=5"]),  # ValueError, no key
    "--set into a nested config set to a scalar": ("load", ["inner=5", "inner.n=2"]),
}


@pytest.mark.parametrize("case", sorted(KNOWN_CONFIG_CRASHES))
def test_known_config_crash(case):
    how, arg = KNOWN_CONFIG_CRASHES[case]
    with pytest.raises(ConfigError, match=r"inner|tup|\bi\b|\b1\b"):
        build(Sample, arg) if how == "build" else load(Sample, None, arg)
