"""What every event log returns and implements: `WriteResult` (one batch's outcome), and
the `EventSink` (writers) and `EventSource` (the join) interfaces.

Their own module so that each implementation (feedback/sink.py's SQLite log,
feedback/stream.py's Redis Stream) imports them from below, and `sink.open_sink` can
choose between the two without the two importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class WriteResult:
    """What happened to one batch. Everything in it is durable when the object exists."""

    n: int  # rows in the batch
    inserted: int  # new rows stored
    duplicates: int  # valid rows whose event_id was already stored (a retry): not re-stored
    quarantined: int  # rows that failed validation, stored in the quarantine table
    reasons: list[str]  # per input row: "" = accepted, else "field: problem"

    @property
    def accepted(self) -> np.ndarray:
        """(n,) bool. Duplicates count as accepted: the event is in the log."""
        return np.asarray([r == "" for r in self.reasons], dtype=bool)


@runtime_checkable
class EventSink(Protocol):
    """Where serving and ingest write. Returns only once the batch is durable."""

    def write_impressions(self, rows: Mapping[str, Any]) -> WriteResult: ...

    def write_interactions(self, rows: Mapping[str, Any]) -> WriteResult: ...

    def close(self) -> None: ...


@runtime_checkable
class EventSource(Protocol):
    """What the join reads: per kind, an offset-ordered stream with a snapshot upper bound."""

    def snapshot(self) -> dict[str, int]: ...  # kind -> highest committed seq

    def read(self, kind: str, *, after: int, upto: int) -> pd.DataFrame: ...

    def quarantine_counts(self) -> dict[str, dict[str, int]]: ...  # kind -> reason -> n
