"""Which `retrieval` version answers which user: production, and optionally a canary.

The state is one small JSON file that the `recommend` model re-reads when it
changes (`model_repository/recommend/state/routing.json`):

    {"production": 3, "canary": 4, "canary_percent": 10, "salt": 0}

A user goes to the canary when `hash_bucket(user_id ^ salt, 100) < canary_percent`.
The hash is deterministic, so a user keeps seeing the same version for the
whole test, and changing `salt` reshuffles who is in the canary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.files import write_private
from models.features import hash_bucket

ROUTING_FILE = "routing.json"


@dataclass(frozen=True)
class RoutingState:
    production: int
    canary: int | None = None
    canary_percent: int = 0  # 0..100; the hash has 100 buckets, so 1% is the step
    salt: int = 0

    def __post_init__(self) -> None:
        if self.production < 1:
            raise ValueError(f"routing: production={self.production}; expected a version >= 1")
        if self.canary is not None and self.canary < 1:
            raise ValueError(f"routing: canary={self.canary}; expected a version >= 1 or null")
        if not 0 <= self.canary_percent <= 100:
            raise ValueError(f"routing: canary_percent={self.canary_percent}; expected 0..100")

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions that can receive traffic, production first."""
        if self.canary is None or self.canary == self.production or self.canary_percent == 0:
            return (self.production,)
        return (self.production, self.canary)

    def version_for(self, user_ids: np.ndarray) -> np.ndarray:
        """(B,) int64 version per raw user id."""
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        out = np.full(len(user_ids), self.production, dtype=np.int64)
        if len(self.versions) > 1:
            bucket = hash_bucket(user_ids ^ np.int64(self.salt), 100)
            out[bucket < self.canary_percent] = self.canary
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> RoutingState:
        unknown = set(d) - {"production", "canary", "canary_percent", "salt"}
        if unknown:
            raise ValueError(f"routing: unknown key(s) {sorted(unknown)}")
        if "production" not in d:
            raise ValueError("routing: missing key 'production' (the serving version number)")
        canary = d.get("canary")
        return cls(
            production=int(d["production"]),
            canary=None if canary is None else int(canary),
            canary_percent=int(d.get("canary_percent", 0)),
            salt=int(d.get("salt", 0)),
        )

    @classmethod
    def load(cls, path: str | Path) -> RoutingState:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad routing state ({exc})") from exc

    def save(self, path: str | Path) -> Path:
        """Atomic (`recommend` polls this file and must never read half of it) and
        owner-only: whoever can write it chooses the model every user sees."""
        return write_private(path, self.to_json())
