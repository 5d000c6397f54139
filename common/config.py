"""Typed, frozen configs from files and flags.

Each stage owns one frozen dataclass. This module only knows how to fill one
from a TOML/YAML/JSON file plus `key=value` overrides, checking every name and
type, so a typo in a config file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text) or {}
    if path.suffix == ".json":
        return json.loads(text)
    raise ConfigError(f"{path}: unknown config format; expected .toml, .yaml or .json")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `name` and what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        if isinstance(value, str):
            items = [v for v in value.split(",") if v.strip()] if value.strip() else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{name}={value!r}: expected a list (or comma-separated values)")
        return tuple(_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(items))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}={value!r}: expected one of {typing.get_args(tp)}")
        return value
    if tp is bool:
        return _bool(value, name)
    if tp is int:
        return _int(value, name)
    if tp is float:
        return _float(value, name)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `version: 1.0` as a number
        raise ConfigError(f"{name}={value!r}: expected a string")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a table of {tp.__name__} fields")
        return build(tp, value, prefix=f"{name}.")
    return value


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
    elif isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{name}={value!r}: expected a boolean (true/false)")


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    raise ConfigError(f"{name}={value!r}: expected an integer")


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected a number, not a boolean")
    out: float | None = None
    if isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:  # an int beyond float's range
            out = math.copysign(math.inf, value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = None
    # ±inf is a meaningful setting (a join "as of" the end of time); NaN never is.
    if out is None or math.isnan(out):
        raise ConfigError(f"{name}={value!r}: expected a number")
    return out


def build(cls: type[T], values: dict[str, Any] | None = None, prefix: str = "") -> T:
    """Make `cls` from a (possibly nested) dict, rejecting unknown keys and bad values."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a table, got {values!r}")
    values = dict(values or {})
    if bad := [k for k in values if not isinstance(k, str)]:
        raise ConfigError(f"config keys {[prefix + str(k) for k in bad]}: expected names (text)")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(prefix + u for u in unknown)}; valid: {sorted(names)}"
        )
    required = [
        f.name
        for f in fields
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if required:
        raise ConfigError(f"missing config key(s) {sorted(prefix + r for r in required)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """`base` first, then the file's values, then `a.b=value` overrides from the command line."""
    values: dict[str, Any] = dict(base or {})
    if path:
        loaded = read_file(path)
        if section and section in loaded:
            loaded = loaded[section]
        values.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, val = item.split("=", 1)
        node = values
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a table")
        node[leaf] = val
    return build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def add_config_args(parser, what: str, example: str = "") -> None:
    """`--config FILE` and `--set KEY=VALUE ...` for a stage's typed config (see `load`)."""
    parser.add_argument("--config", help=f"{what} as .toml/.yaml/.json")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} fields" + (f", e.g. {example}" if example else ""),
    )
