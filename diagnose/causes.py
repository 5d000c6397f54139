"""Cause analysers: each returns a `Finding` with the part of the drop it explains.

The north star here is CTR per impression (`clicked`). The drop D = CTR(reference) -
CTR(current); a finding's `explained` is in the same units (CTR points) and its
`share_of_drop` = explained / D. Shares come from different decompositions and are not
additive: they rank the candidate causes, each with its own evidence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from common.stats import psi
from diagnose.data import CUR, ITEM_GROUPS, REF, USER_GROUPS, Inputs
from diagnose.decompose import shift_share

# A served feature whose commonest value covers this share of the current window (and
# clearly less of the reference) is stuck, not merely skewed.
STUCK_SHARE = 0.95


@dataclass
class Finding:
    cause: str  # a stable id: population_shift, model_regression, feature_skew, ...
    title: str
    explained: float  # CTR points of the drop this cause accounts for
    share_of_drop: float  # explained / drop (NaN when there is no drop)
    evidence: dict[str, Any]
    remediation: str
    expected_recovery: float  # CTR points the remediation is expected to win back
    plots: dict[str, str] = field(default_factory=dict)  # name -> base64 PNG

    @classmethod
    def of(
        cls,
        *,
        cause: str,
        title: str,
        explained: float,
        drop: float,
        evidence: dict[str, Any],
        remediation: str,
        recovers: bool = True,
    ) -> Finding:
        """A finding whose share of the drop and expected recovery follow from `explained`:
        a remediation that `recovers` wins back the part the cause explains, no more."""
        return cls(
            cause=cause,
            title=title,
            explained=explained,
            share_of_drop=_share(explained, drop),
            evidence=evidence,
            remediation=remediation,
            expected_recovery=max(explained, 0.0) if recovers else 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "title": self.title,
            "explained": self.explained,
            "share_of_drop": self.share_of_drop,
            "expected_recovery": self.expected_recovery,
            "remediation": self.remediation,
            "evidence": self.evidence,
        }


def ctr(df: pd.DataFrame) -> float:
    return float(df["clicked"].mean()) if len(df) else float("nan")


def split(inp: Inputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    w = inp.imp["window"]
    return inp.imp[w == REF], inp.imp[w == CUR]


def drop(inp: Inputs) -> float:
    ref, cur = split(inp)
    return ctr(ref) - ctr(cur)


def _share(explained: float, d: float) -> float:
    return explained / d if d > 0 else float("nan")


def _records(df: pd.DataFrame) -> list[dict]:
    return df.to_dict(orient="records")


# ------------------------------------------------------------------ where the drop is


def where(inp: Inputs) -> dict[str, list[dict]]:
    """Shift-share table for every dimension the inputs have."""
    ref, cur = split(inp)
    dims = [
        *USER_GROUPS,
        "user_tenure",
        *ITEM_GROUPS,
        "item_age",
        "freshness",
        "version",
    ]
    return {
        d: _records(shift_share(ref, cur, d, min_n=inp.cfg.min_segment_impressions))
        for d in dims
        if d in inp.imp.columns
    }


def population_shift(inp: Inputs) -> Finding:
    """Who arrives: the mix part of the shift-share over user groups (each alone and all
    together); the dimension with the largest mix part is the explanation."""
    ref, cur = split(inp)
    d = drop(inp)
    dims = [c for c in USER_GROUPS if c in inp.imp.columns]
    rows, best = [], (0.0, None, None)
    if len(dims) > 1:
        joint = " × ".join(dims)
        key = inp.imp[dims[0]].astype(str)
        for c in dims[1:]:
            key = key + " × " + inp.imp[c].astype(str)  # vectorised; a row-wise agg is slow
        inp.imp[joint] = key
        ref, cur = split(inp)
        dims = [*dims, joint]
    for dim in dims:
        t = shift_share(ref, cur, dim, min_n=inp.cfg.min_segment_impressions)
        mix, within = float(t["mix"].sum()), float(t["within"].sum())
        rows.append({"dimension": dim, "mix": mix, "within": within})
        if mix > best[0]:
            best = (mix, dim, t)
    explained, dim, table = best
    ev: dict[str, Any] = {"dimensions": rows, "dimension": dim}
    if table is not None:
        ev["segments"] = _records(table.sort_values("mix", ascending=False))
    return Finding.of(
        cause="population_shift",
        title=f"population mix shift ({dim})" if dim else "population mix shift",
        explained=explained,
        drop=d,
        evidence=ev,
        remediation="No model fix: the traffic changed. Report the north star mix-adjusted "
        "(reweighted to the reference mix) and check acquisition; retrain on fresh data if "
        "the new segments are under-served.",
        recovers=False,
    )


# ------------------------------------------------------------------ input drift


def input_drift(inp: Inputs) -> dict[str, Any]:
    """PSI and a distribution test per user feature (one row per request) and per item
    feature (one row per impression), reference vs current."""
    ref, cur = split(inp)
    user_feats = [c for c in (*USER_GROUPS, "user_tenure", "history_len") if c in inp.imp]
    item_feats = [
        c for c in (*ITEM_GROUPS, "item_age", "item_popularity", "item_age_days") if c in inp.imp
    ]
    out = []
    reqs = {w: f.drop_duplicates("request_id") for w, f in ((REF, ref), (CUR, cur))}
    evid = _evidently_tests(inp, reqs, ref, cur, user_feats, item_feats)
    for side, feats in (("user", user_feats), ("item", item_feats)):
        for f in feats:
            a = (reqs[REF] if side == "user" else ref)[f]
            b = (reqs[CUR] if side == "user" else cur)[f]
            numeric = pd.api.types.is_numeric_dtype(a)
            if numeric:
                p_psi = psi(expected=a.to_numpy(), actual=b.to_numpy(), bins=inp.cfg.drift_bins)
                test, p = "ks", float(stats.ks_2samp(a, b).pvalue)
            else:
                p_psi = _psi_categorical(a, b)
                test, p = "chi2", _chi2(a, b)
            if evid and f in evid:
                test, p = evid[f]
            out.append(
                {
                    "side": side,
                    "feature": f,
                    "psi": p_psi,
                    "test": test,
                    "p_value": p,
                    "drifted": bool(p_psi > 0.1 and p < 0.01),
                }
            )
    return {"features": out, "engine": inp.cfg.drift_engine if evid else "scipy"}


def _psi_categorical(a: pd.Series, b: pd.Series, eps: float = 1e-4) -> float:
    pa = a.astype(str).value_counts(normalize=True)
    pb = b.astype(str).value_counts(normalize=True)
    idx = pa.index.union(pb.index)
    e = np.maximum(pa.reindex(idx).fillna(0).to_numpy(), eps)
    x = np.maximum(pb.reindex(idx).fillna(0).to_numpy(), eps)
    return float(((x - e) * np.log(x / e)).sum())


def _chi2(a: pd.Series, b: pd.Series) -> float:
    t = pd.crosstab(
        np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a.astype(str), b.astype(str)]
    ).to_numpy()
    if t.shape[1] < 2:
        return 1.0
    return float(stats.chi2_contingency(t)[1])


def _evidently_tests(inp, reqs, ref, cur, user_feats, item_feats) -> dict[str, tuple]:
    """feature -> (test name, p-value) from Evidently's ValueDrift (KS for numbers,
    chi-square for categories); {} when the engine is scipy."""
    if inp.cfg.drift_engine != "evidently":
        return {}
    # lazy: Evidently is heavy and only the drift_engine="evidently" runs need it
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    out: dict[str, tuple] = {}
    for feats, a, b in ((user_feats, reqs[REF], reqs[CUR]), (item_feats, ref, cur)):
        if not feats:
            continue
        num = [f for f in feats if pd.api.types.is_numeric_dtype(a[f])]
        cat = [f for f in feats if f not in num]
        dd = DataDefinition(numerical_columns=num, categorical_columns=cat)
        metrics = [ValueDrift(column=f, method="ks" if f in num else "chisquare") for f in feats]
        snap = Report(metrics).run(
            current_data=Dataset.from_pandas(b[feats].reset_index(drop=True), data_definition=dd),
            reference_data=Dataset.from_pandas(a[feats].reset_index(drop=True), data_definition=dd),
        )
        for f, m in zip(feats, snap.dict()["metrics"], strict=True):
            out[f] = ("ks" if f in num else "chi2") + " (evidently)", float(m["value"])
    return out


# ------------------------------------------------------------------ model and predictions


def _previous_version(inp: Inputs) -> int:
    if inp.cfg.previous_version >= 0:
        return inp.cfg.previous_version
    ref, _ = split(inp)
    return int(ref["model_version"].value_counts().idxmax())


def prediction_drift(inp: Inputs) -> dict[str, Any]:
    """Served score distributions (greedy slots) and top-K churn per returning user."""
    ref, cur = split(inp)
    a = ref.loc[~ref["explored"], "score"].to_numpy()
    b = cur.loc[~cur["explored"], "score"].to_numpy()
    out: dict[str, Any] = {
        "score_psi": psi(expected=a, actual=b) if len(a) and len(b) else None,
        "score_ks_p": float(stats.ks_2samp(a, b).pvalue) if len(a) and len(b) else None,
        "score_quantiles": {
            w: np.quantile(x, [0.1, 0.5, 0.9]).tolist() if len(x) else None
            for w, x in ((REF, a), (CUR, b))
        },
    }
    k = inp.cfg.k
    top = {}
    for w, f in ((REF, ref), (CUR, cur)):
        g = f[(~f["explored"]) & (f["position"] < k)]
        top[w] = g.groupby("user_id")["item_id"].agg(lambda s: set(s.tolist()))
    both = top[REF].index.intersection(top[CUR].index)
    if len(both):
        jac = [
            len(top[REF][u] & top[CUR][u]) / max(len(top[REF][u] | top[CUR][u]), 1) for u in both
        ]
        out["topk_churn"] = float(1.0 - np.mean(jac))
        out["churn_users"] = len(both)
    else:
        out["topk_churn"], out["churn_users"] = None, 0
    return out


def snips(values: np.ndarray, target: np.ndarray, propensity: np.ndarray) -> tuple[float, float]:
    """Self-normalised IPS: Σ w·y / Σ w with w = π_target / π_logging; also the effective
    sample size (Σ w)² / Σ w². NaN when no logged action has target probability."""
    w = np.asarray(target, np.float64) / np.asarray(propensity, np.float64)
    s = w.sum()
    if s <= 0:
        return float("nan"), 0.0
    return float((w * values).sum() / s), float(s * s / (w * w).sum())


def slotted_snips(
    values: np.ndarray, target: np.ndarray, propensity: np.ndarray, position: np.ndarray
) -> tuple[float, float]:
    """SNIPS per slot, averaged over the slots the target policy fills (it fills each
    once per request, so slots weigh equally); the effective sample sizes add up. A slot
    with no logged support is left out."""
    est, ess = [], 0.0
    for p in np.unique(position):
        sel = position == p
        v, e = snips(values[sel], target[sel], propensity[sel])
        if np.isfinite(v):
            est.append(v)
            ess += e
    return (float(np.mean(est)), ess) if est else (float("nan"), 0.0)


def model_regression(inp: Inputs) -> Finding:
    """The model got worse vs the traffic got harder: an estimate of what the previous
    model would have done on the current traffic, against what the current one did."""
    ref, cur = split(inp)
    d = drop(inp)
    prev = _previous_version(inp)
    pred = prediction_drift(inp)
    explore_ref, explore_cur = ctr(ref[ref["explored"]]), ctr(cur[cur["explored"]])
    ev: dict[str, Any] = {
        "previous_version": prev,
        "versions_current": {
            f"v{k}": int(v) for k, v in cur["model_version"].value_counts().items()
        },
        "exploration_ctr": {REF: explore_ref, CUR: explore_cur},
        "prediction_drift": pred,
    }
    new = cur[cur["model_version"] != prev]
    prev_ref_greedy = ctr(ref[(ref["model_version"] == prev) & ~ref["explored"]])
    if not len(new):
        ev["note"] = "the version serving the reference window serves the current one too"
        explained = 0.0
    else:
        new_greedy = new[~new["explored"]]
        old_cur = cur[(cur["model_version"] == prev) & ~cur["explored"]]
        method, v_prev, ess = "", float("nan"), 0.0
        if inp.previous_recs is not None:
            recs = inp.previous_recs[["user_id", "position", "item_id"]].drop_duplicates(
                ["user_id", "position"]
            )
            m = cur[["user_id", "position", "item_id"]].merge(
                recs.rename(columns={"item_id": "_prev_item"}),
                on=["user_id", "position"],
                how="left",
            )
            target = (m["_prev_item"].to_numpy() == cur["item_id"].to_numpy()).astype(float)
            v_prev, ess = slotted_snips(
                cur["clicked"].to_numpy(float),
                target,
                cur["propensity"].to_numpy(),
                cur["position"].to_numpy(),
            )
            method = "snips"
        if not (ess >= 30) and len(old_cur) >= inp.cfg.min_segment_impressions:
            v_prev, method = ctr(old_cur), "concurrent"  # a canary split: observed directly
        if not (ess >= 30) and method != "concurrent":
            v_prev = prev_ref_greedy * (explore_cur / explore_ref) if explore_ref > 0 else np.nan
            method = "projection"
        explained = float(len(new_greedy) / len(cur) * (v_prev - ctr(new_greedy)))
        ev.update(
            {
                "method": method,
                "previous_model_on_current_traffic": v_prev,
                "effective_sample_size": ess,
                "previous_model_on_reference": prev_ref_greedy,
                "current_model_on_current_traffic": ctr(new_greedy),
                "traffic_effect": prev_ref_greedy - v_prev,
                "share_of_traffic_on_new_versions": len(new) / len(cur),
            }
        )
        if not np.isfinite(explained):
            explained = 0.0
    return Finding.of(
        cause="model_regression",
        title="the served model got worse",
        explained=explained,
        drop=d,
        evidence=ev,
        remediation=f"Roll back to v{prev} (`northstar canary rollback`), then find what "
        "changed in the new version's training data or config before retraining.",
    )


# ------------------------------------------------------------------ labels


def label_delay(inp: Inputs) -> Finding:
    """Labels that have not arrived: late interactions (after the window, or after the
    label was written) on each window's impressions, and labels still immature."""
    ref, cur = split(inp)
    d = drop(inp)
    late = inp.late
    per = {}
    for w, f in ((REF, ref), (CUR, cur)):
        lw = late[late["event_id"].isin(f.loc[~f["clicked"], "event_id"])]
        per[w] = {
            "impressions": len(f),
            "late_impressions": int(lw["event_id"].nunique()),
            "late_rate": lw["event_id"].nunique() / max(len(f), 1),
            "late_reasons": {str(k): int(v) for k, v in lw["reason"].value_counts().items()},
            "pending": inp.pending[w],
            "pending_share": inp.pending[w] / max(inp.pending[w] + len(f), 1),
        }
    delays = {
        w: (f.loc[f["clicked"], "label_ts"] - f.loc[f["clicked"], "impression_ts"]).to_numpy()
        for w, f in ((REF, ref), (CUR, cur))
    }
    late_excess = per[CUR]["late_rate"] - per[REF]["late_rate"]
    # Immature labels: impressions whose window had not closed at the watermark were
    # labelled before every click could arrive (a join run with --as-of).
    immature = 0.0
    wm = inp.watermark
    if wm is not None and np.isfinite(wm) and len(delays[REF]):
        age = np.clip(wm - cur["impression_ts"].to_numpy(), 0, inp.window_s)
        ref_d = np.sort(delays[REF])
        complete = np.searchsorted(ref_d, age, side="right") / len(ref_d)
        c = float(np.mean(complete))
        if 0 < c < 1:
            immature = ctr(cur) * (1 / c - 1)
    explained = float(late_excess + immature)
    ev = {
        "windows": per,
        "late_excess_rate": late_excess,
        "immature_deficit": immature,
        "delay_quantiles_s": {
            w: np.quantile(x, [0.5, 0.9, 0.99]).tolist() if len(x) else None
            for w, x in delays.items()
        },
        "late_delay_median_s": {
            w: float(np.median(late.loc[late["event_id"].isin(f["event_id"]), "delay_s"]))
            if late["event_id"].isin(f["event_id"]).any()
            else None
            for w, f in ((REF, ref), (CUR, cur))
        },
        "ctr_with_late_clicks": {
            w: (f["clicked"].sum() + per[w]["late_impressions"]) / max(len(f), 1)
            for w, f in ((REF, ref), (CUR, cur))
        },
        "window_s": inp.window_s,
    }
    return Finding.of(
        cause="label_delay",
        title="labels that have not arrived (late or pending clicks)",
        explained=explained,
        drop=d,
        evidence=ev,
        remediation="Wait for labels: nothing is wrong with users or the model. Re-read the "
        "north star once the late clicks are in (or widen the attribution window), and fix "
        "the delay upstream (client batching, consumer lag).",
    )


# ------------------------------------------------------------------ skew


def feature_skew(inp: Inputs) -> Finding:
    """What the server used for a user (the feature log) against what training saw for
    the same user and time; per feature, the mismatch rate and the CTR it costs."""
    d = drop(inp)
    served = inp.served_features
    training = inp.training_features if inp.training_features is not None else inp.users
    empty = Finding.of(
        cause="feature_skew",
        title="training-serving skew",
        explained=0.0,
        drop=d,
        evidence={"note": "no feature log given (--served-features)"},
        remediation="",
        recovers=False,
    )
    if served is None or training is None:
        return empty
    feats = [c for c in served.columns if c not in ("user_id", "ts") and c in training.columns]
    if not feats:
        empty.evidence = {"note": "the feature log shares no feature with the training data"}
        return empty
    imp = inp.imp[["event_id", "user_id", "impression_ts", "clicked", "window"]]
    imp = imp.sort_values("impression_ts", kind="stable")
    s = served.rename(columns={f: f"_served_{f}" for f in feats}).sort_values("ts")
    s = s.astype({"user_id": np.int64, "ts": np.float64})
    m = pd.merge_asof(
        imp, s, left_on="impression_ts", right_on="ts", by="user_id", direction="backward"
    )
    tr = training.rename(columns={f: f"_train_{f}" for f in feats})
    if "ts" in training.columns:
        tr = tr.sort_values("ts").astype({"user_id": np.int64, "ts": np.float64})
        m = pd.merge_asof(
            m.drop(columns=["ts"]).sort_values("impression_ts"),
            tr.rename(columns={"ts": "_train_ts"}),
            left_on="impression_ts",
            right_on="_train_ts",
            by="user_id",
            direction="backward",
        )
    else:
        m = m.merge(
            tr[["user_id", *[f"_train_{f}" for f in feats]]].drop_duplicates("user_id"),
            on="user_id",
            how="left",
        )
    rows = []
    any_mis = np.zeros(len(m), bool)
    for f in feats:
        sv, tv = m[f"_served_{f}"], m[f"_train_{f}"]
        known = sv.notna() & tv.notna()
        mis = known & (sv.astype(str) != tv.astype(str))
        any_mis |= mis.to_numpy()
        cost = {}
        # matched CTR per training value in the reference: the fallback when a window has
        # no matched impressions for a value (a feature stuck at one value leaves none)
        ref_ok = (m["window"] == REF) & known & ~mis
        ref_matched = m["clicked"][ref_ok].groupby(tv[ref_ok].astype(str)).mean()
        for w in (REF, CUR):
            inw = (m["window"] == w) & known
            rate = float(mis[inw].mean()) if inw.any() else 0.0
            # CTR gap matched - mismatched within each training value, weighted by mismatches
            g = pd.DataFrame({"v": tv[inw].astype(str), "mis": mis[inw], "c": m["clicked"][inw]})
            by = g.groupby(["v", "mis"])["c"].agg(["mean", "size"]).unstack("mis")
            gap = 0.0
            if ("mean", True) in by.columns:
                matched = (
                    by[("mean", False)]
                    if ("mean", False) in by.columns
                    else pd.Series(np.nan, index=by.index)
                )
                few = (
                    by[("size", False)].fillna(0) < 30
                    if ("size", False) in by.columns
                    else pd.Series(True, index=by.index)
                )
                matched = matched.where(~few, by.index.to_series().map(ref_matched))
                ok = by[("size", True)].notna() & matched.notna()
                wts = by.loc[ok, ("size", True)]
                if wts.sum() > 0:
                    gap = float(
                        ((matched[ok] - by.loc[ok, ("mean", True)]) * wts).sum() / wts.sum()
                    )
            cost[w] = {"mismatch_rate": rate, "ctr_gap": gap, "cost": rate * gap}
        top_share = {}
        for w in (REF, CUR):
            v = sv[(m["window"] == w) & sv.notna()].astype(str)
            top_share[w] = float(v.value_counts(normalize=True).iloc[0]) if len(v) else 0.0
        rows.append(
            {
                "feature": f,
                "top_value_share": top_share,
                "stuck": bool(top_share[CUR] >= STUCK_SHARE and top_share[REF] < STUCK_SHARE - 0.1),
                "mismatch_rate": {w: cost[w]["mismatch_rate"] for w in cost},
                "ctr_gap_matched_minus_mismatched": {w: cost[w]["ctr_gap"] for w in cost},
                "explained": cost[CUR]["cost"] - cost[REF]["cost"],
            }
        )
    # Impressions served with a feature training would not have seen: the relevance
    # analysers leave them out, so a skew is not counted twice.
    inp.imp["served_mismatch"] = (
        pd.Series(any_mis, index=m["event_id"].to_numpy())
        .reindex(inp.imp["event_id"].to_numpy())
        .fillna(False)
        .astype(bool)
        .to_numpy()
    )
    worst = max(rows, key=lambda r: r["explained"])
    explained = float(worst["explained"])
    kind = "feature_stuck" if worst["stuck"] else "feature_skew"
    cause = f"{kind}:{worst['feature']}" if explained > 0 else "feature_skew"
    what = "stuck at one value at serving" if worst["stuck"] else "training-serving skew"
    return Finding.of(
        cause=cause,
        title=f"{what} in `{worst['feature']}`",
        explained=explained,
        drop=d,
        evidence={"features": rows, "feature": worst["feature"]},
        remediation=(
            f"The served `{worst['feature']}` collapsed to one value: find the writer or "
            "default that pins it (a failed lookup falling back to a constant, an encoder "
            "reading the wrong column), fix it and rebuild the online store; no retrain."
            if worst["stuck"]
            else f"Fix the skewed feature `{worst['feature']}` at serving (the online "
            "store's writer or encoder), rebuild the store, then re-check that served and "
            "training values agree; no retrain is needed."
        ),
    )


# ------------------------------------------------------------------ staleness


def stale_model(inp: Inputs) -> Finding:
    """Model age, traffic on items newer than the model, new users without history; the
    part of the drop in those segments (mix and within) of the freshness split."""
    ref, cur = split(inp)
    d = drop(inp)
    ev: dict[str, Any] = {}
    for w, f in ((REF, ref), (CUR, cur)):
        age = (f["impression_ts"] - f["model_cutoff"]) / 86_400.0
        e = {"model_age_days": float(age.mean()) if age.notna().any() else None}
        if "item_age" in f:
            newer = f["item_age"] == "newer_than_model"
            e["impressions_on_newer_items"] = float(newer.mean())
            e["clicks_on_newer_items"] = (
                float(f.loc[f["clicked"], "item_age"].eq("newer_than_model").mean())
                if f["clicked"].any()
                else 0.0
            )
        if "user_tenure" in f:
            e["impressions_new_users"] = float((f["user_tenure"] == "new").mean())
        ev[w] = e
    explained = 0.0
    if "freshness" in inp.imp:
        t = shift_share(ref, cur, "freshness", min_n=1)
        ev["freshness"] = _records(t)
        explained = float(t.loc[t["segment"] != "known", "total"].sum())
    return Finding.of(
        cause="stale_model",
        title="stale model: catalogue and users it never saw",
        explained=explained,
        drop=d,
        evidence=ev,
        remediation="Retrain on fresh data (`northstar retrain --set mode=warm_window`) so "
        "the new items and new users get learned, and retrain on a schedule that keeps the "
        "model younger than the catalogue's churn.",
    )


# ------------------------------------------------------------------ relevance drift


def _label(inp: Inputs) -> pd.Series:
    """Clicked, counting the late clicks too: relevance is judged on what users did,
    not on when their clicks arrived."""
    return inp.imp["clicked"] | inp.imp["event_id"].isin(inp.late["event_id"])


def relevance_drift(inp: Inputs) -> list[Finding]:
    """Same model, same kind of user, same score: fewer clicks. On the traffic no other
    cause touches (the reference's version, known users and items, served features as
    training saw them), the current CTR is set against what the reference's CTR per cell
    (user group × popularity bucket × score quintile × position band) predicts. The
    relative shortfall that every popularity bucket shares is users' tastes moving
    (`taste_drift`); what a bucket loses beyond the least-hit one, and beyond twice its
    own noise, is item-side (`popularity_shock`)."""
    _, cur_all = split(inp)
    d = drop(inp)
    imp = inp.imp
    prev = _previous_version(inp)
    clean = (imp["model_version"] == prev).to_numpy()
    if "freshness" in imp:
        clean &= (imp["freshness"] == "known").to_numpy()
    if "served_mismatch" in imp:
        clean &= ~imp["served_mismatch"].to_numpy(bool)
    c = imp.loc[clean, ["window", "user_id", "score", "position"]].copy()
    c["y"] = _label(inp)[clean].to_numpy()
    groups = [g for g in USER_GROUPS if g in imp]
    c["group"] = imp.loc[clean, groups].astype(str).agg(" × ".join, axis=1) if groups else ""
    c["bucket"] = imp.loc[clean, "popularity"].to_numpy() if "popularity" in imp else "all"
    r, k = c[c["window"] == REF], c[c["window"] == CUR]
    ev: dict[str, Any] = {"clean_impressions": {REF: len(r), CUR: len(k)}}
    zero = [
        Finding.of(
            cause=name,
            title=title,
            explained=0.0,
            drop=d,
            evidence=ev,
            remediation="",
            recovers=False,
        )
        for name, title in (
            ("taste_drift", "users' tastes drifted from what the model learned"),
            ("popularity_shock", "a popularity shock: what was popular lost its appeal"),
        )
    ]
    min_n = inp.cfg.min_segment_impressions
    if len(r) < min_n or len(k) < min_n:
        ev["note"] = "too little traffic that no other cause touches in one of the windows"
        return zero
    edges = np.quantile(r["score"].to_numpy(), [0.2, 0.4, 0.6, 0.8])
    band = np.minimum(c["position"].to_numpy() // 3, 3)
    cell = np.searchsorted(edges, c["score"].to_numpy()) * 10 + band
    # The bucket is part of the cell: at one score a head item (pushed by its popularity)
    # and a tail item are not the same bet, and a change in who arrives moves the mix.
    c["cell"] = c["bucket"].astype(str) + "|" + cell.astype(str)
    c["fine"] = c["group"] + "|" + c["cell"]
    r, k = c[c["window"] == REF], c[c["window"] == CUR]
    coarse = r.groupby("cell")["y"].mean()
    fine = r.groupby("fine")["y"].agg(["mean", "size"])
    fine = fine.loc[fine["size"] >= 20, "mean"]
    # a sparse fine cell falls back to its coarse cell scaled by the user group's ratio
    r_coarse = r["cell"].map(coarse)
    factor = r.groupby("group")["y"].sum() / r_coarse.groupby(r["group"]).sum().clip(lower=1e-9)
    fallback = k["cell"].map(coarse) * k["group"].map(factor).fillna(1.0)
    expect = k["fine"].map(fine).fillna(fallback).fillna(r["y"].mean())
    t = pd.DataFrame({"bucket": k["bucket"], "e": expect.to_numpy(), "y": k["y"].astype(float)})
    t["v"] = t["e"] * (1 - t["e"])
    t = t.groupby("bucket").agg(
        n=("y", "size"), expected=("e", "sum"), clicks=("y", "sum"), var=("v", "sum")
    )
    t["shortfall"] = (t["expected"] - t["clicks"]) / t["expected"].clip(lower=1e-9)
    t["se"] = np.sqrt(t["var"]) / t["expected"].clip(lower=1e-9)
    t = t.drop(columns="var")
    big = t[t["n"] >= min_n]
    uniform = float(max(big["shortfall"].min(), 0.0)) if len(big) else 0.0
    n_cur = max(len(cur_all), 1)
    taste = float((t["expected"] * uniform).sum() / n_cur)
    # beyond the shared part, only what a bucket's own noise (2 SE) does not explain
    excess = (t["shortfall"] - uniform - 2 * t["se"]).clip(lower=0)
    item_side = float((t["expected"] * excess).sum() / n_cur)
    ev.update(
        {
            "expected_ctr_current": float(t["expected"].sum() / max(len(k), 1)),
            "observed_ctr_current": float(t["clicks"].sum() / max(len(k), 1)),
            "reference_ctr": float(r["y"].mean()),
            "shared_shortfall": uniform,
            "by_popularity_bucket": _records(t.reset_index()),
        }
    )
    worst = t["shortfall"].idxmax() if len(t) else None
    return [
        Finding.of(
            cause="taste_drift",
            title=zero[0].title,
            explained=taste,
            drop=d,
            evidence=ev,
            remediation="Retrain on the recent window (`northstar retrain --set "
            "mode=warm_window`) and shorten the retrain cadence: the model's user "
            "representations no longer match what users click, in every segment and at "
            "every score.",
        ),
        Finding.of(
            cause="popularity_shock",
            title=zero[1].title,
            explained=item_side,
            drop=d,
            evidence={**ev, "hit_bucket": worst},
            remediation=f"Recompute the popularity prior from recent clicks (the `{worst}` "
            "bucket lost its appeal, the model still pushes it), retrain on the recent "
            "window, and raise exploration until the new head is learned.",
        ),
    ]


# ------------------------------------------------------------------ is the drop real?


def drop_test(inp: Inputs, alpha: float) -> dict[str, Any]:
    """The drop against its noise: each window's CTR is a ratio of sums over users, so
    its variance is the delta method's, clustered by user (a user's impressions are not
    independent draws). The windows are taken as independent, which is conservative when
    the same users are in both. One-sided: a drop is significant when p < alpha."""
    out: dict[str, Any] = {"alpha": alpha, "clustered_by": "user"}
    var = 0.0
    for w, f in zip((REF, CUR), split(inp), strict=True):
        g = f.groupby("user_id")["clicked"].agg(["sum", "size"])
        n = float(g["size"].sum())
        rate = float(g["sum"].sum()) / n if n else float("nan")
        v = float(((g["sum"] - rate * g["size"]) ** 2).sum()) / n**2 if n else float("nan")
        out[w] = {"ctr": rate, "se": float(np.sqrt(v)), "users": len(g)}
        var += v
    d = out[REF]["ctr"] - out[CUR]["ctr"]
    se = float(np.sqrt(var))
    z = d / se if se > 0 else float("nan")
    half = float(stats.norm.ppf(1 - alpha)) * se
    out.update(
        {
            "drop": d,
            "se": se,
            "z": z,
            "p_value": float(stats.norm.sf(z)) if np.isfinite(z) else float("nan"),
            "ci": [d - half, d + half],
        }
    )
    out["significant"] = bool(np.isfinite(z) and out["p_value"] < alpha)
    return out


# In this order: feature_skew marks the mismatched impressions relevance_drift leaves out.
ANALYSERS: tuple[Callable[[Inputs], Finding | list[Finding]], ...] = (
    population_shift,
    model_regression,
    label_delay,
    feature_skew,
    stale_model,
    relevance_drift,
)
