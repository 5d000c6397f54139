"""Write an audit: audit.json (every number), gates.json, summary.md, report.html, items.csv.

The HTML page is self-contained (plots are inline base64 PNGs, no scripts, no network), so
it can be attached to a ticket or an MLflow run and read anywhere.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.figures import img_tag, png_base64
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


def jsonable(x: Any) -> Any:
    """Plain JSON: NaN and inf become null, numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


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
    paths["audit"].write_text(json.dumps(jsonable(body), indent=1))
    if gates is not None:
        paths["gates"].write_text(json.dumps(jsonable(gates.to_dict()), indent=1))
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

CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;color:#222;
 max-width:1180px;margin:24px auto;padding:0 20px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:30px 0 8px;border-bottom:1px solid
 #ddd;padding-bottom:4px} h3{font-size:15px;margin:18px 0 6px}
.sub{color:#666;margin-bottom:14px}
.verdict{padding:12px 16px;border-radius:6px;font-size:16px;margin:12px 0}
.pass{background:#e8f5e9;border-left:6px solid #2e7d32}
.fail{background:#ffebee;border-left:6px solid #c62828}
.none{background:#f5f5f5;border-left:6px solid #9e9e9e}
.verdict ul{margin:6px 0 0;padding-left:20px;font-size:14px}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.kpi{border:1px solid #e0e0e0;border-radius:6px;padding:8px 12px;min-width:120px}
.kpi b{display:block;font-size:19px} .kpi span{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:right}
th{background:#fafafa} td:first-child,th:first-child{text-align:left}
tr.bad td{color:#c62828;font-weight:600} tr.small td{color:#9e9e9e}
td.ok{color:#2e7d32;font-weight:600} td.no{color:#c62828;font-weight:600}
td.skip{color:#9e9e9e} td.reason,th.reason{text-align:left;max-width:640px}
img{max-width:100%;display:block;margin:6px 0}
.row{display:flex;gap:16px;flex-wrap:wrap} .row img{max-width:560px}
.note{color:#666;font-size:12.5px} code{background:#f4f4f4;padding:0 3px}
details{margin:8px 0} summary{cursor:pointer;color:#1565c0}
"""


def _verdict_html(gates: GateResult | None) -> str:
    if gates is None:
        return '<div class="verdict none">No gates were checked.</div>'
    if gates.passed:
        n = sum(1 for c in gates.checks if not c.skipped)
        return f'<div class="verdict pass"><b>PASS</b>: all {n} gate checks passed.</div>'
    items = "".join(f"<li>{html.escape(r)}</li>" for r in gates.reasons)
    return (
        f'<div class="verdict fail"><b>FAIL</b>: {len(gates.reasons)} gate check(s) '
        f"failed.<ul>{items}</ul></div>"
    )


def _kpis(result: AuditResult, gates: GateResult | None) -> str:
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
    return (
        '<div class="kpis">'
        + "".join(
            f'<div class="kpi"><b>{v}</b><span>{html.escape(k)}</span></div>' for k, v in cells
        )
        + "</div>"
    )


def _group_table_html(table: GroupTable, *, min_size: int, failing: set[str]) -> str:
    ms = list(table.metrics)
    head = "".join(f"<th>{html.escape(m)} [95% CI]</th>" for m in ms)
    rows = []
    for g in table.groups:
        cls = "bad" if g in failing else ("small" if table.size_of(g) < min_size else "")
        cells = "".join(
            f"<td>{_fmt(table.by_group[m][g])} <span class='note'>[{_fmt(table.ci_low[m][g], 3)}"
            f", {_fmt(table.ci_high[m][g], 3)}]</span></td>"
            for m in ms
        )
        rows.append(
            f'<tr class="{cls}"><td>{html.escape(g)}</td><td>{table.size_of(g):,}</td>{cells}</tr>'
        )
    for label, stat in (
        ("overall", table.overall),
        ("group min", table.group_min),
        ("difference (max − min)", table.difference),
        ("ratio (min / max)", table.ratio),
    ):
        cells = "".join(f"<td>{_fmt(stat[m])}</td>" for m in ms)
        rows.append(f"<tr><td><i>{label}</i></td><td></td>{cells}</tr>")
    return (
        f"<table><tr><th>{html.escape(table.attribute)}</th><th>users</th>{head}</tr>"
        + "".join(rows)
        + "</table>"
    )


def _item_tables_html(result: AuditResult) -> str:
    parts = []
    for name, g in result.items["groups"].items():
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{v['items']:,}</td>"
            f"<td>{v['exposure_share']:.1%}</td><td>{v['relevance_share']:.1%}</td>"
            f"<td>{_fmt(v['exposure_per_relevance'], 2)}</td></tr>"
            for n, v in g["groups"].items()
        )
        parts.append(
            f"<table><tr><th>{html.escape(name)}</th><th>items</th><th>exposure share</th>"
            f"<th>relevance share</th><th>exposure / relevance</th></tr>{rows}</table>"
        )
    return '<div class="row">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


def _gates_html(gates: GateResult) -> str:
    rows = []
    for c in gates.checks:
        status = (
            ("skip", "skipped") if c.skipped else (("ok", "pass") if c.passed else ("no", "FAIL"))
        )
        rows.append(
            f"<tr><td>{html.escape(c.gate)}</td><td>{html.escape(c.scope)}</td>"
            f"<td>{_fmt(c.value)}</td><td>{_fmt(c.threshold)}</td>"
            f'<td class="{status[0]}">{status[1]}</td>'
            f'<td class="reason">{html.escape(c.reason)}</td></tr>'
        )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in gates.notes)
    return (
        "<table><tr><th>gate</th><th>scope</th><th>value</th><th>threshold</th>"
        "<th>result</th><th class='reason'>reason</th></tr>"
        + "".join(rows)
        + "</table>"
        + (f'<ul class="note">{notes}</ul>' if notes else "")
    )


def _comparison_html(comparison: dict[str, Any], metric: str, min_size: int) -> str:
    parts = []
    b64 = plot_deltas(comparison, metric, min_size=min_size)
    if b64:
        parts.append(img_tag(b64, "per-group deltas"))
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v['baseline'])}</td>"
        f"<td>{_fmt(v['candidate'])}</td><td>{v['delta']:+.4f}</td></tr>"
        for k, v in comparison["items"].items()
        if k not in ("k", "n_items")
    )
    parts.append(
        "<h3>Item side</h3><table><tr><th>metric</th><th>baseline</th>"
        f"<th>candidate</th><th>delta</th></tr>{rows}</table>"
    )
    return "".join(parts)


METHOD_NOTES = """
<ul class="note">
<li><b>Users audited</b>: users with at least one held-out interaction in the audited period.
Per-user Recall@K, NDCG@K (binary gains) and HitRate@K over the full catalogue, the user's
history excluded.</li>
<li><b>Group numbers</b>: Fairlearn <code>MetricFrame</code> (by_group, difference =
max − min, ratio = min / max, group_min). 95% intervals: percentile bootstrap of the group
means, resampling all users with replacement (as <code>MetricFrame(n_boot=…)</code> does),
computed with numpy.</li>
<li><b>Exposure</b> of an item = Σ over users of 1 / log2(1 + rank) for ranks 1..K.
<b>Relevance share</b> = share of held-out interactions on the group's items.
<b>DTR</b> (Singh &amp; Joachims 2018) = (exposure / relevance of group a) ÷ (same of group
b); 1 = exposure in proportion to relevance; the worst pair is shown.</li>
<li><b>Popularity buckets</b>: items sorted by history interactions; head = the most popular
items that hold the first 20% of interactions, tail = the items holding the last 20%
(never-seen items included), mid = the rest. <b>ARP</b> = mean over users of the mean
history count of their K items; <b>APLT</b> = mean share of non-head items in a list.</li>
</ul>
"""


def _online_html(online: dict[str, Any]) -> str:
    """Per attribute, a row per group and a CTR / value column pair per model version."""
    versions = sorted(online["overall"])
    head = "".join(
        f"<th>v{html.escape(v)} CTR</th><th>v{html.escape(v)} value</th>" for v in versions
    )
    parts = []
    for attr, d in online["attributes"].items():
        groups = sorted({g for by in d["by_group"].values() for g in by})
        rows = []
        for g in groups:
            cells = ""
            for v in versions:
                x = d["by_group"].get(v, {}).get(g)
                cells += (
                    f"<td>{x['ctr']:.2%} <span class='note'>({x['impressions']:,})</span>"
                    f"</td><td>{_fmt(x['value'], 2)}</td>"
                    if x
                    else "<td>–</td><td>–</td>"
                )
            rows.append(f"<tr><td>{html.escape(g)}</td>{cells}</tr>")
        for stat in ("difference", "ratio"):
            cells = "".join(
                f"<td>{_fmt(d[stat].get(v, {}).get('ctr'))}</td>"
                f"<td>{_fmt(d[stat].get(v, {}).get('value'), 3)}</td>"
                for v in versions
            )
            rows.append(f"<tr><td><i>{stat}</i></td>{cells}</tr>")
        parts.append(
            f"<h3>{html.escape(attr)}</h3><table><tr><th>group</th>{head}</tr>"
            + "".join(rows)
            + "</table>"
        )
    return (
        '<p class="note">Per impression, from the labelled feedback log; '
        "(n) = impressions.</p>" + "".join(parts)
    )


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
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Fairness audit: {html.escape(result.label)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Fairness audit: {html.escape(result.label)}</h1>",
        f'<div class="sub">K = {meta["k"]} · {meta["n_users"]:,} users · '
        f"{meta['n_items']:,} items · {meta['n_boot']} bootstrap resamples · "
        f"{html.escape(str(src.get('split', 'custom lists')))} period · "
        f"{html.escape(meta.get('created', ''))}</div>",
        _verdict_html(gates),
        _kpis(result, gates),
    ]
    if comparison:
        parts += [
            f"<h2>Versus baseline {html.escape(str(comparison['baseline']))}</h2>",
            _comparison_html(comparison, metric, min_size),
        ]
    parts.append("<h2>Users: recommendation quality by group</h2>")
    if meta.get("skipped"):
        parts.append(
            '<p class="note">Not audited: '
            + "; ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in meta["skipped"].items())
            + "</p>"
        )
    for name, table in result.users.items():
        f = failing.get(name, set())
        parts += [
            f"<h3>{html.escape(name)}</h3>",
            img_tag(plot_groups(table, min_size=min_size, failing=f), f"metrics by {name}"),
            "<details><summary>numbers</summary>",
            _group_table_html(table, min_size=min_size, failing=f),
            "</details>",
        ]
    parts.append("<h2>Items: exposure and popularity bias</h2>")
    scatter = plot_popularity_scatter(result)
    parts.append(
        '<div class="row">'
        + img_tag(plot_lorenz(result), "Lorenz curve")
        + (img_tag(scatter, "popularity vs exposure") if scatter else "")
        + "</div>"
    )
    parts.append(img_tag(plot_item_shares(result), "exposure vs relevance share"))
    parts.append(_item_tables_html(result))
    if online:
        parts += ["<h2>Online: CTR and value by group and model version</h2>", _online_html(online)]
    if gates is not None:
        parts += ["<h2>Gates</h2>", _gates_html(gates)]
    parts += [
        "<h2>How to read this</h2>",
        METHOD_NOTES,
        f'<p class="note">Source: {html.escape(json.dumps(src))}</p>' if src else "",
        "</body></html>",
    ]
    return "\n".join(parts)


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
