"""The demo's last step: one self-contained HTML page of the loop it just ran.

Read back from what the stages wrote under the demo folder (nothing is recomputed from
memory, so the page shows what is on disk):

- the north star (CTR per impression) per model version over time, each time bin with its
  95% Wilson interval, from the joined labels; the routing changes marked;
- every canary look of every act: the CTR difference with the delta-method interval and
  the always-valid confidence sequence, and the decision (canary_scenario.json);
- each act's offline gates with value and threshold (canary_scenario.json);
- the fairness audit's summary (reports/audit/) and the diagnosis of act (c)'s rollback
  (reports/diagnose/report.json);
- the wall time of each demo step.

Figures are base64 PNGs inside the page (common.templating), so it opens with no network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global figure state, no display
from statsmodels.stats.proportion import proportion_confint

from common.figures import png_base64
from common.templating import render
from feedback.join import read_labels

PAGE = "loop.html"
# Time bins of the north-star plot: enough to see each act, few enough that every bin of
# a version has impressions to estimate its CTR.
N_BINS = 40
MIN_BIN_IMPRESSIONS = 30  # a thinner bin's interval is mostly noise: left out of the plot


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def north_star_series(labels: pd.DataFrame, n_bins: int = N_BINS) -> pd.DataFrame:
    """CTR per (time bin, model version) with its 95% Wilson interval: columns t (bin
    middle, seconds since the first impression), version, impressions, clicks, ctr, lo, hi."""
    cols = ["t", "version", "impressions", "clicks", "ctr", "lo", "hi"]
    if labels.empty:
        return pd.DataFrame(columns=cols)
    ts = labels["impression_ts"].to_numpy(np.float64)
    t0 = float(ts.min())
    edges = np.linspace(t0, float(ts.max()) + 1e-6, n_bins + 1)
    b = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, n_bins - 1)
    df = pd.DataFrame(
        {"bin": b, "version": labels["model_version"].to_numpy(), "clicked": labels["clicked"]}
    )
    g = df.groupby(["bin", "version"])["clicked"].agg(["sum", "size"]).reset_index()
    g = g[g["size"] >= MIN_BIN_IMPRESSIONS]
    lo, hi = proportion_confint(g["sum"], g["size"], alpha=0.05, method="wilson")
    mids = (edges[:-1] + edges[1:]) / 2 - t0
    return pd.DataFrame(
        {
            "t": mids[g["bin"].to_numpy()],
            "version": g["version"].astype(int).to_numpy(),
            "impressions": g["size"].to_numpy(),
            "clicks": g["sum"].to_numpy(),
            "ctr": (g["sum"] / g["size"]).to_numpy(),
            "lo": np.asarray(lo),
            "hi": np.asarray(hi),
        },
        columns=cols,
    )


def routing_events(history: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """Canary starts, promotions, rollbacks and offline rejections, seconds since t0."""
    out = []
    for h in history:
        kind, decision = h.get("kind"), h.get("decision")
        if (kind, decision) in (("retrain", "canary"), ("retrain", "rejected")) or kind in (
            "promote",
            "rollback",
        ):
            label = decision if kind == "retrain" else kind
            version = h.get("version") if kind == "retrain" else h.get("canary", h.get("version"))
            out.append({"t": float(h["ts"]) - t0, "what": label, "version": version})
    return out


def north_star_figure(series: pd.DataFrame, events: list[dict[str, Any]]) -> str | None:
    if series.empty:
        return None
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    for v, s in series.groupby("version"):
        s = s.sort_values("t")
        (line,) = ax.plot(s["t"], s["ctr"], marker="o", ms=3, label=f"v{v}")
        ax.fill_between(s["t"], s["lo"], s["hi"], color=line.get_color(), alpha=0.2)
    colours = {"canary": "tab:blue", "promote": "tab:green", "rollback": "tab:red"}
    for e in events:
        ax.axvline(e["t"], color=colours.get(e["what"], "grey"), ls="--", lw=1)
        ax.annotate(
            f"{e['what']} v{e['version']}" if e["version"] is not None else e["what"],
            (e["t"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
        )
    ax.set_xlabel("seconds since the first simulated impression")
    ax.set_ylabel("CTR per impression")
    ax.set_title("North star per model version over time (95% Wilson interval per bin)")
    ax.legend(loc="lower left", fontsize=8)
    return png_base64(fig)


def looks_figure(acts: dict[str, Any]) -> str | None:
    """Per act with a canary: CTR difference (canary - production) per look, the
    delta-method interval and the always-valid confidence sequence."""
    with_looks = {n: a for n, a in acts.items() if a.get("looks")}
    if not with_looks:
        return None
    fig = Figure(figsize=(5 * len(with_looks), 3.6))
    axes = fig.subplots(1, len(with_looks), squeeze=False)
    for ax, (name, act) in zip(axes[0], with_looks.items(), strict=True):
        rows = [lk for lk in act["looks"] if lk.get("ctr_test") and lk.get("sequential")]
        x = np.arange(1, len(rows) + 1)
        diff = [lk["ctr_test"]["diff"] for lk in rows]
        ax.axhline(0.0, color="grey", lw=1)
        if rows:
            ax.errorbar(
                x,
                diff,
                yerr=[
                    [d - lk["ctr_test"]["ci_low"] for d, lk in zip(diff, rows, strict=True)],
                    [lk["ctr_test"]["ci_high"] - d for d, lk in zip(diff, rows, strict=True)],
                ],
                fmt="o",
                capsize=3,
                label="diff, delta-method 95% CI",
            )
            ax.fill_between(
                x,
                [lk["sequential"]["ci_low"] for lk in rows],
                [lk["sequential"]["ci_high"] for lk in rows],
                alpha=0.2,
                label="always-valid confidence sequence",
            )
            ax.legend(fontsize=7)
        ax.set_title(f"act ({name}): v{act['retrain']['version']} -> {act.get('decision', '?')}")
        ax.set_xlabel("look")
        ax.set_ylabel("CTR canary - production")
    return png_base64(fig)


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 10**-digits else f"{v:.{digits}f}"
    return str(v)


def loop_context(
    root: Path,
    steps: dict[str, float] | None = None,
    *,
    state_dir: Path | None = None,
    labels: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Everything the template shows, read from the demo folder `root` (the canary state
    in `state_dir`, default ROOT/canary; `labels`, default read from ROOT/labels)."""
    scenario = _read_json(root / "canary_scenario.json") or {}
    state = _read_json((state_dir or root / "canary") / "state.json") or {}
    if labels is None:
        labels = read_labels(root / "labels") if (root / "labels").exists() else pd.DataFrame()
    t0 = float(labels["impression_ts"].min()) if len(labels) else 0.0
    series = north_star_series(labels)
    events = routing_events(state.get("history", []), t0)
    acts = scenario.get("acts", {})
    audit = _read_json(root / "reports" / "audit" / "audit.json") or {}
    diagnosis = _read_json(root / "reports" / "diagnose" / "report.json")
    per_version = (
        labels.groupby("model_version")["clicked"].agg(["sum", "size"]).reset_index()
        if len(labels)
        else pd.DataFrame(columns=["model_version", "sum", "size"])
    )
    return {
        "root": str(root),
        "north_star_png": north_star_figure(series, events),
        "looks_png": looks_figure(acts),
        "versions": [
            {"version": int(r.model_version), "impressions": int(r.size), "ctr": r.sum / r.size}
            for r in per_version.itertuples()
        ],
        "events": events,
        "acts": acts,
        "traffic": {k: scenario.get(k) for k in ("requests", "failed", "retries", "seconds")},
        "audit_items": (audit.get("audit") or {}).get("items", {}).get("summary", {}),
        "audit_gates": audit.get("gates"),
        "diagnosis": diagnosis,
        "steps": steps or {},
    }


def write_loop_page(
    root: str | Path,
    *,
    steps: dict[str, float] | None = None,
    state_dir: str | Path | None = None,
    labels: pd.DataFrame | None = None,
) -> Path:
    """Render ROOT/loop.html from what the demo wrote under ROOT; returns its path."""
    root = Path(root)
    ctx = loop_context(root, steps, state_dir=Path(state_dir) if state_dir else None, labels=labels)
    html = render(__file__, "loop.html.j2", **ctx, num=_num)
    out = root / PAGE
    out.write_text(html)
    return out
