"""What the store knows about a user, in raw ids: the same for every model version.

A version turns it into model inputs with its own vocabulary (online.view). Keeping raw
ids here is what lets production and canary read one store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NO_ITEMS = np.zeros(0, dtype=np.int64)
_NO_TS = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, eq=False)  # numpy fields: compare with online.state.same_record
class UserRecord:
    exists: bool  # the store has anything for this user (categoricals, history or seen)
    # (<= H,) raw item ids, oldest first, and their unix seconds
    history_items: np.ndarray = field(default_factory=_NO_ITEMS.copy)
    history_ts: np.ndarray = field(default_factory=_NO_TS.copy)
    seen: np.ndarray = field(default_factory=_NO_ITEMS.copy)  # sorted unique raw item ids
    cats: dict[str, str] = field(default_factory=dict)  # categorical name -> raw value


ABSENT = UserRecord(exists=False)


def same_record(a: UserRecord, b: UserRecord) -> bool:
    return (
        a.exists == b.exists
        and np.array_equal(a.history_items, b.history_items)
        and np.array_equal(a.history_ts, b.history_ts)
        and np.array_equal(a.seen, b.seen)
        and a.cats == b.cats
    )


@dataclass(frozen=True, eq=False)
class RawUserState:
    """One record per requested user, in request order (duplicates repeated)."""

    user_ids: np.ndarray  # (B,) int64
    records: list[UserRecord]
    # True where the store did not answer and no cached copy existed: the record is
    # ABSENT, so the user is served as a cold start, and serving flags the answer.
    degraded: np.ndarray  # (B,) bool

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def exists(self) -> np.ndarray:
        return np.fromiter((r.exists for r in self.records), bool, len(self.records))
