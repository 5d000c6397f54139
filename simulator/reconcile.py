"""Check a simulator run against the event log: nothing lost, nothing counted twice."""

from __future__ import annotations

import math

import pandas as pd

from feedback.events import INTERACTION
from feedback.join import (
    JOINED,
    LATE,
    UNATTRIBUTED,
    JoinConfig,
    read_labels,
    read_statuses,
    run_join,
)
from feedback.lake import open_event_source  # the SQLite log or a Parquet lake
from simulator.config import SimReport, SimulateConfig


def reconcile(
    report: SimReport, *, log_path: str, labels_dir: str, window_s: float | None = None
) -> dict:
    """Join the log (closing every window) and check the simulator's counts against it.

    Checks: impressions logged for the simulator's requests == items returned; every
    acknowledged event has exactly one status; joined + late + unattributed == accepted;
    and, where the report says its expectation is exact, each status matches.
    """
    return reconcile_many([report], log_path=log_path, labels_dir=labels_dir, window_s=window_s)[0]


def reconcile_many(
    reports: list[SimReport], *, log_path: str, labels_dir: str, window_s: float | None = None
) -> list[dict]:
    """`reconcile` for many simulator runs on one log: one join and one read of each table,
    then per-report lookups (a soak reconciles hundreds of batches on millions of rows)."""

    src = open_event_source(log_path)
    cfg = JoinConfig(
        log=log_path, out=labels_dir, as_of=math.inf, window_s=window_s or SimulateConfig.window_s
    )
    run_join(cfg, source=src)
    imps_per_request = src.read("impression")["request_id"].value_counts()
    # Rows per event_id, not membership: an event stored twice must show up as a mismatch.
    rows_per_event = src.read(INTERACTION)["event_id"].value_counts()
    st = read_statuses(labels_dir)
    labels_per_request = read_labels(labels_dir)["request_id"].value_counts()
    quarantine = src.quarantine_counts().get(INTERACTION, {})
    out = []
    for report in reports:
        req = pd.Index(report.request_ids).unique()
        logged = int(imps_per_request.reindex(req, fill_value=0).sum())
        ids = pd.Index(report.event_ids)
        mine = st[st["event_id"].isin(ids)]
        counts = mine["status"].value_counts()
        got = {s: int(counts.get(s, 0)) for s in (JOINED, LATE, UNATTRIBUTED)}
        expected = mine["event_id"].map(report.expected_by_event)
        mismatched = int((mine["status"] != expected).sum())
        rec = {
            "items_returned": report.items_returned,
            "impressions_logged": logged,
            "interactions_accepted": report.accepted,
            "interactions_in_log": int(rows_per_event.reindex(ids, fill_value=0).sum()),
            "statuses": got,
            "statuses_expected": report.expected,
            "status_mismatches": mismatched,
            "labels_for_requests": int(labels_per_request.reindex(req, fill_value=0).sum()),
            "quarantine": quarantine,
        }
        rec["ok"] = (
            rec["impressions_logged"] == rec["items_returned"]
            and rec["interactions_in_log"] == rec["interactions_accepted"]
            and sum(got.values()) == report.accepted
            and len(mine) == report.accepted
            and rec["labels_for_requests"] == report.items_returned
            and (mismatched == 0 or not report.expected_exact)
        )
        out.append(rec)
    return out
