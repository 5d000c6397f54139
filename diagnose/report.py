"""Write a diagnosis: report.json (every number), report.md, report.html (inline PNG plots)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from common.figures import png_base64
from common.files import atomic_write_text
from common.jsonsafe import dumps
from common.templating import render
from diagnose.data import CUR, REF, Inputs

JSON_FILE, MD_FILE, HTML_FILE = "report.json", "report.md", "report.html"
REF_COLOR, CUR_COLOR, BAD, OK = "#1565c0", "#c62828", "#c62828", "#2e7d32"


def write_report(out: str | Path, result, inp: Inputs | None = None) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = result.to_dict()
    paths = {"json": out / JSON_FILE, "md": out / MD_FILE, "html": out / HTML_FILE}
    atomic_write_text(paths["json"], dumps(body, indent=1) + "\n")
    atomic_write_text(paths["md"], markdown(body))
    plots = make_plots(result, inp) if (inp is not None and inp.cfg.plots) else {}
    atomic_write_text(
        paths["html"], render(__file__, "report.html.j2", r=body, plots=plots, fmt=_fmt, pct=_pct)
    )
    return paths


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.0%}"


def markdown(body: dict) -> str:
    s = body["summary"]
    lines = [
        "# North-star diagnosis",
        "",
        f"**{s['headline']}**",
        "",
        f"- reference CTR {_fmt(s['reference']['ctr'])} over {s['reference']['impressions']:,} "
        "impressions",
        f"- current CTR {_fmt(s['current']['ctr'])} over {s['current']['impressions']:,} "
        "impressions",
        f"- drop {_fmt(s['drop'])} ({_pct(s['relative_drop'])} of the reference)",
        _drop_test_line(s),
        "",
        "## Ranked causes",
        "",
        "| # | cause | explains (CTR) | share of drop |",
        "| --- | --- | --- | --- |",
    ]
    for i, f in enumerate(body["ranked_causes"], 1):
        lines.append(
            f"| {i} | {f['title']} (`{f['cause']}`) | {_fmt(f['explained'])} | "
            f"{_pct(f['share_of_drop'])} |"
        )
    lines += ["", "Shares come from separate decompositions: they rank, they do not add up.", ""]
    lines += ["## Plan", ""]
    if not body["plan"]:
        lines.append("No cause explains enough of the drop to act on.")
    for p in body["plan"]:
        lines.append(
            f"- **{p['cause']}**: {p['action']} Expected to recover "
            f"{_fmt(p['expected_recovery_ctr'])} CTR ({_pct(p['expected_recovery_share'])} of "
            "the drop)."
        )
    lines += [
        "",
        "## Input drift",
        "",
        "| side | feature | PSI | test | p |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in body["input_drift"]["features"]:
        lines.append(
            f"| {r['side']} | {r['feature']} | {_fmt(r['psi'], 3)} | {r['test']} | "
            f"{_fmt(r['p_value'], 4)} |"
        )
    p = body["prediction_drift"]
    lines += [
        "",
        "## Prediction drift",
        "",
        f"- score PSI {_fmt(p['score_psi'], 3)}, KS p {_fmt(p['score_ks_p'])}",
        f"- top-{body['config']['k']} churn {_fmt(p['topk_churn'], 3)} over {p['churn_users']} "
        "users seen in both windows",
        "",
    ]
    return "\n".join(lines)


def _drop_test_line(s: dict) -> str:
    t = s.get("drop_test")
    if not t:
        return ""
    lo, hi = t["ci"]
    verdict = "significant" if t["significant"] else "not significant"
    return (
        f"- drop test (clustered by user, one-sided α = {t['alpha']}): {verdict}, "
        f"p = {t['p_value']:.3g}, interval {_fmt(lo)}..{_fmt(hi)}"
    )


def make_plots(result, inp: Inputs) -> dict[str, str]:
    plots: dict[str, str] = {}
    # shares of the drop per cause
    fig = Figure(figsize=(6.5, 2.8))
    ax = fig.subplots()
    names = [f.cause for f in result.findings][::-1]
    vals = [
        0.0 if not math.isfinite(f.share_of_drop) else f.share_of_drop for f in result.findings
    ][::-1]
    ax.barh(names, vals, color=[BAD if v > 0 else OK for v in vals])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("share of the drop explained")
    plots["causes"] = png_base64(fig)
    # CTR by segment for each dimension with a table
    for dim, rows in result.where.items():
        fig = Figure(figsize=(6.5, 2.6))
        ax = fig.subplots()
        seg = [r["segment"] for r in rows]
        x = np.arange(len(seg))
        ax.bar(x - 0.2, [r["r0"] for r in rows], 0.4, color=REF_COLOR, label=REF)
        ax.bar(x + 0.2, [r["r1"] for r in rows], 0.4, color=CUR_COLOR, label=CUR)
        ax.set_xticks(x, seg, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("CTR")
        ax.set_title(dim, fontsize=9)
        ax.legend(fontsize=7)
        plots[f"where:{dim}"] = png_base64(fig)
    imp = inp.imp
    ref, cur = imp[imp["window"] == REF], imp[imp["window"] == CUR]
    # served score distributions
    fig = Figure(figsize=(6.5, 2.6))
    ax = fig.subplots()
    for f, c, n in ((ref, REF_COLOR, REF), (cur, CUR_COLOR, CUR)):
        s = f.loc[~f["explored"], "score"]
        if len(s):
            ax.hist(s, bins=40, density=True, histtype="step", color=c, label=n)
    ax.set_xlabel("served score (greedy slots)")
    ax.legend(fontsize=7)
    plots["scores"] = png_base64(fig)
    # attribution delay CDF, with the late interactions
    fig = Figure(figsize=(6.5, 2.6))
    ax = fig.subplots()
    for f, c, n in ((ref, REF_COLOR, REF), (cur, CUR_COLOR, CUR)):
        on = f[f["clicked"]]
        d = (on["label_ts"] - on["impression_ts"]).to_numpy()
        late = inp.late.loc[inp.late["event_id"].isin(f["event_id"]), "delay_s"].to_numpy()
        d = np.sort(np.r_[d, late])
        if len(d):
            ax.plot(np.maximum(d, 1), np.arange(1, len(d) + 1) / len(d), color=c, label=n)
    ax.axvline(inp.window_s, color="black", ls="--", lw=0.8, label="attribution window")
    ax.set_xscale("log")
    ax.set_xlabel("click delay after the impression (s)")
    ax.set_ylabel("share of clicks")
    ax.legend(fontsize=7)
    plots["delays"] = png_base64(fig)
    # PSI per feature
    feats = result.drift["features"]
    if feats:
        fig = Figure(figsize=(6.5, 2.6))
        ax = fig.subplots()
        ax.barh(
            [f"{r['side']}:{r['feature']}" for r in feats],
            [r["psi"] for r in feats],
            color=[BAD if r["drifted"] else REF_COLOR for r in feats],
        )
        ax.axvline(0.1, color="black", ls="--", lw=0.8)
        ax.set_xlabel("PSI (reference → current)")
        ax.tick_params(axis="y", labelsize=7)
        plots["psi"] = png_base64(fig)
    return plots
