"""`DiagnoseConfig`: what to compare and where the inputs are (typed, frozen; --config/--set)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

DAY_S = 86_400.0


@dataclass(frozen=True)
class DiagnoseConfig:
    labels: str  # the join's output folder (`northstar feedback join --out`)
    out: str  # report folder
    current: str  # "YYYY-MM-DD:YYYY-MM-DD" (UTC, both days included) or one date
    # "YYYY-MM-DD:YYYY-MM-DD"; "" = the `reference_weeks` weeks before `current`
    reference: str = ""
    reference_weeks: int = 2
    log: str = ""  # the event log; when given, impressions not yet labelled count as pending
    data: str = ""  # dataset folder: users.parquet, items.parquet, interactions.parquet
    versions: str = ""  # .json/.parquet/.csv: model_version, trained_until (unix s)
    served_features: str = ""  # feature log: user_id, ts, <feature columns> the server used
    training_features: str = ""  # same columns as training saw them (default: users table)
    previous_recs: str = ""  # user_id, position, item_id: the previous model's top k
    previous_version: int = -1  # -1: the version that served most of the reference window
    window_s: float = 1800.0  # the join's attribution window (read from its state if there)
    min_segment_impressions: int = 200  # smaller segments are pooled into "other"
    drift_bins: int = 10
    drift_engine: str = "evidently"  # "evidently" or "scipy" (KS / chi-square)
    k: int = 10  # top-K for churn
    plots: bool = True

    def __post_init__(self) -> None:
        if self.drift_engine not in ("evidently", "scipy"):
            raise ValueError(f"drift_engine={self.drift_engine!r}: expected evidently or scipy")
        if self.reference_weeks < 1:
            raise ValueError(f"reference_weeks={self.reference_weeks}: expected >= 1")
        if self.min_segment_impressions < 1:
            raise ValueError("min_segment_impressions: expected >= 1")
        parse_window(self.current)
        if self.reference:
            parse_window(self.reference)

    def windows(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((ref_start, ref_end), (cur_start, cur_end)) in unix seconds, end exclusive."""
        cur = parse_window(self.current)
        if self.reference:
            ref = parse_window(self.reference)
        else:
            ref = (cur[0] - self.reference_weeks * 7 * DAY_S, cur[0])
        if ref[1] > cur[0]:
            raise ValueError(f"reference {self.reference!r} overlaps current {self.current!r}")
        return ref, cur


def parse_window(text: str) -> tuple[float, float]:
    """'2026-11-01:2026-11-07' -> [Nov 1 00:00, Nov 8 00:00) UTC; one date is one day."""
    parts = [p.strip() for p in text.split(":")] if text else []
    if len(parts) not in (1, 2) or not all(parts):
        raise ValueError(f"window {text!r}: expected YYYY-MM-DD or YYYY-MM-DD:YYYY-MM-DD")
    try:
        days = [date.fromisoformat(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"window {text!r}: {exc}") from None
    start, end = days[0], days[-1]
    if end < start:
        raise ValueError(f"window {text!r}: ends before it starts")
    t0 = datetime(start.year, start.month, start.day, tzinfo=timezone.utc).timestamp()
    t1 = datetime(end.year, end.month, end.day, tzinfo=timezone.utc) + timedelta(days=1)
    return t0, t1.timestamp()
