"""Write an audit: audit.json (every number), gates.json, summary.md, report.html, items.csv.

The HTML page is self-contained (plots are inline base64 PNGs, no scripts, no network), so
it can be attached to a ticket or an MLflow run and read anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.figures import png_base64
from common.jsonsafe import dumps
from common.templating import render
from fairness.audit import AuditResult
from fairness.exposure import POPULARITY_BUCKETS
from fairness.gates import GateResult
from fairness.groups import GroupTable

AUDIT_FILE = "audit.json"
GATES_FILE = "gates.json"
SUMMARY_FILE = "summary.md"
HTML_FILE = "report.html"
ITEMS_FILE = "items.csv"

OK, BAD, MUTED, ACCENT = "#2e7d32", "#c62828", "#9e9e9e", "#1565c0"
BUCKET_COLORS = {"head": "#c62828", "mid": "#f9a825", "tail": "#1565c0"}


def write_report(
    out: str | Path,
    result: AuditResult,
    gates: GateResult | None = None,
    comparison: dict[str, Any] | None = None,
    online: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write every file of the audit into `out`; returns name -> path. `online` is the
    output of `fairness.online.online_by_group`, when feedback was given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        name: out / f
        for name, f in (
            ("audit", AUDIT_FILE),
            ("gates", GATES_FILE),
            ("summary", SUMMARY_FILE),
            ("html", HTML_FILE),
            ("items", ITEMS_FILE),
        )
    }
    body = {
        "audit": result.to_dict(),
        "gates": gates.to_dict() if gates else None,
        "comparison": comparison,
        "online": online,
    }
    paths["audit"].write_text(dumps(body, indent=1))  # NaN and inf are null
    if gates is not None:
        paths["gates"].write_text(dumps(gates.to_dict(), indent=1))
    else:
        paths.pop("gates")
    if result.item_table is not None:
        result.item_table.to_csv(paths["items"], index=False)
    else:
        paths.pop("items")
    paths["summary"].write_text(summary_markdown(result, gates, comparison))
    paths["html"].write_text(render_html(result, gates, comparison, online))
    return paths


# ---------------------------------------------------------------- formatting helpers


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


def _gate_metric(result: AuditResult, gates: GateResult | None) -> str:
    return result.metric(gates.config.metric if gates else "ndcg")


def _subplots(*args, **kwargs):
    # A bare Figure renders PNGs through the Agg canvas without pyplot: no global backend
    # switch for whoever imports this module, no figure registry to leak into.
    fig = Figure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(*args, **kwargs)


# ---------------------------------------------------------------- plots


def plot_groups(table: GroupTable, *, min_size: int, failing: set[str]) -> str:
    """One panel per metric: horizontal bars per group, bootstrap CI whiskers, the overall
    mean as a dashed line. Red = named by a failed gate, grey = too small to gate."""
    groups, metrics = list(table.groups), list(table.metrics)
    h = 0.9 + 0.32 * len(groups)
    fig, axes = _subplots(1, len(metrics), figsize=(11, h), sharey=True, squeeze=False)
    y = np.arange(len(groups))
    colors = [
        BAD if g in failing else (MUTED if table.size_of(g) < min_size else ACCENT) for g in groups
    ]
    for ax, m in zip(axes[0], metrics, strict=True):
        v = np.array([table.by_group[m][g] for g in groups])
        lo = np.array([table.ci_low[m][g] for g in groups])
        hi = np.array([table.ci_high[m][g] for g in groups])
        err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)]).clip(min=0)
        ax.barh(y, v, color=colors, alpha=0.85, height=0.7)
        ax.errorbar(v, y, xerr=err, fmt="none", ecolor="#333", elinewidth=1, capsize=2.5)
        ax.axvline(table.overall[m], color="#555", ls="--", lw=1)
        ax.set_title(m, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, max(float(np.nanmax(np.r_[hi, v])) * 1.12, 1e-3))
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(y, [f"{g}  (n={table.size_of(g):,})" for g in groups])
    axes[0][0].invert_yaxis()
    legend = "bars: mean · whiskers: 95% bootstrap CI · dashed: overall"
    if min_size:
        legend += f" · red: named by a failed gate · grey: < {min_size} users, not gated"
    fig.suptitle(f"by {table.attribute}   {legend}", fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    return png_base64(fig)


def plot_lorenz(result: AuditResult) -> str:
    lz, s = result.items["lorenz"], result.items["summary"]
    fig, ax = _subplots(figsize=(5.2, 4.4))
    ax.plot([0, 1], [0, 1], color=MUTED, ls="--", lw=1, label="equal exposure")
    ax.plot(
        lz["x"],
        lz["y"],
        color=ACCENT,
        lw=2,
        label=f"{result.label}  (Gini {s['exposure_gini']:.3f})",
    )
    ax.fill_between(lz["x"], lz["y"], lz["x"], color=ACCENT, alpha=0.08)
    ax.set_xlabel("share of catalogue items (least exposed first)")
    ax.set_ylabel("share of exposure")
    ax.set_title("Exposure Lorenz curve", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_base64(fig)


def plot_popularity_scatter(result: AuditResult) -> str | None:
    t = result.item_table
    if t is None or len(t) == 0:
        return None
    fig, ax = _subplots(figsize=(5.6, 4.4))
    for b in POPULARITY_BUCKETS:
        sel = t["bucket"] == b
        ax.scatter(
            t.loc[sel, "popularity"],
            t.loc[sel, "exposure"],
            s=7,
            alpha=0.55,
            color=BUCKET_COLORS[b],
            label=f"{b} ({int(sel.sum()):,} items)",
            linewidths=0,
        )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("popularity (interactions in history)")
    ax.set_ylabel("exposure (sum of 1/log2(1+rank))")
    ax.set_title("Popularity vs exposure, per item", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", markerscale=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_base64(fig)


def plot_item_shares(result: AuditResult) -> str:
    """Exposure share beside relevance share for each item group (provider, popularity)."""
    groups = result.items["groups"]
    fig, axes = _subplots(1, len(groups), figsize=(11, 3.4), squeeze=False)
    for ax, (name, g) in zip(axes[0], groups.items(), strict=True):
        names = list(g["groups"])
        x = np.arange(len(names))
        e = [g["groups"][n]["exposure_share"] for n in names]
        r = [g["groups"][n]["relevance_share"] for n in names]
        ax.bar(x - 0.2, e, width=0.4, color=ACCENT, label="exposure share")
        ax.bar(x + 0.2, r, width=0.4, color="#8d6e63", label="relevance share")
        ax.set_xticks(x, names, fontsize=9)
        dtr = g.get("dtr_min")
        sub = (
            f"worst DTR {dtr:.2f} ({' vs '.join(g['dtr_min_pair'])})"
            if dtr is not None and math.isfinite(dtr)
            else ""
        )
        ax.set_title(f"by {name}: {sub}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return png_base64(fig)


def plot_deltas(comparison: dict[str, Any], metric: str, *, min_size: int = 0) -> str | None:
    """Candidate − baseline per group, one panel per single attribute (intersections are in
    audit.json: at 15+ groups each they drown the picture)."""
    attrs = [a for a, ms in comparison["users"].items() if metric in ms and "×" not in a]
    if not attrs:
        return None
    n_rows = max(len(comparison["users"][a][metric]) for a in attrs)
    fig, axes = _subplots(1, len(attrs), figsize=(11, 0.8 + 0.3 * n_rows), squeeze=False)
    span = max(abs(d["delta"]) for a in attrs for d in comparison["users"][a][metric].values())
    span = max(span, 1e-3)  # identical versions: keep a readable axis around 0
    for ax, a in zip(axes[0], attrs, strict=True):
        rows = list(comparison["users"][a][metric].items())
        y = np.arange(len(rows))
        deltas = np.array([d["delta"] for _, d in rows], dtype=float)
        colors = [MUTED if d["n"] < min_size else (OK if d["delta"] >= 0 else BAD) for _, d in rows]
        ax.barh(y, deltas, color=colors, alpha=0.85, height=0.65)
        ax.set_yticks(y, [g for g, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="#333", lw=1)
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
        ax.set_title(a, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"{metric}: {comparison['candidate']} − {comparison['baseline']}  "
        f"(grey: group too small to gate)",
        fontsize=10,
        x=0.01,
        ha="left",
    )
    fig.tight_layout()
    return png_base64(fig)


# ---------------------------------------------------------------- HTML
# The page is templates/report.html.j2; the functions below only shape the numbers
# (formatted strings, CSS classes) it lays out. The template escapes every value.


def render_html(
    result: AuditResult,
    gates: GateResult | None = None,
    comparison: dict[str, Any] | None = None,
    online: dict[str, Any] | None = None,
) -> str:
    metric = _gate_metric(result, gates)
    min_size = gates.config.min_group_size if gates else 0
    failing: dict[str, set[str]] = {}
    for c in gates.failures if gates else []:
        failing.setdefault(c.scope, set()).update(c.groups)
    meta = result.meta
    src = meta.get("source", {})
    return render(
        __file__,
        "report.html.j2",
        label=result.label,
        k=meta["k"],
        n_users=f"{meta['n_users']:,}",
        n_items=f"{meta['n_items']:,}",
        n_boot=meta["n_boot"],
        split=str(src.get("split", "custom lists")),
        created=meta.get("created", ""),
        gates=_gates_view(gates),
        kpis=_kpis(result, gates),
        comparison=_comparison_view(comparison, metric, min_size) if comparison else None,
        skipped=list(meta.get("skipped", {}).items()),
        groupings=[
            _grouping_view(name, table, min_size=min_size, failing=failing.get(name, set()))
            for name, table in result.users.items()
        ],
        lorenz=plot_lorenz(result),
        scatter=plot_popularity_scatter(result),
        shares=plot_item_shares(result),
        item_tables=_item_tables(result),
        online=_online_view(online) if online else None,
        source=json.dumps(src) if src else "",
    )


def _gates_view(gates: GateResult | None) -> dict[str, Any] | None:
    if gates is None:
        return None
    checks = []
    for c in gates.checks:
        cls, text = (
            ("skip", "skipped") if c.skipped else (("ok", "pass") if c.passed else ("no", "FAIL"))
        )
        checks.append(
            {
                "gate": c.gate,
                "scope": c.scope,
                "value": _fmt(c.value),
                "threshold": _fmt(c.threshold),
                "cls": cls,
                "result": text,
                "reason": c.reason,
            }
        )
    return {
        "passed": gates.passed,
        "n_checked": sum(1 for c in gates.checks if not c.skipped),
        "reasons": list(gates.reasons),
        "checks": checks,
        "notes": list(gates.notes),
    }


def _kpis(result: AuditResult, gates: GateResult | None) -> list[tuple[str, str]]:
    """(name, value) of the headline numbers, in display order."""
    s = result.items["summary"]
    metric = _gate_metric(result, gates)
    first = next(iter(result.users.values()), None)
    cells = [
        ("users audited", _fmt(result.meta["n_users"])),
        ("items", _fmt(result.meta["n_items"])),
    ]
    if first is not None:
        cells.append((f"{metric} overall", _fmt(first.overall[metric])))
    for attr in gates.config.attributes if gates else list(result.users)[:2]:
        if attr in result.users:
            cells.append((f"{metric} gap by {attr}", _fmt(result.users[attr].difference[metric])))
    cells += [
        ("exposure Gini", _fmt(s["exposure_gini"], 3)),
        (f"coverage@{s['k']}", f"{s['coverage']:.1%}"),
        ("ARP", _fmt(s["arp"], 1)),
        ("APLT", f"{s['aplt']:.1%}"),
    ]
    return cells


def _grouping_view(
    name: str, table: GroupTable, *, min_size: int, failing: set[str]
) -> dict[str, Any]:
    ms = list(table.metrics)
    rows = [
        {
            "cls": "bad" if g in failing else ("small" if table.size_of(g) < min_size else ""),
            "group": g,
            "users": f"{table.size_of(g):,}",
            "cells": [
                {
                    "mean": _fmt(table.by_group[m][g]),
                    "low": _fmt(table.ci_low[m][g], 3),
                    "high": _fmt(table.ci_high[m][g], 3),
                }
                for m in ms
            ],
        }
        for g in table.groups
    ]
    stats = [
        {"label": label, "cells": [_fmt(stat[m]) for m in ms]}
        for label, stat in (
            ("overall", table.overall),
            ("group min", table.group_min),
            ("difference (max − min)", table.difference),
            ("ratio (min / max)", table.ratio),
        )
    ]
    return {
        "name": name,
        "attribute": table.attribute,
        "plot": plot_groups(table, min_size=min_size, failing=failing),
        "metrics": ms,
        "rows": rows,
        "stats": stats,
    }


def _item_tables(result: AuditResult) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "rows": [
                {
                    "group": n,
                    "n_items": f"{v['items']:,}",
                    "exposure_share": f"{v['exposure_share']:.1%}",
                    "relevance_share": f"{v['relevance_share']:.1%}",
                    "ratio": _fmt(v["exposure_per_relevance"], 2),
                }
                for n, v in g["groups"].items()
            ],
        }
        for name, g in result.items["groups"].items()
    ]


def _comparison_view(comparison: dict[str, Any], metric: str, min_size: int) -> dict[str, Any]:
    return {
        "baseline": str(comparison["baseline"]),
        "plot": plot_deltas(comparison, metric, min_size=min_size),
        "rows": [
            {
                "metric": k,
                "baseline": _fmt(v["baseline"]),
                "candidate": _fmt(v["candidate"]),
                "delta": f"{v['delta']:+.4f}",
            }
            for k, v in comparison["items"].items()
            if k not in ("k", "n_items")
        ],
    }


def _online_view(online: dict[str, Any]) -> dict[str, Any]:
    """Per attribute, a row per group and a CTR / value column pair per model version."""
    versions = sorted(online["overall"])
    attributes = []
    for attr, d in online["attributes"].items():
        groups = sorted({g for by in d["by_group"].values() for g in by})
        rows = []
        for g in groups:
            cells = []
            for v in versions:
                x = d["by_group"].get(v, {}).get(g)
                cells.append(
                    {
                        "ctr": f"{x['ctr']:.2%}",
                        "n": f"{x['impressions']:,}",
                        "value": _fmt(x["value"], 2),
                    }
                    if x
                    else None
                )
            rows.append({"group": g, "cells": cells})
        stats = [
            {
                "label": stat,
                "cells": [
                    {
                        "ctr": _fmt(d[stat].get(v, {}).get("ctr")),
                        "value": _fmt(d[stat].get(v, {}).get("value"), 3),
                    }
                    for v in versions
                ],
            }
            for stat in ("difference", "ratio")
        ]
        attributes.append({"name": attr, "rows": rows, "stats": stats})
    return {"versions": versions, "attributes": attributes}


# ---------------------------------------------------------------- Markdown


def summary_markdown(
    result: AuditResult, gates: GateResult | None = None, comparison: dict[str, Any] | None = None
) -> str:
    metric = _gate_metric(result, gates)
    s = result.items["summary"]
    lines = [f"# Fairness audit: {result.label}", ""]
    if gates is None:
        lines.append("Gates: not checked.")
    elif gates.passed:
        lines.append("**PASS**: every gate check passed.")
    else:
        lines.append("**FAIL**")
        lines += [f"- {r}" for r in gates.reasons]
    lines += [
        "",
        f"{result.meta['n_users']:,} users, {result.meta['n_items']:,} items, "
        f"K = {result.meta['k']}.",
        "",
        f"| grouping | {metric} worst group | best group | difference | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, t in result.users.items():
        v = t.by_group[metric]
        worst, best = min(v, key=v.get), max(v, key=v.get)
        lines.append(
            f"| {name} | {worst} {v[worst]:.4f} (n={t.size_of(worst):,}) | "
            f"{best} {v[best]:.4f} (n={t.size_of(best):,}) | {_fmt(t.difference[metric])} | "
            f"{_fmt(t.ratio[metric], 3)} |"
        )
    pop = result.items["groups"]["popularity"]["groups"]
    lines += [
        "",
        f"Items: exposure Gini {s['exposure_gini']:.3f}, coverage@{s['k']} "
        f"{s['coverage']:.1%}, ARP {s['arp']:.1f}, APLT {s['aplt']:.1%}; head items get "
        f"{pop['head']['exposure_share']:.1%} of exposure for "
        f"{pop['head']['relevance_share']:.1%} of relevance.",
    ]
    if comparison:
        lines += ["", f"Versus {comparison['baseline']} ({metric}, candidate − baseline):"]
        for attr, ms in comparison["users"].items():
            if metric in ms:
                worst = min(ms[metric].items(), key=lambda kv: kv[1]["delta"])
                lines.append(f"- {attr}: worst change {worst[0]} {worst[1]['delta']:+.4f}")
    lines.append("")
    return "\n".join(lines)
