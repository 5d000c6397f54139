"""Label tiers: a weak label at once, a strong one when the watch is in, and which are final.

Feedback on a video arrives in steps. The click comes first and says little on its own
(thumbnails are built to be clicked); the watch report comes later and says whether the
user actually watched. So each attributed impression gets a tier:

- `strong`: a watch of at least `strong_watch_s` seconds, or a like (`like_is_strong`);
- `weak`: attributed, but only a click or a short watch so far;
- none: a negative (nothing attributed).

and a `final` flag: True for labels the join has written (their attribution window has
closed, so nothing can change them), False for impressions still pending, whose tier may
yet rise from weak to strong. A retrain picks what it learns from (`select_positives`):

- `weak`: every attributed impression now, final or not: the fast schedule, hours fresher,
  with the strong ones weighted higher;
- `strong`: final strong labels only: the slow schedule, later but cleaner;
- `final`: every final label, each weighted by its tier.

The tier is derived when labels are read, not stored, so a threshold can be changed
without rebuilding the labels folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from common.files import atomic_path
from feedback.join import read_labels, read_pending

WEAK, STRONG = "weak", "strong"
Use = Literal["weak", "strong", "final"]
USES = ("weak", "strong", "final")


@dataclass(frozen=True)
class TierConfig:
    # 20 minutes: past the trailer-and-bounce range for a feature-length title, short of
    # "finished it"; a service with item durations would use a share of the running time.
    strong_watch_s: float = 1200.0
    like_is_strong: bool = True
    weak_weight: float = 0.5  # a weak positive counts half a strong one in training
    strong_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.strong_watch_s > 0:
            raise ValueError(f"strong_watch_s={self.strong_watch_s}: expected > 0 seconds")
        for name in ("weak_weight", "strong_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected > 0")


def tier_of(labels: pd.DataFrame, cfg: TierConfig = TierConfig()) -> np.ndarray:
    """Per label row: "strong", "weak" or None (a negative)."""
    clicked = labels["clicked"].to_numpy(bool)
    strong = labels["value"].to_numpy(np.float64) >= cfg.strong_watch_s
    if cfg.like_is_strong:
        strong |= labels["liked"].to_numpy(bool)
    out = np.full(len(labels), None, dtype=object)
    out[clicked] = WEAK
    out[clicked & strong] = STRONG
    return out


def read_tiered(
    labels_dir: str | Path, cfg: TierConfig = TierConfig(), *, pending: bool = True
) -> pd.DataFrame:
    """Written labels (final=True) and, with `pending`, the impressions still in their
    window (final=False), each with its `tier`."""
    final = read_labels(labels_dir).drop(columns=["date"], errors="ignore")
    parts = [final.assign(final=True)]
    if pending:
        parts.append(read_pending(labels_dir).assign(final=False))
    parts = [p for p in parts if len(p)]
    if not parts:
        return final.assign(final=pd.Series(dtype=bool), tier=pd.Series(dtype=object))
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return df.assign(tier=tier_of(df, cfg))


def select_positives(
    labels_dir: str | Path, use: Use = "final", cfg: TierConfig = TierConfig()
) -> pd.DataFrame:
    """Positives for a retrain, in the interactions schema (training.schema) plus `weight`,
    `tier` and `final`: one row per (user_id, item_id), the earliest, with its strongest
    tier (a pair clicked twice and watched once is strong)."""
    if use not in USES:
        raise ValueError(f"use={use!r}: expected one of {USES}")
    lab = read_tiered(labels_dir, cfg, pending=use == "weak")
    pos = lab[lab["tier"].notna()]
    if use == "strong":
        pos = pos[pos["tier"] == STRONG]
    pos = pos.sort_values("label_ts", kind="stable")
    any_strong = (pos["tier"] == STRONG).groupby([pos["user_id"], pos["item_id"]]).transform("any")
    strongest = np.where(any_strong.to_numpy(bool), STRONG, WEAK).astype(object)
    pos = pos.assign(tier=strongest).drop_duplicates(["user_id", "item_id"], keep="first")
    weight = np.where(pos["tier"] == STRONG, cfg.strong_weight, cfg.weak_weight)
    return pd.DataFrame(
        {
            "user_id": pos["user_id"].to_numpy(np.int64),
            "item_id": pos["item_id"].to_numpy(np.int64),
            "timestamp": np.floor(pos["label_ts"].to_numpy(np.float64)).astype(np.int64),
            "event_type": pos["event_type"].fillna("click").astype(str).to_numpy(),
            "value": pos["value"].to_numpy(np.float32),
            "weight": weight.astype(np.float32),
            "tier": pos["tier"].to_numpy(object),
            "final": pos["final"].to_numpy(bool),
        }
    )


def export_tiered(
    labels_dir: str | Path, out_path: str | Path, use: Use = "final", cfg: TierConfig = TierConfig()
) -> dict[str, int]:
    """select_positives written atomically to `out_path` (parquet); counts per tier and of
    positives not yet final."""
    df = select_positives(labels_dir, use, cfg)
    with atomic_path(out_path) as tmp:
        df.to_parquet(tmp, index=False)
    return {
        "positives": len(df),
        WEAK: int((df["tier"] == WEAK).sum()),
        STRONG: int((df["tier"] == STRONG).sum()),
        "not_final": int((~df["final"]).sum()),
    }
