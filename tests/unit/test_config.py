from dataclasses import dataclass, field

import pytest

from common.config import ConfigError, build, load


@dataclass(frozen=True)
class Inner:
    a: int = 1


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    flag: bool = False
    maybe: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_overrides_and_nested(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "y"\n[inner]\na = 3\n')
    cfg = load(Outer, path, ["rate=0.25", "flag=true", "inner.a=4"])
    assert cfg == Outer(name="y", rate=0.25, flag=True, inner=Inner(a=4))


def test_unknown_key_and_bad_type_are_named():
    with pytest.raises(ConfigError, match="nope"):
        build(Outer, {"nope": 1})
    with pytest.raises(ConfigError, match="rate"):
        build(Outer, {"rate": "fast"})
