"""Interaction rows as the store takes them, whichever table they come from.

Two tables feed the store: the training data (training.schema: `timestamp`,
`event_type`, no event id) seeds it, and the event log (feedback.events: `ts`, `type`,
`event_id`, plus `seq` when read with_meta) keeps it current. Both spellings are
accepted here so that neither caller has to rename columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# The interaction types that are history and "seen". Training puts every row of the
# interactions table into a version's history and seen set (FeatureSnapshot.build is fed
# the whole table), and that table holds exactly these types (training.schema.EVENT_TYPES;
# a unit test keeps the two equal, since online may not import training). The live log
# sends a subset (feedback.events.INTERACTION_TYPES). Impressions are not interactions.
HISTORY_EVENT_TYPES = frozenset({"view", "click", "watch", "like", "rating"})

_ALIASES = {
    "ts": ("ts", "timestamp"),
    "event_type": ("event_type", "type"),
}


class RowsError(ValueError):
    """A frame without a column the store needs. The message names the column."""


@dataclass(frozen=True)
class Rows:
    """Interaction columns as numpy arrays, only the rows that count as history."""

    user_id: np.ndarray  # (n,) int64
    item_id: np.ndarray  # (n,) int64
    ts: np.ndarray  # (n,) float64, unix seconds
    event_id: np.ndarray | None  # (n,) object (str); None for the training table
    seq: int | None  # highest event-log seq in the frame (before filtering), if it has one
    ignored: int  # rows dropped: not a history event type

    def __len__(self) -> int:
        return len(self.user_id)


def _column(df: pd.DataFrame, name: str, *, required: bool = True) -> pd.Series | None:
    for alias in _ALIASES.get(name, (name,)):
        if alias in df.columns:
            return df[alias]
    if required:
        names = " or ".join(repr(a) for a in _ALIASES.get(name, (name,)))
        raise RowsError(f"interactions: missing column {names}; found {list(df.columns)}")
    return None


def history_rows(df: pd.DataFrame, *, need_event_id: bool) -> Rows:
    """The rows of `df` that are history, in their order (callers pass time order)."""
    types = _column(df, "event_type", required=False)
    keep = (
        types.astype(str).isin(HISTORY_EVENT_TYPES).to_numpy()
        if types is not None
        else np.ones(len(df), dtype=bool)
    )
    event_id = _column(df, "event_id", required=need_event_id)
    seq = int(df["seq"].max()) if "seq" in df.columns and len(df) else None
    return Rows(
        user_id=_column(df, "user_id").to_numpy(np.int64)[keep],
        item_id=_column(df, "item_id").to_numpy(np.int64)[keep],
        ts=_column(df, "ts").to_numpy(np.float64)[keep],
        event_id=None if event_id is None else event_id.astype(str).to_numpy(object)[keep],
        seq=seq,
        ignored=int((~keep).sum()),
    )


def group_by_user(user_id: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, unique users, group starts): rows of user u are order[starts[i]:starts[i+1]],
    still in their input (time) order because the sort is stable."""
    order = np.argsort(user_id, kind="stable")
    sorted_users = user_id[order]
    if len(sorted_users) == 0:
        return order, sorted_users, np.zeros(1, dtype=np.int64)
    first = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
    starts = np.flatnonzero(first)
    return order, sorted_users[starts], np.r_[starts, len(sorted_users)].astype(np.int64)
