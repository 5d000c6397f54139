"""The benchmark's targets, table, plot and HTML page, from the rows bench.py measured.

Targets (loadtest/RESULTS.md, "Summary"), each a ratio inside one run, where (a) is
the mean of the ceiling's measurements (one at each end of the run):
  (b)/(a) >= 0.9;
  (c) at some concurrency >= 32: >= 0.5 x (a) with p99 <= 50 ms;
  (c)/(d) >= 5 at every concurrency both sweeps share in 16..64 (the project aims for 10);
  (c)/(g) >= 1 at every concurrency both share in 16..64, p99 of both beside it (the
      batching peer, Ray Serve: a stack that batches must be beaten at its own game);
  (c) p50 <= (d) p50 at concurrency 1 (at low load nothing should cost more than the naive
      one-at-a-time server).
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

from matplotlib.figure import Figure

from common.templating import render

B_OVER_A = 0.9
C_OVER_A = 0.5
C_P99_MS = 50.0
C_MIN_CONCURRENCY = 32
C_OVER_D = 5.0
C_OVER_D_AIM = 10.0
C_OVER_G = 1.0
PEER_CONCURRENCY = (16, 64)  # inclusive range where (c)/(d) is judged
_VERDICT = {True: "PASS", False: "FAIL", None: "info"}


def _rows(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["row"] == name]


def ceiling(rows: list[dict]) -> dict | None:
    """(a): the mean of its measurements (the benchmark takes one at each end of a run)."""
    a = _rows(rows, "a")
    return {"qps": sum(r["qps"] for r in a) / len(a)} if a else None


def checks(rows: list[dict]) -> list[dict]:
    """One entry per target that the measured rows allow judging: name, value, target, ok."""
    out: list[dict] = []
    a = ceiling(rows)
    b = next(iter(_rows(rows, "b")), None)
    e = next(iter(_rows(rows, "e")), None)
    c, d = _rows(rows, "c"), _rows(rows, "d")
    if a and b:
        v = b["qps"] / a["qps"]
        out.append(_check("(b)/(a)", v, f"{v:.2f}x", f">= {B_OVER_A}", v >= B_OVER_A))
    hi = [r for r in c if r["concurrency"] >= C_MIN_CONCURRENCY]
    if a and hi:
        within = [r for r in hi if r["p99_ms"] <= C_P99_MS]
        best = max(within or hi, key=lambda r: r["qps"])
        v = best["qps"] / a["qps"]
        ok = bool(within) and v >= C_OVER_A
        out.append(
            _check(
                f"(c)@>={C_MIN_CONCURRENCY} / (a)",
                v,
                f"{v:.2f}x at concurrency {best['concurrency']}, p99 {best['p99_ms']:.0f} ms",
                f">= {C_OVER_A}x with p99 <= {C_P99_MS:.0f} ms",
                ok,
            )
        )
    lo, top = PEER_CONCURRENCY
    pairs = [
        (rc, rd)
        for rc in c
        for rd in d
        if rc["concurrency"] == rd["concurrency"] and lo <= rc["concurrency"] <= top
    ]
    if pairs:
        ratios = {rc["concurrency"]: rc["qps"] / max(rd["qps"], 1e-9) for rc, rd in pairs}
        worst = min(ratios.values())
        text = ", ".join(f"{v:.1f}x @{k}" for k, v in sorted(ratios.items()))
        out.append(
            _check(
                "(c)/(d)",
                worst,
                text,
                f">= {C_OVER_D:.0f}x at {lo}..{top} (aim: {C_OVER_D_AIM:.0f}x)",
                worst >= C_OVER_D,
            )
        )
    g = _rows(rows, "g")
    peer = {r["concurrency"]: r for r in g if lo <= r["concurrency"] <= top}
    shared = [rc for rc in c if rc["concurrency"] in peer]
    if shared:
        ratios = {
            rc["concurrency"]: rc["qps"] / max(peer[rc["concurrency"]]["qps"], 1e-9)
            for rc in shared
        }
        worst = min(ratios.values())
        text = ", ".join(
            f"{ratios[rc['concurrency']]:.2f}x @{rc['concurrency']} "
            f"(p99 {_num(rc['p99_ms'])} vs {_num(peer[rc['concurrency']]['p99_ms'])} ms)"
            for rc in shared
        )
        out.append(
            _check("(c)/(g)", worst, text, f">= {C_OVER_G:.0f}x at {lo}..{top}", worst >= C_OVER_G)
        )
    c1 = next((r for r in c if r["concurrency"] == 1), None)
    d1 = next((r for r in d if r["concurrency"] == 1), None)
    if c1 and d1:
        v = c1["p50_ms"] / max(d1["p50_ms"], 1e-9)
        text = f"{_num(c1['p50_ms'])} vs {_num(d1['p50_ms'])} ms ({v:.2f}x)"
        out.append(_check("(c)/(d) p50 @1", v, text, "<= 1.0x", v <= 1.0))
    if a and e:
        v = e["qps"] / a["qps"]
        out.append(_check("(e)/(a)", v, f"{v:.2f}x", "information", None))
    return out


def _check(name: str, value: float, text: str, target: str, ok: bool | None) -> dict:
    return {"name": name, "value": value, "text": text, "target": target, "ok": ok}


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Header + one line per measured row, ratios against (a) of the same size (mean)."""
    a = ceiling(rows)
    head = ["row", "what", "conc", "q/s", "p50 ms", "p99 ms", "vs (a)", "fail"]
    head += ["batch rec/ret", "srv cpu", "cli cpu", "load1"]
    out = [head]
    for r in rows:
        rec, ret = r.get("recommend_avg_batch"), r.get("retrieval_avg_batch")
        batch = ""
        if rec is not None and ret is not None:
            # ret 0: `recommend` ran the graph inline (serving/inline.py), no call reached it.
            batch = f"{rec:.1f}/" + (f"{ret:.1f}" if ret else "–")
        out.append(
            [
                f"({r['row']})",
                r["what"],
                str(r["concurrency"]),
                f"{r['qps']:.0f}",
                _num(r["p50_ms"]),
                _num(r["p99_ms"]),
                f"{r['qps'] / a['qps']:.2f}" if a and a["qps"] else "",
                str(r["failures"]),
                batch,
                _pct(r.get("server_cpu_share")),
                _pct(r.get("client_cpu_share")),
                f"{r['loadavg'][0]:.1f}",
            ]
        )
    return out


def _num(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def format_table(result: dict) -> str:
    lines = [
        f"northstar bench {result.get('label') or ''}".rstrip()
        + f" - {result['started']} - {result['machine']['cpus']} CPUs "
        f"({result['machine']['cpu']}), load avg at start "
        + " ".join(f"{x:.2f}" for x in result["loadavg_start"]),
        f"weights: {result['weights']}; queries = users scored; cpu = share of all cores",
    ]
    for size in result["sizes"]:
        lines.append("")
        lines.append(f"== {size['n_items']:,} items (graph top-{size['graph_k']}) ==")
        rows = table_rows(size["rows"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        lines.append("targets:")
        for ch in size["checks"]:
            verdict = _VERDICT[ch["ok"]]
            lines.append(f"  {verdict:4}  {ch['name']:<16} {ch['text']}  (target {ch['target']})")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Throughput (x) against p99 latency (y, log) per size: sweeps as lines, batch rows as dots."""
    sizes = result["sizes"]
    fig = Figure(figsize=(7 * len(sizes), 5))
    axes = fig.subplots(1, len(sizes), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = size["rows"]
        for name, style, label in (
            ("c", "o-", "(c) Triton recommend, 1 user/request"),
            ("d", "s--", "(d) naive FastAPI + torch eager"),
            ("g", "v-.", "(g) Ray Serve @serve.batch"),
        ):
            rs = [r for r in _rows(rows, name) if not math.isnan(r["p99_ms"])]
            if not rs:
                continue
            ax.plot([r["qps"] for r in rs], [r["p99_ms"] for r in rs], style, label=label)
            for r in rs:
                ax.annotate(
                    str(r["concurrency"]),
                    (r["qps"], r["p99_ms"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        for name, marker, label in (
            ("a", "*", "(a) ONNX in-process (batch latency)"),
            ("b", "D", "(b) Triton retrieval, batched"),
            ("e", "^", "(e) faiss IndexFlatIP (search only)"),
        ):
            for r in _rows(rows, name):
                ax.plot(r["qps"], r["p99_ms"], marker, markersize=11, label=label)
        a = ceiling(rows)
        if a:
            ax.axvline(C_OVER_A * a["qps"], color="grey", ls=":", lw=1, label="0.5 x (a)")
        ax.axhline(C_P99_MS, color="red", ls=":", lw=1, label=f"p99 {C_P99_MS:.0f} ms")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (users scored / s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{size['n_items']:,} items, {result['machine']['cpus']} CPUs")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"northstar bench {result.get('label') or ''} {result['started']}".strip())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_html(result: dict, path: str | Path, png: str | Path | None = None) -> Path:
    """The page (templates/bench.html.j2): the plot inline, a table and the targets per size."""
    sizes = [
        {
            "title": f"{size['n_items']:,} items (graph top-{size['graph_k']})",
            "table": table_rows(size["rows"]),
            "checks": [{**ch, "verdict": _VERDICT[ch["ok"]]} for ch in size["checks"]],
        }
        for size in result["sizes"]
    ]
    has_png = bool(png) and Path(png).exists()
    page = render(
        __file__,
        "bench.html.j2",
        label=result.get("label") or "",
        started=result["started"],
        cpus=result["machine"]["cpus"],
        cpu=result["machine"]["cpu"],
        load_start=" ".join(f"{x:.2f}" for x in result["loadavg_start"]),
        load_end=" ".join(f"{x:.2f}" for x in result.get("loadavg_end", [])),
        weights=result["weights"],
        png=base64.b64encode(Path(png).read_bytes()).decode() if has_png else None,
        sizes=sizes,
    )
    path = Path(path)
    path.write_text(page)
    return path
