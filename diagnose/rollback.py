"""Diagnose a canary's rollback: its trial window against the window before it.

The canary's decision history (`canary/state.json`) says when a version went on trial (its
`retrain` entry with decision `canary`) and when it was rolled back; the window before is
the stretch since the previous routing change (a promotion or a rollback) under the same
production. `northstar demo` ends with this for act (c); `rollback_windows` is what picks
the windows.
"""

from __future__ import annotations

import json
from pathlib import Path

from diagnose.config import DiagnoseConfig, iso
from diagnose.run import Diagnosis, diagnose

ROUTING_CHANGES = ("promote", "rollback")


def rollback_windows(state_dir: str | Path, version: int) -> tuple[str, str]:
    """(reference, current) as START/END windows for the canary `version`'s trial."""
    path = Path(state_dir) / "state.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; expected the canary's state folder")
    history = json.loads(path.read_text()).get("history", [])
    start = end = None
    for e in history:
        if e.get("version") != version:
            continue
        if e.get("kind") == "retrain" and e.get("decision") == "canary":
            start = float(e["ts"])
        elif e.get("kind") == "rollback" and start is not None:
            end = float(e["ts"])
    if start is None or end is None:
        raise ValueError(
            f"canary version {version}: no trial followed by a rollback in {path}; "
            "expected a `retrain` entry with decision canary and a `rollback` after it"
        )
    before = [
        float(e["ts"])
        for e in history
        if e.get("kind") in ROUTING_CHANGES and float(e.get("ts", 0)) < start
    ]
    # no earlier routing change: as long before the trial as the trial itself lasted
    ref_start = max(before) if before else start - (end - start)
    return f"{iso(ref_start)}/{iso(start)}", f"{iso(start)}/{iso(end)}"


def diagnose_rollback(
    *,
    state_dir: str | Path,
    version: int,
    labels: str | Path,
    out: str | Path,
    log: str | Path = "",
    data: str | Path = "",
    progress: bool = False,
) -> tuple[Diagnosis, DiagnoseConfig]:
    """Diagnose the canary `version`'s trial against the window before it; writes the
    report to `out`."""
    reference, current = rollback_windows(state_dir, version)
    cfg = DiagnoseConfig(
        labels=str(labels),
        out=str(out),
        current=current,
        reference=reference,
        log=str(log),
        data=str(data),
        drift_engine="scipy",
        # a demo's trial is a few thousand impressions: keep its segments
        min_segment_impressions=50,
    )
    return diagnose(cfg, progress=progress), cfg
