"""The north star as Prometheus metrics: what `northstar monitor` recomputes and exports.

`compute(cfg)` reads the join's labels (and the event log, the dataset, the canary's state
when given) and returns one `Snapshot`: a list of samples for the families in `METRICS`.
The clock is the data's own: "now" is the newest labelled impression, so a replayed or
simulated log is monitored as it would have been live. The current window is the last
`window_hours` before now; the trailing baseline is the `baseline_hours` before that.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.stats import psi
from diagnose.causes import _psi_categorical
from diagnose.data import USER_GROUPS, Inputs, annotate, check_paths, dataset, logged_impressions
from feedback.join import read_labels, read_state

HOUR_S = 3600.0
ALL = "all"

# Exposition name -> (type, help). Counters carry their `_total` here as exposed.
METRICS: dict[str, tuple[str, str]] = {
    "northstar_monitor_ctr": (
        "gauge",
        "North star: clicks per impression over the sliding window, per version and user group",
    ),
    "northstar_monitor_ctr_baseline": (
        "gauge",
        "The same CTR over the trailing baseline window before the sliding window",
    ),
    "northstar_monitor_engaged_value": (
        "gauge",
        "Engaged value (watch seconds) per impression over the sliding window",
    ),
    "northstar_monitor_engaged_value_baseline": (
        "gauge",
        "Engaged value per impression over the trailing baseline window",
    ),
    "northstar_monitor_impressions": (
        "gauge",
        "Labelled impressions in the window (window=current|baseline)",
    ),
    "northstar_monitor_label_watermark_lag_seconds": (
        "gauge",
        "Newest logged impression minus the join's watermark: how far labels trail the log",
    ),
    "northstar_monitor_label_pending_share": (
        "gauge",
        "Share of the window's logged impressions that have no label yet",
    ),
    "northstar_monitor_feature_psi": (
        "gauge",
        "PSI of a user feature, sliding window against the trailing baseline (per request)",
    ),
    "northstar_monitor_canary_guardrail_breaches_total": (
        "counter",
        "Canary evaluations rolled back by a serving guardrail (from the canary's state)",
    ),
    "northstar_monitor_canary_rollbacks_total": (
        "counter",
        "Canary rollbacks recorded in the canary's state",
    ),
    "northstar_monitor_data_timestamp_seconds": (
        "gauge",
        "The monitor's clock: the newest labelled impression (unix s)",
    ),
    "northstar_monitor_last_update_timestamp_seconds": (
        "gauge",
        "Wall-clock time of the last successful recomputation",
    ),
    "northstar_monitor_update_errors_total": (
        "counter",
        "Recomputations that failed (the previous values stay exported)",
    ),
    "northstar_monitor_diagnoses_total": (
        "counter",
        "Diagnoses run for alerts, by status (done|error)",
    ),
}


@dataclass(frozen=True)
class MonitorConfig:
    labels: str  # the join's output folder
    log: str = ""  # event log: pending labels and the watermark's lag
    data: str = ""  # dataset folder: user groups, tenure
    canary_state: str = ""  # the canary's state folder (state.json): guardrail breaches
    port: int = 9109
    host: str = "127.0.0.1"
    window_hours: float = 24.0
    baseline_hours: float = 168.0
    interval: float = 60.0
    reports: str = "monitor-reports"  # where alert-triggered diagnoses are written
    public_url: str = ""  # how alerts link the reports; "" = http://host:port
    drift_engine: str = "scipy"

    def __post_init__(self) -> None:
        for name in ("window_hours", "baseline_hours", "interval"):
            if not getattr(self, name) > 0:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} {getattr(self, name)}: expected a number > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: expected 0..65535 (0 = any free port)")
        if self.canary_state and not Path(self.canary_state).is_dir():
            raise FileNotFoundError(
                f"--canary-state {self.canary_state}: no such folder; expected the canary's "
                "state folder (the one holding state.json)"
            )


Sample = tuple[str, dict[str, str], float]


@dataclass
class Snapshot:
    samples: list[Sample] = field(default_factory=list)
    now: float = math.nan  # the data's clock

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        assert name in METRICS, name
        if value is not None and math.isfinite(value):
            self.samples.append((name, labels, float(value)))

    def value(self, name: str, **labels: str) -> float | None:
        for n, lab, v in self.samples:
            if n == name and all(lab.get(k) == x for k, x in labels.items()):
                return v
        return None


def _frame(cfg: MonitorConfig, lab: pd.DataFrame) -> pd.DataFrame:
    """Labels with the user-group columns `diagnose.data.annotate` derives."""
    users, items, interactions = dataset(cfg.data)
    inp = Inputs(
        cfg=None,
        imp=lab.copy(),
        pending={},
        late=pd.DataFrame(columns=["event_id", "reason", "delay_s"]),
        watermark=None,
        window_s=0.0,
        users=users,
        items=items,
        interactions=interactions,
        versions=None,
        served_features=None,
        training_features=None,
        previous_recs=None,
        windows={},
    )
    annotate(inp)
    return inp.imp


def compute(cfg: MonitorConfig) -> Snapshot:
    """Every sample for one scrape; raises on bad input (flags named)."""
    labels_dir = check_paths(cfg.labels, cfg.log, cfg.data)
    snap = Snapshot()
    lab = read_labels(labels_dir)
    _canary(cfg, snap)
    if lab.empty:
        return snap
    now = float(lab["impression_ts"].max())
    snap.now = now
    snap.add("northstar_monitor_data_timestamp_seconds", {}, now)
    c0 = now - cfg.window_hours * HOUR_S
    b0 = c0 - cfg.baseline_hours * HOUR_S
    ts = lab["impression_ts"].to_numpy()
    lab = lab[ts >= b0]
    imp = _frame(cfg, lab)
    t = imp["impression_ts"].to_numpy()
    windows = {"current": imp[t >= c0], "baseline": imp[t < c0]}
    dims = [g for g in USER_GROUPS if g in imp]
    has_value = "value" in imp and imp["value"].notna().any()
    for w, f in windows.items():
        suffix = "" if w == "current" else "_baseline"
        for version in [ALL, *sorted(windows["current"]["model_version"].astype(str).unique())]:
            fv = f if version == ALL else f[f["model_version"].astype(str) == version]
            parts = [(ALL, ALL, fv)]
            for d in dims:
                parts += [(d, str(g), x) for g, x in fv.groupby(d, observed=True)]
            for dim, group, x in parts:
                lab_ = {"version": version, "dimension": dim, "group": group}
                snap.add("northstar_monitor_impressions", {**lab_, "window": w}, len(x))
                if len(x):
                    snap.add(f"northstar_monitor_ctr{suffix}", lab_, x["clicked"].mean())
                    if has_value:
                        snap.add(
                            f"northstar_monitor_engaged_value{suffix}",
                            lab_,
                            x["value"].fillna(0.0).mean(),
                        )
    # drift: one row per request, sliding window against the trailing baseline
    reqs = {w: f.drop_duplicates("request_id") for w, f in windows.items()}
    for feat in [*dims, *(c for c in ("user_tenure", "history_len") if c in imp)]:
        a, b = reqs["baseline"][feat], reqs["current"][feat]
        if not len(a) or not len(b):
            continue
        if pd.api.types.is_numeric_dtype(a):
            value = psi(expected=a.to_numpy(), actual=b.to_numpy())
        else:
            value = _psi_categorical(a, b)
        snap.add("northstar_monitor_feature_psi", {"feature": feat}, value)
    _label_lag(cfg, labels_dir, lab, snap, c0)
    return snap


def _label_lag(cfg: MonitorConfig, labels_dir: Path, lab: pd.DataFrame, snap, c0) -> None:
    if not cfg.log:
        return
    logged = logged_impressions(cfg.log)
    if logged.empty:
        return
    newest = float(logged["ts"].max())
    watermark = (read_state(labels_dir) or {}).get("watermark")
    if watermark is not None:  # an infinite watermark (a join run --as-of inf) lags by 0
        snap.add(
            "northstar_monitor_label_watermark_lag_seconds",
            {},
            max(newest - min(float(watermark), newest), 0.0),
        )
    # the window as the log sees it: it runs to the newest logged impression
    recent = logged[logged["ts"] >= c0]
    if len(recent):
        pending = ~recent["event_id"].isin(lab["event_id"])
        snap.add("northstar_monitor_label_pending_share", {}, float(pending.mean()))


def _canary(cfg: MonitorConfig, snap: Snapshot) -> None:
    """Guardrail breaches and rollbacks from the canary's decision history."""
    if not cfg.canary_state:
        return
    path = Path(cfg.canary_state) / "state.json"
    if not path.exists():
        return
    history = json.loads(path.read_text()).get("history", [])
    breaches: dict[str, int] = {}
    rollbacks = 0
    for e in history:
        version = e.get("canary", e.get("version"))
        version = str(version.get("version", "")) if isinstance(version, dict) else str(version)
        guard = any(str(r).startswith("guardrail") for r in e.get("reasons", []))
        if e.get("kind") == "evaluate" and e.get("decision") == "rollback" and guard:
            breaches[version] = breaches.get(version, 0) + 1
        if e.get("kind") == "rollback":
            rollbacks += 1
    for version, n in breaches.items():
        snap.add("northstar_monitor_canary_guardrail_breaches_total", {"version": version}, n)
    if not breaches:
        snap.add("northstar_monitor_canary_guardrail_breaches_total", {"version": "none"}, 0)
    snap.add("northstar_monitor_canary_rollbacks_total", {}, rollbacks)
