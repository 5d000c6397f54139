"""Read what the diagnosis needs into DataFrames, and derive the segment columns.

`load(cfg)` reads the join's labels for both windows (plus each impression's late
interactions and, with the log, the impressions still pending), the dataset's users, items
and training interactions, the versions table and the optional feature log and previous
rankings. `annotate` adds, per impression, the columns the analysers slice by.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diagnose.config import DiagnoseConfig, day
from feedback.events import IMPRESSION
from feedback.join import read_labels, read_state, read_statuses
from feedback.sink import open_source

REF, CUR = "reference", "current"
USER_GROUPS = ("gender", "age_bucket", "activity")
ITEM_GROUPS = ("provider", "genre", "popularity")
UNKNOWN = "unknown"


@dataclass
class Inputs:
    cfg: DiagnoseConfig | None  # None: built by the monitor, which has no report config
    imp: pd.DataFrame  # one row per labelled impression in either window, `window` column
    pending: dict[str, int]  # window -> impressions in the log without a label yet
    late: pd.DataFrame  # late interactions on the windows' impressions: event_id, delay_s
    watermark: float | None
    window_s: float
    users: pd.DataFrame | None
    items: pd.DataFrame | None
    interactions: pd.DataFrame | None
    versions: pd.DataFrame | None  # model_version, trained_until
    served_features: pd.DataFrame | None
    training_features: pd.DataFrame | None
    previous_recs: pd.DataFrame | None
    windows: dict[str, tuple[float, float]]


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".json":
        return pd.DataFrame(json.loads(path.read_text()))
    raise ValueError(f"{path}: expected .parquet, .csv or .json")


def _optional(path: str, flag: str) -> pd.DataFrame | None:
    """The table at `path` ("" = not given); errors name the flag that gave it."""
    if not path:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file (leave {flag} out to skip it)")
    try:
        return read_table(path)
    except ValueError as exc:  # wrong suffix
        raise ValueError(f"{flag} {path}: {str(exc).removeprefix(f'{path}: ')}") from None


def _need(df: pd.DataFrame | None, cols: tuple[str, ...], what: str) -> None:
    if df is not None and (missing := [c for c in cols if c not in df.columns]):
        raise ValueError(f"{what}: missing column(s) {missing}; expected {list(cols)}")


def _labels_dir(path: str) -> Path:
    labels_dir = Path(path)
    if not labels_dir.exists():
        raise FileNotFoundError(
            f"--labels {path}: no such folder; expected the join's output "
            f"(`northstar feedback join --log EVENTS.db --out {path}`)"
        )
    if not labels_dir.is_dir():
        raise ValueError(f"--labels {path}: not a folder; expected the join's output folder")
    return labels_dir


def _no_labels_in(flag: str, lab: pd.DataFrame, t0: float, t1: float) -> ValueError:
    """'no labelled impressions in this window', with where the labels are and what to do."""
    ts = lab["impression_ts"].to_numpy()
    first, last = day(float(ts.min())), day(float(ts.max()))
    if ts.max() < t0:
        hint = f"labels end at {last}; run `northstar feedback join` or pick an earlier window"
    elif ts.min() >= t1:
        hint = f"labels start at {first}; pick a later window"
    else:
        hint = f"labels cover {first}..{last} with a gap here; pick another window"
    return ValueError(f"{flag}: no labelled impressions in this window ({hint})")


def _check_log(path: str) -> None:
    if path.startswith(("redis://", "rediss://", "unix://", "kafka://")):
        raise ValueError(
            f"--log {path}: a stream, not a log; expected the SQLite event log that "
            "`northstar feedback consume --log PATH` writes"
        )
    if path.startswith("sqlite://"):  # open_sink's URL form
        path = path.removeprefix("sqlite://")
    if not Path(path).is_file():
        # open_source would create an empty log here and count nothing as pending.
        raise FileNotFoundError(
            f"--log {path}: no such file; expected the event log the join read "
            "(leave --log out to skip the pending-label count)"
        )


def logged_impressions(path: str) -> pd.DataFrame:
    """event_id, ts of every impression in the event log (`--log`)."""
    try:
        with open_source(path) as src:
            return src.read(IMPRESSION)[["event_id", "ts"]]
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"--log {path}: not a readable event log ({exc})") from None


def dataset(
    folder: str,
) -> tuple[pd.DataFrame | None, pd.DataFrame | None, pd.DataFrame | None]:
    """users, items, interactions from the `--data` folder; None for a missing table."""
    if not folder:
        return None, None, None
    data = Path(folder)
    return tuple(  # type: ignore[return-value]
        read_table(data / f"{n}.parquet") if (data / f"{n}.parquet").exists() else None
        for n in ("users", "items", "interactions")
    )


def check_paths(labels: str, log: str, data: str) -> Path:
    """The checks `load` makes before reading: --labels, --log and --data exist."""
    labels_dir = _labels_dir(labels)
    if log:
        _check_log(log)
    if data and not Path(data).is_dir():
        raise FileNotFoundError(
            f"--data {data}: no such folder; expected users.parquet, items.parquet, "
            "interactions.parquet (leave --data out to skip the segments)"
        )
    return labels_dir


def load(cfg: DiagnoseConfig) -> Inputs:
    (r0, r1), (c0, c1) = cfg.windows()
    labels_dir = check_paths(cfg.labels, cfg.log, cfg.data)
    lab = read_labels(labels_dir)
    if lab.empty:
        raise ValueError(
            f"--labels {cfg.labels}: holds no labels yet; expected the join's output "
            f"(`northstar feedback join --log EVENTS.db --out {cfg.labels}`)"
        )
    ts = lab["impression_ts"].to_numpy()
    in_ref, in_cur = (ts >= r0) & (ts < r1), (ts >= c0) & (ts < c1)
    if not in_cur.any():
        raise _no_labels_in(f"--current {cfg.current}", lab, c0, c1)
    if not in_ref.any():
        raise _no_labels_in(cfg.reference_flag(), lab, r0, r1)
    imp = lab[in_ref | in_cur].copy()
    imp["window"] = np.where(in_cur[in_ref | in_cur], CUR, REF)
    state = read_state(labels_dir) or {}
    window_s = float(state.get("window_s", cfg.window_s))
    watermark = state.get("watermark")

    statuses = read_statuses(labels_dir)
    late = statuses[(statuses["status"] == "late") & statuses["impression_event_id"].notna()]
    late = late.merge(
        imp[["event_id", "impression_ts"]],
        left_on="impression_event_id",
        right_on="event_id",
        suffixes=("_interaction", ""),
    )
    late = pd.DataFrame(
        {
            "event_id": late["impression_event_id"].to_numpy(),
            "reason": late["reason"].to_numpy(),
            "delay_s": (late["ts"] - late["impression_ts"]).to_numpy(),
        }
    )

    pending = {REF: 0, CUR: 0}
    if cfg.log:
        logged = logged_impressions(cfg.log)
        unlabelled = logged[~logged["event_id"].isin(lab["event_id"])]
        t = unlabelled["ts"].to_numpy()
        pending = {REF: int(((t >= r0) & (t < r1)).sum()), CUR: int(((t >= c0) & (t < c1)).sum())}

    users, items, interactions = dataset(cfg.data)
    versions = _optional(cfg.versions, "--versions")
    _need(versions, ("model_version", "trained_until"), f"--versions {cfg.versions}")
    served = _optional(cfg.served_features, "--served-features")
    _need(served, ("user_id", "ts"), f"--served-features {cfg.served_features}")
    training = _optional(cfg.training_features, "--training-features")
    _need(training, ("user_id",), f"--training-features {cfg.training_features}")
    recs = _optional(cfg.previous_recs, "--previous-recs")
    _need(recs, ("user_id", "position", "item_id"), f"--previous-recs {cfg.previous_recs}")
    inputs = Inputs(
        cfg=cfg,
        imp=imp,
        pending=pending,
        late=late,
        watermark=watermark,
        window_s=window_s,
        users=users,
        items=items,
        interactions=interactions,
        versions=versions,
        served_features=served,
        training_features=training,
        previous_recs=recs,
        windows={REF: (r0, r1), CUR: (c0, c1)},
    )
    annotate(inputs)
    return inputs


def annotate(inp: Inputs) -> None:
    """Add the segment columns to `inp.imp`: user groups, item groups (provider, genre,
    popularity bucket), user tenure (new = no training history before the serving model's
    cutoff), item age (new = released after that cutoff), freshness (both together),
    history_len and item_age_days (numeric, for drift), and `model_cutoff`."""
    imp = inp.imp
    imp["model_version"] = imp["model_version"].astype(np.int64)
    imp["version"] = "v" + imp["model_version"].astype(str)
    if inp.users is not None:
        cols = [c for c in USER_GROUPS if c in inp.users.columns]
        u = inp.users[["user_id", *cols]].drop_duplicates("user_id")
        merged = imp[["user_id"]].merge(u, on="user_id", how="left")
        for c in cols:
            imp[c] = merged[c].fillna(UNKNOWN).astype(str).to_numpy()
    cutoff = np.full(len(imp), np.nan)
    if inp.versions is not None:
        vmap = dict(
            zip(
                inp.versions["model_version"].astype(np.int64),
                inp.versions["trained_until"].astype(float),
                strict=True,
            )
        )
        cutoff = imp["model_version"].map(vmap).to_numpy(np.float64)
    if inp.interactions is not None and np.isnan(cutoff).any():
        cutoff = np.where(np.isnan(cutoff), float(inp.interactions["timestamp"].max()), cutoff)
    imp["model_cutoff"] = cutoff

    if inp.interactions is not None:
        tr = inp.interactions
        counts = tr["item_id"].value_counts()
        order = counts.sort_values(ascending=False)
        cum = order.cumsum() / order.sum()
        bucket = pd.Series(
            np.where(cum <= 0.5, "head", np.where(cum <= 0.8, "mid", "tail")), index=order.index
        )
        imp["popularity"] = imp["item_id"].map(bucket).fillna("tail").to_numpy()
        imp["item_popularity"] = np.log1p(imp["item_id"].map(counts).fillna(0).to_numpy())
        # history the model could have learned: training rows before its cutoff
        tr_sorted = tr.sort_values(["user_id", "timestamp"])
        key_u = tr_sorted["user_id"].to_numpy(np.int64)
        key_t = tr_sorted["timestamp"].to_numpy(np.float64)
        # rows per user before the cutoff, once per distinct (user, cutoff) pair
        uid = imp["user_id"].to_numpy(np.int64)
        cut = np.where(np.isnan(cutoff), np.inf, cutoff)
        pairs, inv = np.unique(np.stack([uid.astype(np.float64), cut]), axis=1, return_inverse=True)
        pu, pc = pairs[0].astype(np.int64), pairs[1]
        lo = np.searchsorted(key_u, pu, side="left")
        hi = np.searchsorted(key_u, pu, side="right")
        pair_hist = np.zeros(len(pu), np.int64)
        for j in np.flatnonzero(hi > lo):
            pair_hist[j] = np.searchsorted(key_t[lo[j] : hi[j]], pc[j], side="left")
        hist = pair_hist[np.ravel(inv)]
        imp["history_len"] = np.log1p(hist)
        imp["user_tenure"] = np.where(hist > 0, "returning", "new")
    if inp.items is not None:
        cols = [c for c in ("provider", "genre", "release_ts") if c in inp.items.columns]
        it = inp.items[["item_id", *cols]].drop_duplicates("item_id")
        merged = imp[["item_id"]].merge(it, on="item_id", how="left")
        for c in cols:
            if c == "release_ts":
                rel = merged[c].to_numpy(np.float64)
                imp["item_age_days"] = (imp["impression_ts"].to_numpy() - rel) / 86_400.0
                newer = np.where(np.isnan(cutoff) | np.isnan(rel), False, rel > cutoff)
                imp["item_age"] = np.where(newer, "newer_than_model", "known_to_model")
            else:
                imp[c] = merged[c].fillna(UNKNOWN).astype(str).to_numpy()
    if "user_tenure" in imp and "item_age" in imp:
        nu = imp["user_tenure"] == "new"
        ni = imp["item_age"] == "newer_than_model"
        imp["freshness"] = np.select(
            [nu & ni, nu, ni], ["new_user×new_item", "new_user", "new_item"], "known"
        )
    imp["explored"] = imp["propensity"].to_numpy() < 0.5
    imp["clicked"] = imp["clicked"].astype(bool)
