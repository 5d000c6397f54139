"""Shift-share (Kitagawa) decomposition of a rate's change into mix and within-segment parts.

With segment shares w and rates r in the reference (0) and current (1) windows and the
overall rates R0 = Σ w0·r0, R1 = Σ w1·r1, the drop D = R0 - R1 splits exactly as

    D = Σ_s (w0_s - w1_s) · ((r0_s + r1_s)/2 - R̄)   mix: who/what is in the traffic
      + Σ_s (w0_s + w1_s)/2 · (r0_s - r1_s)           within: the same segment did worse

(R̄ = (R0 + R1)/2 is subtracted from each mix term; the shares' changes sum to 0, so the
total is unchanged, and a segment's mix term is then positive only when traffic moved
away from segments better than average, or towards worse ones.) A segment present in one
window only takes its rate there for both, so its effect is all mix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

OTHER = "other"


def shift_share(
    ref: pd.DataFrame, cur: pd.DataFrame, by: str, *, y: str = "clicked", min_n: int = 1
) -> pd.DataFrame:
    """One row per segment of `by`: n0, n1, w0, w1, r0, r1, mix, within, total (= mix +
    within). Segments with fewer than `min_n` rows in both windows are pooled as OTHER.
    Positive numbers are parts of a drop (R0 - R1)."""
    a = ref.groupby(by, observed=True)[y].agg(n0="size", c0="sum")
    b = cur.groupby(by, observed=True)[y].agg(n1="size", c1="sum")
    t = a.join(b, how="outer").fillna(0.0)
    t.index = t.index.astype(str)
    small = (t["n0"] < min_n) & (t["n1"] < min_n)
    if small.sum() > 1:
        pooled = t[small].sum().to_frame(OTHER).T
        t = pd.concat([t[~small], pooled])
    n0, n1 = t["n0"].sum(), t["n1"].sum()
    w0, w1 = t["n0"] / n0, t["n1"] / n1
    with np.errstate(invalid="ignore", divide="ignore"):
        r0 = t["c0"] / t["n0"]
        r1 = t["c1"] / t["n1"]
    r0, r1 = r0.fillna(r1), r1.fillna(r0)
    big_r0, big_r1 = t["c0"].sum() / n0, t["c1"].sum() / n1
    centre = (big_r0 + big_r1) / 2
    mix = (w0 - w1) * ((r0 + r1) / 2 - centre)
    within = (w0 + w1) / 2 * (r0 - r1)
    out = pd.DataFrame(
        {
            "segment": t.index,
            "n0": t["n0"].astype(np.int64),
            "n1": t["n1"].astype(np.int64),
            "w0": w0,
            "w1": w1,
            "r0": r0,
            "r1": r1,
            "mix": mix,
            "within": within,
        }
    ).reset_index(drop=True)
    out["total"] = out["mix"] + out["within"]
    return out
