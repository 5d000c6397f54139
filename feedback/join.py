"""Join interactions to impressions: labelled examples for retraining and the north-star metric.

Attribution (W = the attribution window, inclusive at both ends):

1. An interaction with a request_id is matched to the impression of the same request_id
   and item_id. Without one, it is matched to the nearest earlier impression of the same
   user_id and item_id (the latest with impression ts <= interaction ts).
2. Matched and impression ts <= interaction ts <= impression ts + W: JOINED, the impression
   becomes a positive. A click at exactly ts + W counts.
3. Interaction ts > impression ts + W: LATE ("after_window"). Also LATE: an interaction
   inside its window that reaches the log after the impression's label was finalised
   ("after_finalized"). Late interactions never change a written label; they are counted.
4. No impression to match ("no_impression", "unknown_request"), interaction before its
   impression ("before_impression"), or a request_id whose impression belongs to another
   user ("user_mismatch"): UNATTRIBUTED.

Every interaction read gets exactly one status, so joined + late + unattributed equals the
interactions in the log, and the simulator can reconcile its counts exactly.

Finality: an impression's label is final once its window has closed, i.e. ts + W < the
watermark. The watermark is the largest event ts the log has shown (event time, so a
replay gives the same labels), or `as_of` when given (`inf` closes every window). Until
then the impression is PENDING: carried in the join state, never written as a negative.

Incremental and idempotent: the state (`OUT/_state/state.json`) holds the log offsets read
so far, the watermark and the pending impressions. Run r writes only files named
`part-{r:08d}.parquet`, each atomically (temp file + rename), and commits the state last.
A run that crashes before its commit leaves files the next attempt overwrites or removes,
so re-running never duplicates a label; a run with nothing new writes nothing.

Output layout (readers skip names starting with "_" or "."):
  OUT/date=YYYY-MM-DD/part-*.parquet                labels, one row per final impression
  OUT/_interactions/date=YYYY-MM-DD/part-*.parquet  each interaction's status
  OUT/_state/                                       offsets, watermark, pending, lock
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from common.files import atomic_path, atomic_write_text
from feedback.events import IMPRESSION, INTERACTION
from feedback.lake import open_event_source
from feedback.sink_api import EventSource

log = logging.getLogger(__name__)

STATE_DIR = "_state"
STATUS_DIR = "_interactions"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
DATE = "date"  # the hive partition key: OUT/date=YYYY-MM-DD/
_FORMAT = 1
# Folders of partitions are read as one pyarrow dataset; names starting with "_" or "."
# (the state folder, the statuses under the labels, temp files) are skipped by discovery.
_HIVE = pads.partitioning(pa.schema([(DATE, pa.string())]), flavor="hive")

JOINED, LATE, UNATTRIBUTED = "joined", "late", "unattributed"
# Reason -> status. The reasons are what a person debugging the loop needs to see.
REASONS = {
    "request_id": JOINED,  # matched by request_id
    "user_item": JOINED,  # matched by (user_id, item_id) inside the window
    "after_window": LATE,
    "after_finalized": LATE,
    "before_impression": UNATTRIBUTED,
    "no_impression": UNATTRIBUTED,
    "unknown_request": UNATTRIBUTED,
    "user_mismatch": UNATTRIBUTED,
}
# When several interactions hit one impression, the label's event_type is the strongest.
_TYPE_RANK = {"click": 1, "watch": 2, "like": 3}

LABEL_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),  # the impression's event_id
        ("request_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("position", pa.int64()),
        ("score", pa.float64()),
        ("model_version", pa.int64()),
        ("propensity", pa.float64()),
        ("impression_ts", pa.float64()),  # unix seconds, server clock
        ("clicked", pa.bool_()),  # any attributed interaction (click, watch or like)
        ("liked", pa.bool_()),
        ("value", pa.float64()),  # engaged value: max attributed watch seconds, 0 if none
        ("label_ts", pa.float64()),  # first attributed interaction, else impression_ts + W
        ("event_type", pa.string()),  # strongest attributed type; null for negatives
        ("n_interactions", pa.int64()),  # attributed interactions, duplicates of a click included
    ]
)
STATUS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("type", pa.string()),
        ("value", pa.float64()),
        ("ts", pa.float64()),
        ("request_id", pa.string()),
        ("status", pa.string()),  # joined | late | unattributed
        ("reason", pa.string()),  # a key of REASONS
        ("impression_event_id", pa.string()),  # null when unattributed
    ]
)


@dataclass(frozen=True)
class JoinConfig:
    log: str  # event log: SQLite path/URL (feedback.sink.open_source) or a lake (feedback.lake)
    out: str  # labels folder
    # 30 min: most clicks on a home-screen row come within minutes; a window much longer
    # credits the ranking with visits it did not cause (the user came back via search).
    window_s: float = 1800.0
    # None: event-time watermark (the log's max ts). A number fixes it; inf closes all.
    as_of: float | None = None
    # How far back written labels are searched to tell "late" from "unattributed" for an
    # interaction whose impression is no longer pending. A week covers a weekend offline.
    late_lookback_s: float = 7 * 86_400.0

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s={self.window_s}: expected > 0 seconds")


@dataclass
class JoinReport:
    run: int
    new_impressions: int = 0
    new_interactions: int = 0
    labels_written: int = 0
    positives_written: int = 0
    pending: int = 0
    watermark: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)  # this run
    reasons: dict[str, int] = field(default_factory=dict)  # this run
    totals: dict[str, int] = field(default_factory=dict)  # every run so far
    seconds: float = 0.0
    noop: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- parsing


def parse_duration(text: str | float) -> float:
    """'30m' -> 1800.0. Units s, m, h, d; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"duration {text!r}: expected a number with unit s, m, h or d, e.g. 30m")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_as_of(text: str | None) -> float | None:
    """None/'log' -> None (event-time watermark), 'now', 'end' (= inf), unix seconds, ISO."""
    if text is None or text == "log":
        return None
    if text == "now":
        return time.time()
    if text in ("end", "inf"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"--as-of {text!r}: expected log, now, end, unix seconds or ISO time"
        ) from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


# ---------------------------------------------------------------------------- the join


def run_join(cfg: JoinConfig, source: EventSource | None = None) -> JoinReport:
    """One incremental pass over what the log gained since the last run."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with _exclusive(out / STATE_DIR / LOCK_FILE):
        state = _load_state(out, cfg)
        run = state["run"] + 1
        src = source if source is not None else open_event_source(cfg.log)
        snap = src.snapshot()
        cur = state["cursor"]
        imps = src.read(IMPRESSION, after=cur[IMPRESSION], upto=snap[IMPRESSION])
        inter = src.read(INTERACTION, after=cur[INTERACTION], upto=snap[INTERACTION])

        max_ts = _nanmax(
            state["max_event_ts"],
            imps["ts"].max() if len(imps) else None,
            inter["ts"].max() if len(inter) else None,
        )
        watermark = max_ts if cfg.as_of is None else cfg.as_of
        watermark = _nanmax(state["watermark"], watermark)
        report = JoinReport(
            run=run,
            new_impressions=len(imps),
            new_interactions=len(inter),
            watermark=watermark,
            totals=dict(state["totals"]),
        )
        if not len(imps) and not len(inter) and watermark == state["watermark"]:
            report.noop, report.pending = True, state["pending_count"]
            report.seconds = time.perf_counter() - t0
            return report

        _remove_run_files(out, run)  # leftovers of a crashed attempt at this same run
        done, still, status = join_step(
            _read_pending(out, state),
            imps,
            inter,
            window_s=cfg.window_s,
            watermark=watermark,
            finalized=lambda x: _finalized(out, x, cfg.late_lookback_s),
        )
        _write_partitioned(out, done, "impression_ts", LABEL_SCHEMA, run)
        _write_partitioned(out / STATUS_DIR, status, "ts", STATUS_SCHEMA, run)
        pending_file = None
        if len(still):
            pending_file = f"pending-{run:08d}.parquet"
            _write_table(out / STATE_DIR / pending_file, still, LABEL_SCHEMA)

        report.labels_written = len(done)
        report.positives_written = int(done["clicked"].sum()) if len(done) else 0
        report.pending = len(still)
        report.statuses = status["status"].value_counts().to_dict() if len(status) else {}
        report.reasons = status["reason"].value_counts().to_dict() if len(status) else {}
        totals = report.totals
        for key, n in [
            ("impressions", len(imps)),
            ("interactions", len(inter)),
            ("labels", len(done)),
            ("positives", report.positives_written),
            *report.statuses.items(),
            *((f"reason:{k}", v) for k, v in report.reasons.items()),
        ]:
            totals[key] = int(totals.get(key, 0) + n)
        new_state = {
            **state,
            "run": run,
            "cursor": {IMPRESSION: int(snap[IMPRESSION]), INTERACTION: int(snap[INTERACTION])},
            "watermark": watermark,
            "max_event_ts": max_ts,
            "pending_file": pending_file,
            "pending_count": len(still),
            "totals": totals,
        }
        atomic_write_text(out / STATE_DIR / STATE_FILE, json.dumps(new_state, indent=1))
        for f in (out / STATE_DIR).glob("pending-*.parquet"):  # superseded by the commit
            if f.name != pending_file:
                f.unlink(missing_ok=True)
        report.seconds = time.perf_counter() - t0
        return report


def join_step(
    pending: pd.DataFrame,
    imps: pd.DataFrame,
    inter: pd.DataFrame,
    *,
    window_s: float,
    watermark: float | None,
    finalized=None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One run's work on one slice of users: (final labels, still pending, statuses).

    `pending`: label rows carried from the last run; `imps`, `inter`: the new log rows.
    Every rule of this module is here; the caller reads, writes and commits. The
    distributed join (feedback.engine_ray) calls it once per user-hash bucket.
    """
    new = new_labels(imps)
    labels = (
        pd.concat([pending, new], ignore_index=True)
        if len(pending) and len(new)
        else new
        if len(new)
        else pending
    )
    status = attribute(inter, labels, window_s=window_s, finalized=finalized)
    final = (labels["impression_ts"] + window_s < watermark).to_numpy()
    done, still = labels[final], labels[~final]
    if len(done):
        done = done.assign(label_ts=done["label_ts"].fillna(done["impression_ts"] + window_s))
    return done, still, status


def attribute(
    inter: pd.DataFrame, labels: pd.DataFrame, *, window_s: float, finalized=None
) -> pd.DataFrame:
    """Give every interaction a status; fold the joined ones into `labels` (in place).

    `labels`: pending + new impressions (label columns). `finalized(interactions)` returns
    already-written impressions that might explain those interactions (for late
    detection); None means there are none.
    """
    n = len(inter)
    match = np.full(n, -1, dtype=np.int64)  # row in `labels`
    reason = np.full(n, "", dtype=object)
    imp_id = np.full(n, None, dtype=object)
    if n == 0:
        return _status_frame(inter, reason, imp_id)
    has_req = (inter["request_id"] != "").to_numpy()
    its = inter["ts"].to_numpy()

    # --- pass 1: against pending + new impressions
    m_ts, m_user = _match(inter, labels, has_req, match)
    # --- pass 2: what pass 1 could not place, against written labels (only to classify)
    old = np.flatnonzero(match < 0)
    old_match = np.full(n, -1, dtype=np.int64)
    fin = finalized(inter.iloc[old]) if len(old) and finalized is not None else None
    if fin is not None and len(fin):
        sub = inter.iloc[old].reset_index(drop=True)
        sub_match = np.full(len(old), -1, dtype=np.int64)
        f_ts, f_user = _match(sub, fin, has_req[old], sub_match)
        hit = sub_match >= 0
        old_match[old[hit]] = sub_match[hit]
        m_ts[old[hit]], m_user[old[hit]] = f_ts[hit], f_user[hit]
    matched = (match >= 0) | (old_match >= 0)
    users = inter["user_id"].to_numpy()

    # --- statuses, in precedence order
    unmatched = ~matched
    reason[unmatched & has_req] = "unknown_request"
    no_key = np.flatnonzero(unmatched & ~has_req)
    if len(no_key):
        # Not matched backwards in time: an impression of the pair exists only later, or not.
        later = _pair_seen(inter.iloc[no_key], labels)
        if fin is not None and len(fin):
            later |= _pair_seen(inter.iloc[no_key], fin)
        reason[no_key] = np.where(later, "before_impression", "no_impression")
    mism = matched & (m_user != users)
    reason[mism] = "user_mismatch"
    before = matched & ~mism & (its < m_ts)
    reason[before] = "before_impression"
    ok = matched & ~mism & ~before
    reason[ok & (its > m_ts + window_s)] = "after_window"
    in_window = ok & (its <= m_ts + window_s)
    reason[in_window & (old_match >= 0)] = "after_finalized"
    joined = in_window & (match >= 0)
    reason[joined] = np.where(has_req[joined], "request_id", "user_item")

    ev = labels["event_id"].to_numpy()
    imp_id[match >= 0] = ev[match[match >= 0]]
    if fin is not None and (old_match >= 0).any():
        fin_ids = fin["event_id"].to_numpy()
        imp_id[old_match >= 0] = fin_ids[old_match[old_match >= 0]]
    imp_id[reason == "user_mismatch"] = None

    _fold(labels, inter, np.flatnonzero(joined), match)
    return _status_frame(inter, reason, imp_id)


def _match(
    inter: pd.DataFrame, imps: pd.DataFrame, has_req: np.ndarray, match: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fill `match` (row of `imps` or -1); return the matched impression ts and user."""
    n = len(inter)
    m_ts = np.full(n, np.nan)
    m_user = np.full(n, -1, dtype=np.int64)
    if len(imps) == 0:
        return m_ts, m_user
    cand = pd.DataFrame(
        {
            "request_id": imps["request_id"].to_numpy(),
            "item_id": imps["item_id"].to_numpy(),
            "user_id": imps["user_id"].to_numpy(),
            "ts": imps["impression_ts"].to_numpy(),
            "row": np.arange(len(imps)),
            "position": imps["position"].to_numpy(),
        }
    )
    req_rows = np.flatnonzero(has_req)
    if len(req_rows):
        # Strings hashed once into int codes; the (request, item) lookup is then on ints.
        codes, uniques = pd.factorize(cand["request_id"].to_numpy())
        q_codes = pd.Index(uniques).get_indexer(inter["request_id"].to_numpy()[req_rows])
        # A response lists an item once; if a buggy one repeats it, the top slot wins.
        by_req = pd.DataFrame(
            {
                "code": codes,
                "item_id": cand["item_id"].to_numpy(),
                "position": cand["position"].to_numpy(),
                "row": cand["row"],
            }
        )
        if by_req.duplicated(["code", "item_id"]).any():
            by_req = by_req.sort_values("position", kind="stable").drop_duplicates(
                ["code", "item_id"]
            )
        q = pd.DataFrame(
            {"code": q_codes, "item_id": inter["item_id"].to_numpy()[req_rows], "q": req_rows}
        )
        hit = q[q["code"] >= 0].merge(
            by_req[["code", "item_id", "row"]], on=["code", "item_id"], how="inner"
        )
        match[hit["q"].to_numpy()] = hit["row"].to_numpy()
    ui_rows = np.flatnonzero(~has_req)
    if len(ui_rows):
        q = pd.DataFrame(
            {
                "ts": inter["ts"].to_numpy()[ui_rows],
                "user_id": inter["user_id"].to_numpy()[ui_rows],
                "item_id": inter["item_id"].to_numpy()[ui_rows],
                "q": ui_rows,
            }
        )
        q = q.sort_values("ts", kind="stable")
        # Only this batch's users can match: filter before the (costly) sort by time.
        c = cand.loc[
            cand["user_id"].isin(q["user_id"].unique()), ["ts", "user_id", "item_id", "row"]
        ]
        c = c.sort_values("ts", kind="stable")
        hit = pd.merge_asof(
            q, c, on="ts", by=["user_id", "item_id"], direction="backward", allow_exact_matches=True
        )
        hit = hit[hit["row"].notna()]
        match[hit["q"].to_numpy()] = hit["row"].to_numpy(np.int64)
    ok = match >= 0
    m_ts[ok] = cand["ts"].to_numpy()[match[ok]]
    m_user[ok] = cand["user_id"].to_numpy()[match[ok]]
    return m_ts, m_user


def _pair_seen(inter: pd.DataFrame, imps: pd.DataFrame) -> np.ndarray:
    """(n,) bool: the interaction's (user_id, item_id) pair has an impression in `imps`."""
    keys = pd.MultiIndex.from_frame(imps[["user_id", "item_id"]])
    q = pd.MultiIndex.from_frame(inter[["user_id", "item_id"]])
    return np.asarray(q.isin(keys))


def _fold(labels: pd.DataFrame, inter: pd.DataFrame, rows: np.ndarray, match: np.ndarray) -> None:
    """Accumulate joined interactions into their impressions' labels."""
    if len(rows) == 0:
        return
    j = pd.DataFrame(
        {
            "row": match[rows],
            "ts": inter["ts"].to_numpy()[rows],
            "watch": np.where(
                inter["type"].to_numpy()[rows] == "watch", inter["value"].to_numpy()[rows], 0.0
            ),
            "like": inter["type"].to_numpy()[rows] == "like",
            "rank": inter["type"].map(_TYPE_RANK).to_numpy()[rows],
        }
    )
    g = j.groupby("row", sort=False).agg(
        ts=("ts", "min"),
        watch=("watch", "max"),
        like=("like", "any"),
        rank=("rank", "max"),
        n=("ts", "size"),
    )
    r = g.index.to_numpy()
    lab_ts = labels["label_ts"].to_numpy(copy=True)
    lab_ts[r] = np.fmin(lab_ts[r], g["ts"].to_numpy())
    value = labels["value"].to_numpy(copy=True)
    value[r] = np.maximum(value[r], g["watch"].to_numpy())
    liked = labels["liked"].to_numpy(copy=True)
    liked[r] |= g["like"].to_numpy()
    clicked = labels["clicked"].to_numpy(copy=True)
    clicked[r] = True
    count = labels["n_interactions"].to_numpy(copy=True)
    count[r] += g["n"].to_numpy()
    names = np.array([None, "click", "watch", "like"], dtype=object)
    old_rank = labels["event_type"].map(_TYPE_RANK).fillna(0).to_numpy(np.int64)
    rank = old_rank.copy()
    rank[r] = np.maximum(old_rank[r], g["rank"].to_numpy(np.int64))
    labels["label_ts"], labels["value"], labels["liked"] = lab_ts, value, liked
    labels["clicked"], labels["n_interactions"] = clicked, count
    labels["event_type"] = names[rank]


def _status_frame(inter: pd.DataFrame, reason: np.ndarray, imp_id: np.ndarray) -> pd.DataFrame:
    status = np.asarray([REASONS[r] for r in reason], dtype=object) if len(reason) else reason
    return pd.DataFrame(
        {
            "event_id": inter["event_id"].to_numpy(),
            "user_id": inter["user_id"].to_numpy(),
            "item_id": inter["item_id"].to_numpy(),
            "type": inter["type"].to_numpy(),
            "value": inter["value"].to_numpy(),
            "ts": inter["ts"].to_numpy(),
            "request_id": inter["request_id"].to_numpy(),
            "status": status,
            "reason": reason,
            "impression_event_id": imp_id,
        }
    )


def new_labels(imps: pd.DataFrame) -> pd.DataFrame:
    """Impressions (the log's impression columns) as label rows with no interaction yet."""
    n = len(imps)
    return pd.DataFrame(
        {
            "event_id": imps["event_id"].to_numpy(),
            "request_id": imps["request_id"].to_numpy(),
            "user_id": imps["user_id"].to_numpy(),
            "item_id": imps["item_id"].to_numpy(),
            "position": imps["position"].to_numpy(),
            "score": imps["score"].to_numpy(),
            "model_version": imps["model_version"].to_numpy(),
            "propensity": imps["propensity"].to_numpy(),
            "impression_ts": imps["ts"].to_numpy(),
            "clicked": np.zeros(n, bool),
            "liked": np.zeros(n, bool),
            "value": np.zeros(n),
            "label_ts": np.full(n, np.nan),
            "event_type": np.full(n, None, dtype=object),
            "n_interactions": np.zeros(n, np.int64),
        }
    )


# ---------------------------------------------------------------------------- files and state


def _load_state(out: Path, cfg: JoinConfig) -> dict:
    path = out / STATE_DIR / STATE_FILE
    if not path.exists():
        return {
            "format": _FORMAT,
            "log": str(cfg.log),
            "window_s": cfg.window_s,
            "run": 0,
            "cursor": {IMPRESSION: 0, INTERACTION: 0},
            "watermark": None,
            "max_event_ts": None,
            "pending_file": None,
            "pending_count": 0,
            "totals": {},
        }
    state = json.loads(path.read_text())
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {_FORMAT}")
    if state["window_s"] != cfg.window_s:
        raise ValueError(
            f"{path}: these labels were built with window_s={state['window_s']}, not "
            f"{cfg.window_s}; a window change needs a fresh --out (labels would mix windows)"
        )
    return state


def _read_pending(out: Path, state: dict) -> pd.DataFrame:
    if not state["pending_file"]:
        return new_labels(_empty_impressions())
    df = pq.read_table(out / STATE_DIR / state["pending_file"]).to_pandas()
    return df.astype({"event_type": object})


def _empty_impressions() -> pd.DataFrame:
    cols = {
        "event_id": object,
        "request_id": object,
        "user_id": np.int64,
        "item_id": np.int64,
        "position": np.int64,
        "score": np.float64,
        "model_version": np.int64,
        "propensity": np.float64,
        "ts": np.float64,
    }
    return pd.DataFrame({k: np.zeros(0, dtype=v) for k, v in cols.items()})


def _finalized(out: Path, inter: pd.DataFrame, lookback_s: float) -> pd.DataFrame | None:
    """Written labels that could explain `inter`: from the days in [min ts - lookback,
    max ts], and only rows with one of their request ids or users. None if there are none."""
    ts = inter["ts"].to_numpy()
    lo, hi = float(np.nanmin(ts)) - lookback_s, float(np.nanmax(ts))
    days = utc_dates(np.array([lo, hi]))
    users = pa.array(np.unique(inter["user_id"].to_numpy()), pa.int64())
    reqs = pa.array([r for r in pd.unique(inter["request_id"]) if r], pa.string())
    date = pads.field(DATE)
    table = _read_partitioned(
        out,
        LABEL_SCHEMA,
        columns=["event_id", "request_id", "user_id", "item_id", "position", "impression_ts"],
        where=(date >= days[0])  # partition pruning: other days' files are not opened
        & (date <= days[1])
        & (pads.field("user_id").isin(users) | pads.field("request_id").isin(reqs)),
    )
    return None if table is None or table.num_rows == 0 else table.to_pandas()


def utc_dates(ts: np.ndarray) -> np.ndarray:
    """UTC calendar date of each unix ts, as 'YYYY-MM-DD' (formatted once per distinct day)."""
    days = np.floor(np.asarray(ts, np.float64) / 86_400.0).astype(np.int64)
    uniq, inv = np.unique(days, return_inverse=True)
    names = np.asarray([str(np.datetime64(int(d), "D")) for d in uniq], dtype=object)
    return names[inv]


def _write_partitioned(
    root: Path, df: pd.DataFrame, ts_col: str, schema: pa.Schema, run: int, suffix: str = ""
) -> None:
    """One file per UTC date, `part-{run:08d}{suffix}.parquet` (a suffix per writer of the
    same run, e.g. the bucket in the distributed join)."""
    if not len(df):
        return
    dates = utc_dates(df[ts_col].to_numpy())
    for day in np.unique(dates):
        part = df[dates == day]
        _write_table(root / f"{DATE}={day}" / f"part-{run:08d}{suffix}.parquet", part, schema)


def _write_table(path: Path, df: pd.DataFrame, schema: pa.Schema) -> None:
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_partitioned(
    root: Path, schema: pa.Schema, *, columns: list[str] | None = None, where=None
) -> pa.Table | None:
    """The `date=*/part-*.parquet` files under `root` as one table (with a `date` column
    unless `columns` leaves it out), in file-name order; None if there are no files."""
    if not root.is_dir():
        return None
    dataset = pads.dataset(
        root,
        schema=schema.append(pa.field(DATE, pa.string())),
        format="parquet",
        partitioning=_HIVE,
    )
    if not dataset.files:
        return None
    return dataset.to_table(columns=columns, filter=where)


def _remove_run_files(out: Path, run: int) -> None:
    name = f"part-{run:08d}.parquet"
    for f in [
        *out.glob(f"{DATE}=*/{name}"),
        *out.glob(f"{STATUS_DIR}/{DATE}=*/{name}"),
        out / STATE_DIR / f"pending-{run:08d}.parquet",
    ]:
        if f.exists():
            log.warning("removing %s, left by an interrupted join run", f)
            f.unlink()


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the folder's join lock (released by the kernel if the holder dies); never wait."""
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise RuntimeError(f"{path}: another join is running on this folder") from exc
    try:
        yield
    finally:
        lock.release()


def _nanmax(*values: float | None) -> float | None:
    vals = [float(v) for v in values if v is not None and not _isnan(v)]
    return max(vals) if vals else None


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---------------------------------------------------------------------------- readers


def read_labels(out: str | Path) -> pd.DataFrame:
    """All written labels, with `date` as a string column. Empty frame if none yet."""
    table = _read_partitioned(Path(out), LABEL_SCHEMA)
    if table is None:
        df = LABEL_SCHEMA.empty_table().to_pandas()
        return df.assign(**{DATE: pd.Series(dtype=object)})
    return table.to_pandas()


def read_pending(out: str | Path) -> pd.DataFrame:
    """Impressions whose window is still open, as label rows with what has been attributed
    to them so far (`clicked` may already be True: a weak label before it is final)."""
    state = read_state(out)
    if state is None:
        return new_labels(_empty_impressions())
    return _read_pending(Path(out), state)


def read_statuses(out: str | Path) -> pd.DataFrame:
    """Every interaction's attribution status (one row per interaction in the log)."""
    table = _read_partitioned(Path(out) / STATUS_DIR, STATUS_SCHEMA, columns=STATUS_SCHEMA.names)
    return (STATUS_SCHEMA.empty_table() if table is None else table).to_pandas()


def read_state(out: str | Path) -> dict | None:
    path = Path(out) / STATE_DIR / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def export_positives(labels_dir: str | Path, out_path: str | Path) -> int:
    """Write positives in the interactions schema (training.schema.INTERACTION_COLUMNS).

    One row per (user_id, item_id), the earliest: the offline log keeps a pair once too.
    timestamp = first interaction (unix seconds, floored); event_type = the strongest type;
    value = watch seconds (0 for a click without a watch). Returns the row count.
    """
    lab = read_labels(labels_dir)
    pos = lab[lab["clicked"]].sort_values("label_ts", kind="stable")
    pos = pos.drop_duplicates(["user_id", "item_id"], keep="first")
    df = pd.DataFrame(
        {
            "user_id": pos["user_id"].to_numpy(np.int64),
            "item_id": pos["item_id"].to_numpy(np.int64),
            "timestamp": np.floor(pos["label_ts"].to_numpy()).astype(np.int64),
            "event_type": pos["event_type"].fillna("click").astype(str).to_numpy(),
            "value": pos["value"].to_numpy(np.float32),
        }
    )
    with atomic_path(out_path) as tmp:
        df.to_parquet(tmp, index=False)
    return len(df)
