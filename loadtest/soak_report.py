"""The soak's Markdown summary and self-contained HTML page (plots inline as PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from common.figures import png_base64
from common.templating import render


def _fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _summary_lines(rep) -> list[str]:
    r, ev = rep.requests, rep.events
    return [
        f"{rep.seconds:.0f} s; simulator {r.get('simulator', 0):,} requests "
        f"({r.get('simulator_failed', 0)} failed, {r.get('simulator_retries', 0)} retried); "
        f"Locust {r.get('locust', 0):,} requests ({r.get('locust_failed', 0)} failed); "
        f"error rate {rep.error_rate:.5f}",
        f"interactions: {ev.get('sent', 0):,} sent, {ev.get('acknowledged', 0):,} acknowledged, "
        f"{ev.get('logged', 0):,} in the log; impressions: {ev.get('impressions_returned', 0):,} "
        f"returned, {ev.get('impressions_logged', 0):,} logged",
    ]


def write_markdown(rep, path: str | Path) -> Path:
    lines = [f"# northstar soak: {'PASS' if rep.ok else 'FAIL'}", ""]
    lines += [f"- {s}" for s in _summary_lines(rep)]
    lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
    lines += [
        f"| {c['name']} | {'PASS' if c['ok'] else 'FAIL'} | {c['text']} |" for c in rep.checks
    ]
    lines += [
        "",
        "| minute | requests | errors | p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {m['minute']} | {m['requests']:,} | {m['errors']} | {_fmt(m['p50_ms'])} | "
        f"{_fmt(m['p99_ms'])} |"
        for m in rep.minutes
    ]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _marks(ax, rep) -> None:
    for name, t in rep.cycle.get("marks", {}).items():
        ax.axvline(t, color="#888", lw=0.8, ls="--")
        ax.annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="#555")  # fmt: skip


def plot(rep) -> str:
    fig = Figure(figsize=(10, 7))
    ax1, ax2 = fig.subplots(2, 1)
    mins = pd.DataFrame(rep.minutes)
    if not mins.empty:
        x = mins["minute"] + 0.5
        ax1.plot(x, mins["p50_ms"], "o-", label="p50")
        ax1.plot(x, mins["p99_ms"], "o-", label="p99")
        ax1b = ax1.twinx()
        ax1b.bar(x, mins["requests"], width=0.8, alpha=0.15, color="gray")
        ax1b.set_ylabel("requests / minute")
    ax1.set_xlabel("minute")
    ax1.set_ylabel("latency (ms), Locust requests")
    ax1.set_title("latency per minute")
    ax1.legend(loc="upper left")
    rss = pd.DataFrame(rep.rss_samples)
    if not rss.empty:
        ax2.plot(rss["t"], rss["server_mb"], label="tritonserver")
        ax2.plot(rss["t"], rss["stubs_mb"], label="Python stubs")
        ax2.plot(rss["t"], rss["total_mb"], label="total", lw=2)
        _marks(ax2, rep)
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("RSS (MB)")
    ax2.set_title("memory, with the canary cycle")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    return png_base64(fig)


def write_html(rep, path: str | Path) -> Path:
    """The page (templates/soak.html.j2): summary, checks, the plot inline, minutes."""
    page = render(
        __file__,
        "soak.html.j2",
        verdict=_verdict(rep.ok),
        summary=_summary_lines(rep),
        checks=[{**c, "verdict": _verdict(c["ok"])} for c in rep.checks],
        plot=plot(rep),
        minutes=[
            {
                "minute": m["minute"],
                "requests": f"{m['requests']:,}",
                "errors": m["errors"],
                "p50_ms": _fmt(m["p50_ms"]),
                "p99_ms": _fmt(m["p99_ms"]),
            }
            for m in rep.minutes
        ],
    )
    path = Path(path)
    path.write_text(page)
    return path


def _verdict(ok) -> str:
    return "PASS" if ok else "FAIL"
