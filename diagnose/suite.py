"""The fault suite: every planted fault over several seeds, plus healthy runs.

Each run draws a world with `diagnose.planted.generate`, writes it through the real sink and
join, diagnoses it, and checks the top cause against the one the fault should produce. A
healthy run (no fault) is a false alarm when its report claims a significant drop or names
a cause. `run_suite` writes `suite.json` (every run) and `suite.md` (the table).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from common.files import atomic_write_text
from common.jsonsafe import dumps
from diagnose.config import DiagnoseConfig
from diagnose.planted import CURRENT, REFERENCE, generate, write_world
from diagnose.run import diagnose

# fault -> the cause the diagnosis must rank first (what the issue calls it, in brackets)
EXPECTED = {
    "taste_drift": "taste_drift",  # users' tastes drift
    "stale_catalogue": "stale_model",  # a wave of new items (and new users)
    "feature_skew": "feature_skew:age_bucket",  # a categorical feature wrong at serving only
    "delayed_labels": "label_delay",  # labels arriving later
    "feature_stuck": "feature_stuck:age_bucket",  # a feature stuck at one value
    "popularity_shock": "popularity_shock",  # a popularity shock
    "history_truncated": "feature_skew:history_len",  # history truncated at serving only
    "worse_model": "model_regression",  # a worse model promoted
    "mix_shift": "population_shift",  # who arrives changes (beyond the seven)
}
SIZE = {"n_users": 3000, "ref_requests": 5000, "cur_requests": 3500}
JSON_FILE, MD_FILE = "suite.json", "suite.md"


def diagnose_planted(fault: str, seed: int, folder: Path, size: dict[str, int], **overrides):
    """A planted world with `fault`, written to `folder` and diagnosed (nothing written but
    the world). `overrides`: DiagnoseConfig fields."""
    paths = write_world(generate(fault, seed=seed, **size), folder)
    cfg = DiagnoseConfig(
        labels=str(paths["labels"]),
        out=str(folder / "report"),
        current=CURRENT,
        reference=REFERENCE,
        log=str(paths["log"]),
        data=str(paths["data"]),
        versions=str(paths["versions"]),
        served_features=str(paths["served_features"]),
        previous_recs=str(paths["previous_recs"]),
        drift_engine="scipy",
        plots=False,
        **overrides,
    )
    return diagnose(cfg, progress=False, write=False)


def run_one(fault: str, seed: int, folder: Path, size: dict[str, int]) -> dict[str, Any]:
    """One planted world, diagnosed; what the suite's table needs from it."""
    result = diagnose_planted(fault, seed, folder, size)
    s = result.summary
    top = result.findings[0]
    second = result.findings[1] if len(result.findings) > 1 else None
    row = {
        "fault": fault,
        "seed": seed,
        "drop": s["drop"],
        "p_value": s["drop_test"]["p_value"],
        "significant": s["significant"],
        "top_cause": s["top_cause"],
        "top_share": top.share_of_drop if s["significant"] else None,
        "next_cause": second.cause if second is not None and s["significant"] else None,
        "next_share": second.share_of_drop if second is not None and s["significant"] else None,
        "headline": s["headline"],
    }
    if fault == "none":
        row["false_alarm"] = bool(s["significant"] or s["top_cause"] or result.plan)
    else:
        row["expected"] = EXPECTED[fault]
        row["hit"] = s["top_cause"] == EXPECTED[fault]
    return row


def run_suite(
    seeds: int = 3,
    out: str | Path | None = None,
    *,
    faults: tuple[str, ...] = tuple(EXPECTED),
    size: dict[str, int] | None = None,
    first_seed: int = 0,
    healthy: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every fault over `seeds` seeds plus `healthy` (default `seeds`) healthy runs; writes
    the table to `out`."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: expected >= 1")
    healthy = seeds if healthy is None else healthy
    if healthy < 0:
        raise ValueError(f"--healthy {healthy}: expected >= 0")
    unknown = [f for f in faults if f not in EXPECTED]
    if unknown:
        raise ValueError(f"--faults {','.join(unknown)}: expected some of {sorted(EXPECTED)}")
    size = size or SIZE
    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diagnose-suite-") as tmp:
        for fault in (*faults, "none"):
            n = healthy if fault == "none" else seeds
            for seed in range(first_seed, first_seed + n):
                row = run_one(fault, seed, Path(tmp) / f"{fault}-{seed}", size)
                runs.append(row)
                if progress:
                    what = (
                        f"false alarm={row['false_alarm']}"
                        if fault == "none"
                        else f"hit={row['hit']}"
                    )
                    print(
                        f"{fault:<17} seed {seed}: drop {row['drop']:+.4f} "
                        f"p={row['p_value']:.2g} top={row['top_cause']} {what}",
                        flush=True,
                    )
    body = {
        "seeds": seeds,
        "size": size,
        "table": table(runs),
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / JSON_FILE, dumps(body, indent=1) + "\n")
        atomic_write_text(out / MD_FILE, markdown(body))
    return body


def table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fault: runs, hits, the commonest top cause; healthy runs: false alarms."""
    rows = []
    for fault in dict.fromkeys(r["fault"] for r in runs if r["fault"] != "none"):
        mine = [r for r in runs if r["fault"] == fault]
        tops = [str(r["top_cause"]) for r in mine]
        common = max(set(tops), key=tops.count)
        shares = [r["top_share"] for r in mine if r["hit"] and r["top_share"] is not None]
        rows.append(
            {
                "fault": fault,
                "expected": mine[0]["expected"],
                "runs": len(mine),
                "ranked_first": sum(r["hit"] for r in mine),
                "hit_rate": sum(r["hit"] for r in mine) / len(mine),
                "top_cause": common,
                "mean_drop": sum(r["drop"] for r in mine) / len(mine),
                "mean_share_when_first": sum(shares) / len(shares) if shares else None,
                # the runner-up's largest share: how clearly the top cause stood out
                "max_next_share": max(
                    (r["next_share"] for r in mine if r["next_share"] is not None), default=None
                ),
            }
        )
    healthy = [r for r in runs if r["fault"] == "none"]
    return {
        "faults": rows,
        "faults_ranked_first": sum(r["hit_rate"] >= 0.5 for r in rows),
        "faults_total": len(rows),
        "hits": sum(r["ranked_first"] for r in rows),
        "fault_runs": sum(r["runs"] for r in rows),
        "healthy_runs": len(healthy),
        "false_alarms": sum(r["false_alarm"] for r in healthy),
    }


def markdown(body: dict[str, Any]) -> str:
    t = body["table"]
    lines = [
        "| fault | runs | ranked first | top cause | mean drop (CTR) | share when first | "
        "runner-up, largest share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in t["faults"]:
        share, nxt = r["mean_share_when_first"], r.get("max_next_share")
        lines.append(
            f"| {r['fault']} | {r['runs']} | {r['ranked_first']}/{r['runs']} | "
            f"`{r['top_cause']}` | {r['mean_drop']:.3f} | "
            f"{'n/a' if share is None else f'{share:.0%}'} | "
            f"{'n/a' if nxt is None else f'{nxt:.0%}'} |"
        )
    lines += [
        f"| healthy (no fault) | {t['healthy_runs']} | false alarms: "
        f"{t['false_alarms']}/{t['healthy_runs']} | | | | |",
        "",
        f"Faults ranked first in most of their runs: {t['faults_ranked_first']} of "
        f"{t['faults_total']} ({t['hits']}/{t['fault_runs']} runs); false alarms on healthy "
        f"runs: {t['false_alarms']}/{t['healthy_runs']}.",
        "",
    ]
    return "\n".join(lines)
