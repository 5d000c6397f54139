"""Recent popularity: the window it is counted over, and the ranking-time popularity prior.

A two-tower model trained with logQ correction has popularity taken out of its scores; on a
time split, recent popularity is much of the answer for users who arrived recently. The prior
adds it back at ranking time, inside the served graph, as a per-item bias

    score(u, i) = <user(u), item(i)> + beta * log(1 + recent_count(i))

`beta` is chosen on validation (`training.train`); beta = 0 is exactly the plain graph.
The same `RecentWindow` defines the RecentPop baseline, so "recent" means one thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DAY_S = 86_400


@dataclass(frozen=True)
class RecentWindow:
    """The last `days` before the newest known interaction, or the newest `share` of the known
    interactions (by time). Exactly one is set."""

    days: float | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        if (self.days is None) == (self.share is None):
            raise ValueError("RecentWindow: set exactly one of days and share")
        if self.days is not None and not self.days > 0:
            raise ValueError(f"RecentWindow.days={self.days}: expected > 0")
        if self.share is not None and not 0 < self.share <= 1:
            raise ValueError(f"RecentWindow.share={self.share}: expected in (0, 1]")

    @classmethod
    def parse(cls, text: str) -> RecentWindow:
        """ "7d" = the last 7 days; "10%" or "0.1" = the newest 10% of interactions."""
        t = str(text).strip().lower()
        try:
            if t.endswith("d"):
                return cls(days=float(t[:-1]))
            if t.endswith("%"):
                return cls(share=float(t[:-1]) / 100.0)
            return cls(share=float(t))
        except ValueError as exc:
            raise ValueError(
                f"recent window {text!r}: expected days ('7d') or a share ('10%', '0.1'); {exc}"
            ) from None

    @property
    def label(self) -> str:
        if self.days is not None:
            return f"{self.days:g}d"
        return f"{self.share * 100:g}pct"

    def mask(self, timestamps: np.ndarray) -> np.ndarray:
        """(n,) bool: which of these interactions (timestamps in seconds) fall in the window."""
        ts = np.asarray(timestamps, dtype=np.int64)
        if ts.size == 0:
            return np.zeros(0, dtype=bool)
        if self.days is not None:
            return ts > ts.max() - self.days * DAY_S
        ordered = np.sort(ts)
        # The first timestamp of the newest `share`; rows tied with it are in as well.
        cut = ordered[min(int(np.floor(ts.size * (1.0 - self.share))), ts.size - 1)]
        return ts >= cut

    def counts(self, items: np.ndarray, timestamps: np.ndarray, n_items: int) -> np.ndarray:
        """(n_items,) interactions per dense item index inside the window (items >= 0)."""
        items = np.asarray(items, dtype=np.int64)
        keep = self.mask(timestamps) & (items >= 0)
        return np.bincount(items[keep], minlength=n_items).astype(np.float64)


@dataclass(frozen=True)
class PopularityPrior:
    """beta * log(1 + count in `window`) added to every item's score at ranking time."""

    beta: float
    window: str = "10%"  # RecentWindow.parse syntax

    def __post_init__(self) -> None:
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"PopularityPrior.beta={self.beta}: expected a finite value >= 0")
        RecentWindow.parse(self.window)

    def bias(self, items: np.ndarray, timestamps: np.ndarray, n_items: int) -> np.ndarray:
        """(n_items,) float32 bias from the known interactions (dense items, seconds)."""
        counts = RecentWindow.parse(self.window).counts(items, timestamps, n_items)
        return (self.beta * np.log1p(counts)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
