"""Typed, frozen configs from files and flags.

Each stage owns one frozen dataclass. This module only knows how to fill one
from a TOML/YAML/JSON file plus `key=value` overrides, checking every name and
type, so a typo in a config file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import json
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
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "none":
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(v, inner, name) for v in items)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}={value!r}: expected one of {typing.get_args(tp)}")
        return value
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}={value!r}: expected a boolean")
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}={value!r}: expected {tp.__name__}") from exc
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{name}.")
    return value


def build(cls: type[T], values: dict[str, Any] | None = None, prefix: str = "") -> T:
    """Make `cls` from a (possibly nested) dict, rejecting unknown keys."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(prefix + u for u in unknown)}; valid: {sorted(names)}"
        )
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
        for p in parents:
            node = node.setdefault(p, {})
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
