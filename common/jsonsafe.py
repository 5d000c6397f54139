"""One JSON conversion for every report and state file: strict JSON, no NaN, no pickles.

`to_jsonable(obj)` turns what the project's reports hold into plain JSON values:

- numpy scalars become Python numbers and bools, numpy arrays become (nested) lists;
- NaN, +inf and -inf become None (JSON has no spelling for them: Python's `NaN` token is
  refused by most other parsers, and a missing number is what they mean);
- dataclass instances become dicts of their fields, Paths become strings, Enums their
  value, dates and datetimes ISO 8601 strings;
- dicts (keys become strings), lists, tuples and sets are converted recursively
  (sets sorted where their items allow, so the output is reproducible).

Anything else raises TypeError naming its type, unless `default` is given: then
`default(obj)` is converted in its place (e.g. `default=str` for a report that may hold an
exception or another object worth showing as text).

`dumps(obj, **kw)` is `json.dumps(to_jsonable(obj), allow_nan=False, **kw)`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["dumps", "to_jsonable"]


def to_jsonable(obj: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` as plain JSON values (dict, list, str, int, float, bool, None); see the module."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):  # int subclasses (IntEnum, numpy's in some builds) included
        return obj.value if isinstance(obj, enum.Enum) else int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):  # numpy bool_, integer, floating, str_ ...
        return to_jsonable(obj.item(), default=default)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), default=default)
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v, default=default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, default=default) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v, default=default) for v in obj]
        try:
            return sorted(items)
        except TypeError:  # mixed types: keep the iteration order
            return items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name), default=default)
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, default=default)
    if isinstance(obj, (dt.date, dt.time)):  # datetime is a date
        return obj.isoformat()
    if default is not None:
        return to_jsonable(default(obj), default=None)
    raise TypeError(f"{type(obj).__module__}.{type(obj).__qualname__} is not JSON-serialisable")


def dumps(obj: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """json.dumps of `to_jsonable(obj, default=default)`, refusing NaN (there is none left)."""
    return json.dumps(to_jsonable(obj, default=default), allow_nan=False, **kwargs)


def _key(k: Any) -> str:
    """A dict key as JSON's string: numpy scalars by their Python value, Enums by value."""
    if isinstance(k, str):
        return k
    if isinstance(k, np.generic):
        k = k.item()
    if isinstance(k, enum.Enum):
        k = k.value
    return str(k)
