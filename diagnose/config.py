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
        # Messages name the flag (`--reference-weeks`), which is also the field's name.
        if self.drift_engine not in ("evidently", "scipy"):
            raise ValueError(f"--drift-engine {self.drift_engine}: expected evidently or scipy")
        if self.reference_weeks < 1:
            raise ValueError(f"--reference-weeks {self.reference_weeks}: expected >= 1")
        if self.min_segment_impressions < 1:
            raise ValueError(
                f"min_segment_impressions={self.min_segment_impressions}: expected >= 1"
            )
        self.windows()

    def windows(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((ref_start, ref_end), (cur_start, cur_end)) in unix seconds, end exclusive."""
        cur = flag_window("current", self.current)
        if self.reference:
            ref = flag_window("reference", self.reference)
        else:
            ref = (cur[0] - self.reference_weeks * 7 * DAY_S, cur[0])
        if ref[1] > cur[0]:
            raise ValueError(
                f"--reference {self.reference}: ends {day(ref[1] - DAY_S)}, after --current "
                f"{self.current} starts ({day(cur[0])}); expected a reference window that "
                "ends before the current one"
            )
        return ref, cur

    def reference_flag(self) -> str:
        """How the reference window was given: `--reference A:B` or `--reference-weeks N`."""
        if self.reference:
            return f"--reference {self.reference}"
        (r0, r1), _ = self.windows()
        return f"--reference-weeks {self.reference_weeks} ({day(r0)}:{day(r1 - DAY_S)})"


WINDOW_FORMAT = (
    "YYYY-MM-DD or YYYY-MM-DD:YYYY-MM-DD (UTC dates, both days included) or START/END "
    "(ISO 8601 times)"
)


def day(ts: float) -> str:
    """Unix seconds -> its UTC date, YYYY-MM-DD."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).date().isoformat()


def flag_window(name: str, text: str) -> tuple[float, float]:
    """`parse_window`, with an error that names the flag (`--current`) and the format."""
    try:
        return parse_window(text)
    except ValueError as exc:
        detail = str(exc).removeprefix(f"window {text!r}: ")
        why = "" if detail.startswith("expected") else f"; {detail}"
        raise ValueError(
            f"--{name.replace('_', '-')} {text or '(empty)'}: expected {WINDOW_FORMAT}{why}"
        ) from None


def parse_window(text: str) -> tuple[float, float]:
    """'2026-11-01:2026-11-07' -> [Nov 1 00:00, Nov 8 00:00) UTC; one date is one day.
    An ISO 8601 interval of times, '2026-11-30T01:00:00Z/2026-11-30T01:20:00Z', is taken
    as it is (end excluded): a canary's trial lasts minutes, not days."""
    if "/" in text:
        return _parse_interval(text)
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


def _parse_interval(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split("/")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"window {text!r}: expected START/END (ISO 8601 times)")
    out = []
    for p in parts:
        try:
            t = datetime.fromisoformat(p.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"window {text!r}: {exc}") from None
        out.append((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp())
    if out[1] <= out[0]:
        raise ValueError(f"window {text!r}: ends before it starts")
    return out[0], out[1]


def iso(ts: float) -> str:
    """Unix seconds -> an ISO 8601 UTC time, as a START/END window takes it."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")
