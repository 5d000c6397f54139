"""The two feedback events, their column schemas, and validation that names field and problem.

Events travel as *columns*: a dict of equal-length 1-D numpy arrays, one per field. That is
what a Triton request carries, what SQLite's `executemany` and Parquet want, and it keeps
validation vectorised (a batch of 10k events is checked in a few numpy passes).

Validation never raises for a bad *row*: it returns the clean rows plus one reason per bad
row, and the sink writes those to the quarantine table. Reasons are fixed strings of the
form "field: problem" (no values inside), so that counting rows per reason is meaningful;
the offending values are kept in the quarantined row's payload. A bad *batch* (a column
missing, columns of different lengths) is a caller bug and raises `EventError`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

IMPRESSION = "impression"
INTERACTION = "interaction"

# Interaction kinds a client may send. A subset of training.schema.EVENT_TYPES: "view" and
# "rating" come from offline sources, never from the live feedback path.
INTERACTION_TYPES = ("click", "watch", "like")

# Longer ids are almost always a client bug (a JSON blob in the id field); 128 fits a UUID,
# a request id plus a position, and a namespaced id.
MAX_ID_CHARS = 128
# Client clocks drift and phones queue events offline, but an event more than a day ahead of
# the server's clock is corrupt, and it would drag the join's event-time watermark forward.
DEFAULT_MAX_FUTURE_S = 86_400.0
# 2001-09-09 (unix 1e9): anything earlier is a seconds/milliseconds mix-up or a zero.
MIN_TS = 1.0e9
# `value` per interaction type. A click or a like is an event, so its value is 0..1 (1.0 by
# convention); a watch carries seconds watched, bounded so that one forged event cannot
# outweigh a user's whole history in the join's max-watch label or the live features.
FLAG_VALUE_MAX = 1.0
# A day of watching in one event: longer is a client bug or a forgery.
DEFAULT_MAX_WATCH_S = 86_400.0
# A quarantined row keeps each offending value up to this many characters: the quarantine
# is for diagnosis, and whole values let a few requests grow it by megabytes.
MAX_QUARANTINED_CHARS = 256


class EventError(ValueError):
    """A malformed *batch* (not a malformed row). The message names the field."""


@dataclass(frozen=True)
class Impression:
    """One item shown to one user at one position of one response.

    `propensity` is P(this item at this position | the logging policy), in (0, 1]; see
    feedback/explore.py. `ts` is the server's clock in unix seconds.
    """

    event_id: str
    request_id: str
    user_id: int
    item_id: int
    position: int  # 0 = top slot
    score: float
    model_version: int
    propensity: float
    ts: float


@dataclass
class ServedImpressions:
    """The rows one batch served, as columns: one per (slate, position), each an
    `Impression` without its event_id and ts (the logger adds both when it logs them).

    What the serving path (serving.recommender, the simulator's local double) hands the
    event log through `feedback.hook.ImpressionLogger.write`. `propensity` None means a
    deterministic policy: every shown item was certain to be shown there (1.0).
    """

    request_id: np.ndarray  # (n,) object: str (or bytes)
    user_id: np.ndarray  # (n,) int64
    item_id: np.ndarray  # (n,) int64
    position: np.ndarray  # (n,) int32, 0-based
    score: np.ndarray  # (n,) float32
    model_version: np.ndarray  # (n,) int64
    propensity: np.ndarray | None = None  # (n,) float64, P(item at position | policy)

    def __len__(self) -> int:
        return len(self.item_id)

    @classmethod
    def empty(cls) -> ServedImpressions:
        e = np.zeros(0, dtype=np.int64)
        return cls(
            request_id=np.zeros(0, dtype=object),
            user_id=e,
            item_id=e,
            position=e.astype(np.int32),
            score=e.astype(np.float32),
            model_version=e,
            propensity=e.astype(np.float64),
        )


@dataclass(frozen=True)
class Interaction:
    """A user's action on an item. `value`: watch seconds for "watch", 1.0 for click and like
    by convention. `request_id` is "" when the client did not keep it (then the join
    attributes by user and item inside the window)."""

    event_id: str
    user_id: int
    item_id: int
    type: str  # one of INTERACTION_TYPES
    value: float
    ts: float
    request_id: str = ""


# field name -> kind. Order is the column order everywhere (SQLite, Parquet, Triton).
IMPRESSION_FIELDS: dict[str, str] = {
    "event_id": "id",
    "request_id": "id",
    "user_id": "int",
    "item_id": "int",
    "position": "int",
    "score": "float",
    "model_version": "int",
    "propensity": "float",
    "ts": "float",
}
INTERACTION_FIELDS: dict[str, str] = {
    "event_id": "id",
    "user_id": "int",
    "item_id": "int",
    "type": "str",
    "value": "float",
    "ts": "float",
    "request_id": "optional_id",
}
SCHEMAS = {IMPRESSION: IMPRESSION_FIELDS, INTERACTION: INTERACTION_FIELDS}

Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class Validated:
    """Result of validating one batch. `ok` indexes the input rows that passed."""

    columns: Columns  # clean rows only, canonical dtypes
    ok: np.ndarray  # (n_ok,) int64 indices into the input batch
    bad: np.ndarray  # (n_bad,) int64 indices into the input batch
    reasons: list[str]  # one "field: problem" per bad row, aligned with `bad`
    payloads: list[str]  # JSON of each bad row's raw values, aligned with `bad`
    n: int  # rows in the input batch

    def reason_per_row(self) -> list[str]:
        """ "" for rows that passed, the reason for rows that did not; input order."""
        out = [""] * self.n
        for i, r in zip(self.bad.tolist(), self.reasons, strict=True):
            out[i] = r
        return out


def to_columns(events: Sequence[Impression] | Sequence[Interaction]) -> Columns:
    """Dataclass events -> columns (for tests and small callers)."""
    if not events:
        raise EventError("no events given")
    names = [f.name for f in fields(events[0])]
    rows = [asdict(e) for e in events]
    return {n: np.asarray([r[n] for r in rows], dtype=object) for n in names}


def validate(
    kind: str,
    columns: Mapping[str, Any],
    *,
    now: float | None = None,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
    max_watch_s: float = DEFAULT_MAX_WATCH_S,
) -> Validated:
    """Check every row of a batch; return clean columns and a reason per bad row.

    A row's reason is the first failing check in field order, so each bad row is counted
    once. `now` (unix seconds, default the clock) bounds how far in the future `ts` may be;
    `max_watch_s` bounds a watch event's `value` (click and like: 0..FLAG_VALUE_MAX).
    """
    if kind not in SCHEMAS:
        raise EventError(f"unknown event kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    schema = SCHEMAS[kind]
    missing = [f for f, k in schema.items() if f not in columns and k != "optional_id"]
    if missing:
        raise EventError(f"{kind}s: missing field(s) {missing}; expected {list(schema)}")
    unknown = sorted(set(columns) - set(schema))
    if unknown:
        raise EventError(f"{kind}s: unknown field(s) {unknown}; expected {list(schema)}")
    raw = {f: _as_1d(columns[f], f, kind) for f in schema if f in columns}
    lengths = {f: len(a) for f, a in raw.items()}
    n = next(iter(lengths.values()))
    if any(v != n for v in lengths.values()):
        raise EventError(f"{kind}s: fields have different lengths {lengths}")
    now = time.time() if now is None else float(now)

    reason = np.full(n, "", dtype=object)
    marked = np.zeros(n, dtype=bool)
    clean: Columns = {}
    for f, k in schema.items():
        if f not in raw:  # optional id not sent: absent for every row
            clean[f] = np.full(n, "", dtype=object)
            continue
        values, problems = _COERCE[k](raw[f])
        for problem, mask in problems:
            _mark(reason, marked, mask, f"{f}: {problem}")
        clean[f] = values
    for problem, f, mask in _rules(kind, clean, now, max_future_s, max_watch_s):
        _mark(reason, marked, mask, f"{f}: {problem}")

    ok = np.flatnonzero(~marked)
    bad = np.flatnonzero(marked)
    return Validated(
        columns={f: v[ok] for f, v in clean.items()},
        ok=ok,
        bad=bad,
        reasons=reason[bad].tolist(),
        payloads=[_payload(raw, i) for i in bad.tolist()],
        n=n,
    )


# ---------------------------------------------------------------------------- internals


def _as_1d(values: Any, field: str, kind: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim == 0:
        raise EventError(f"{kind}s: field '{field}' is a scalar; expected one value per event")
    if a.ndim == 2 and a.shape[1] == 1:  # Triton tensors arrive as (n, 1)
        a = a[:, 0]
    if a.ndim != 1:
        raise EventError(f"{kind}s: field '{field}' has shape {a.shape}; expected (n,)")
    return a


def _mark(reason: np.ndarray, marked: np.ndarray, mask: np.ndarray, text: str) -> None:
    new = mask & ~marked
    if new.any():
        reason[new] = text
        marked |= new


def _is_missing(a: np.ndarray) -> np.ndarray:
    if a.dtype == object:
        return np.fromiter(
            (v is None or (isinstance(v, float) and math.isnan(v)) for v in a),
            dtype=bool,
            count=len(a),
        )
    if a.dtype.kind == "f":
        return np.isnan(a)
    return np.zeros(len(a), dtype=bool)


def _coerce_int(a: np.ndarray):
    n = len(a)
    if a.dtype.kind in "iu":
        return a.astype(np.int64), []
    if a.dtype.kind == "b":
        return a.astype(np.int64), [("not an integer", np.ones(n, dtype=bool))]
    missing = _is_missing(a)
    out = np.zeros(n, dtype=np.int64)
    not_int = np.zeros(n, dtype=bool)
    for i, v in enumerate(a.tolist()):
        if missing[i]:
            continue
        if isinstance(v, bool):
            not_int[i] = True
        elif isinstance(v, int):
            if -(2**63) <= v < 2**63:
                out[i] = v
            else:
                not_int[i] = True
        elif isinstance(v, float) and math.isfinite(v) and v == int(v) and -(2**63) <= v < 2**63:
            out[i] = int(v)
        else:  # a fraction, a string, or an integral float beyond int64
            not_int[i] = True
    return out, [("missing", missing), ("not an integer", not_int)]


def _coerce_float(a: np.ndarray):
    n = len(a)
    if a.dtype.kind in "fiu":
        out = a.astype(np.float64)
        return out, [("missing", np.isnan(out)), ("not finite", np.isinf(out))]
    missing = _is_missing(a)
    out = np.zeros(n, dtype=np.float64)
    not_num = np.zeros(n, dtype=bool)
    for i, v in enumerate(a.tolist()):
        if missing[i]:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                out[i] = float(v)
            except OverflowError:  # a Python int beyond float: not finite as a float
                out[i] = math.inf
        else:
            not_num[i] = True
    return out, [
        ("missing", missing),
        ("not a number", not_num),
        ("not finite", ~missing & ~not_num & ~np.isfinite(out)),
    ]


def _coerce_str(a: np.ndarray):
    n = len(a)
    if a.dtype.kind == "U":
        return a.astype(object), []
    kinds = set(map(type, a))
    if kinds <= {str}:  # the common cases first: one C-level pass each
        return a, []
    if kinds == {bytes}:  # Triton BYTES tensors
        try:
            return _object_array([v.decode("utf-8") for v in a]), []
        except UnicodeDecodeError:
            pass
    out = np.full(n, "", dtype=object)
    missing = np.zeros(n, dtype=bool)
    not_str = np.zeros(n, dtype=bool)
    not_utf8 = np.zeros(n, dtype=bool)
    for i, v in enumerate(a.tolist()):
        if isinstance(v, str):
            out[i] = v
        elif isinstance(v, bytes):
            try:
                out[i] = v.decode("utf-8")
            except UnicodeDecodeError:
                not_utf8[i] = True
        elif v is None or (isinstance(v, float) and math.isnan(v)):
            missing[i] = True
        else:
            not_str[i] = True
    return out, [("missing", missing), ("not a string", not_str), ("not UTF-8", not_utf8)]


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _lengths(values: np.ndarray) -> np.ndarray:
    return np.fromiter(map(len, values), dtype=np.int64, count=len(values))


def _coerce_id(a: np.ndarray):
    out, problems = _coerce_str(a)
    lengths = _lengths(out)
    problems.append(("empty", lengths == 0))
    problems.append((f"longer than {MAX_ID_CHARS} characters", lengths > MAX_ID_CHARS))
    return out, problems


def _coerce_optional_id(a: np.ndarray):
    if a.dtype == object and type(None) in set(map(type, a)):  # None means absent here
        a = _object_array(["" if v is None else v for v in a.tolist()])
    out, problems = _coerce_str(a)
    lengths = _lengths(out)
    problems.append((f"longer than {MAX_ID_CHARS} characters", lengths > MAX_ID_CHARS))
    return out, problems


_COERCE = {
    "int": _coerce_int,
    "float": _coerce_float,
    "str": _coerce_str,
    "id": _coerce_id,
    "optional_id": _coerce_optional_id,
}


def _rules(kind: str, c: Columns, now: float, max_future_s: float, max_watch_s: float):
    """(problem, field, bad mask) for the checks that need more than a type."""
    yield "negative", "user_id", c["user_id"] < 0
    yield "negative", "item_id", c["item_id"] < 0
    ts = c["ts"]
    with np.errstate(invalid="ignore"):
        yield "before 2001-09-09 (unix seconds expected)", "ts", ts < MIN_TS
        yield f"more than {max_future_s:.0f} s in the future", "ts", ts > now + max_future_s
    if kind == IMPRESSION:
        yield "negative", "position", c["position"] < 0
        yield "negative", "model_version", c["model_version"] < 0
        p = c["propensity"]
        with np.errstate(invalid="ignore"):
            yield "outside (0, 1]", "propensity", ~((p > 0) & (p <= 1))
    else:
        t = c["type"]
        bad_type = np.ones(len(t), dtype=bool)
        for name in INTERACTION_TYPES:
            bad_type &= t != name
        yield f"not one of {'|'.join(INTERACTION_TYPES)}", "type", bad_type
        v = c["value"]
        with np.errstate(invalid="ignore"):
            yield "negative", "value", v < 0
            flag = (t == "click") | (t == "like")
            yield (
                f"above {FLAG_VALUE_MAX:g} for a click or like",
                "value",
                flag & (v > FLAG_VALUE_MAX),
            )
            yield (
                f"above {max_watch_s:g} s for a watch",
                "value",
                (t == "watch") & (v > max_watch_s),
            )


def _payload(raw: Mapping[str, np.ndarray], i: int) -> str:
    row = {}
    for f, a in raw.items():
        v = a[i]
        v = v.item() if isinstance(v, np.generic) else v
        if isinstance(v, bytes):
            # Only what is kept is decoded: a megabyte-long id costs no more than a short one.
            head = v[: MAX_QUARANTINED_CHARS * 4].decode("utf-8", errors="backslashreplace")
            cut = len(head) > MAX_QUARANTINED_CHARS or len(v) > MAX_QUARANTINED_CHARS * 4
            v = _marked(head, len(v), "bytes") if cut else head
        elif isinstance(v, str) and len(v) > MAX_QUARANTINED_CHARS:
            v = _marked(v, len(v), "characters")
        if isinstance(v, float) and not math.isfinite(v):
            v = repr(v)
        row[f] = (
            v
            if isinstance(v, (str, int, float, bool)) or v is None
            else repr(v)[:MAX_QUARANTINED_CHARS]
        )
    return json.dumps(row, sort_keys=True)


def _marked(text: str, size: int, unit: str) -> str:
    """`text` cut to MAX_QUARANTINED_CHARS with a marker giving the original's size."""
    return f"{text[:MAX_QUARANTINED_CHARS]}...[truncated: {size} {unit}]"
