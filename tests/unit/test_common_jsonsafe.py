"""One JSON conversion: numpy to Python, NaN and infinities to null, strict output."""

import enum
import json
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from common.jsonsafe import dumps, to_jsonable


class Colour(enum.Enum):
    RED = "red"


@dataclass
class Row:
    version: np.int64
    ctr: float
    where: Path


def test_numpy_scalars_and_arrays_become_python():
    out = to_jsonable(
        {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(3)}
    )
    assert out == {"i": 3, "f": 0.5, "b": True, "a": [0, 1, 2]}
    assert type(out["i"]) is int and type(out["f"]) is float and type(out["b"]) is bool


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float64("nan"), np.inf])
def test_nan_and_infinities_become_null(bad):
    assert to_jsonable(bad) is None
    assert to_jsonable(np.array([1.0, bad])) == [1.0, None]


def test_containers_dataclasses_paths_and_keys():
    obj = {
        np.int64(1): (Row(np.int64(2), math.nan, Path("/x/y")),),
        "s": {3, 1, 2},
        "c": Colour.RED,
        "d": date(2025, 6, 15),
    }
    assert to_jsonable(obj) == {
        "1": [{"version": 2, "ctr": None, "where": "/x/y"}],
        "s": [1, 2, 3],
        "c": "red",
        "d": "2025-06-15",
    }


def test_unknown_types_raise_unless_a_default_is_given():
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})
    err = ValueError("boom")
    assert to_jsonable({"x": err}, default=str) == {"x": "boom"}


def test_dumps_is_strict_json():
    text = dumps({"v": [np.float64(1.5), np.nan, -np.inf]}, indent=1)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"v": [1.5, None, None]}
