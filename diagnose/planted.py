"""A small world with a known generating process, for proving the diagnosis on planted faults.

`generate(fault, ...)` draws a reference window and a current window of served slates and
clicks from one process; `fault` changes ONE part of that process in the current window:

| fault              | what changes in the current window                                      |
| ------------------ | ----------------------------------------------------------------------- |
| `none`             | nothing (same process, fresh draws)                                     |
| `mix_shift`        | who arrives: low-activity users (who click less) are 5x as likely       |
| `feature_skew`     | the online store serves a wrong `age_bucket` for 70% of users; the      |
|                    | model scores them with the wrong age centroid                           |
| `delayed_labels`   | 60% of clicks are sent ~40x later (most after the attribution window)   |
| `stale_catalogue`  | many items released after the model's training cutoff, and many new     |
|                    | users without history; the model (trained long ago) knows neither      |
| `worse_model`      | a new model version with noisier scores serves every request            |
| `taste_drift`      | users' tastes move: each taste vector keeps half of itself, the rest is |
|                    | redrawn; the model still scores with what it learned                    |
| `feature_stuck`    | the online store serves `age_bucket` stuck at one value for every user  |
| `popularity_shock` | the items that were popular lose their appeal (clicks on the head       |
|                    | fall), while the model's popularity prior still pushes them             |
| `history_truncated`| serving reads only each user's last 2 history items (training saw all): |
|                    | the model barely knows the user's own taste; the feature log's          |
|                    | `history_len` says 2 where training saw the full count                  |

The world: users have a taste vector (age and gender centroids plus their own part) and an
activity level (a click-propensity offset); items have a genre centroid plus their own
part, a provider, a lognormal popularity and a release time. P(click at slot p) =
examination(p) · σ(a + b·⟨user, item⟩ + activity). A model version scores
⟨what it knows of the user, what it knows of the item⟩ + popularity + noise; it knows a
user's own part only when the user has training history before its cutoff, and an item's
vector only when the item was released before its cutoff. Slates are served ε-greedily
with `feedback.explore.rank_with_exploration`, so the logged propensities are the real ones.

`write_world(world, folder)` writes what production would have: the SQLite event log
(through `feedback.sink`), the labels (through the real `feedback.join`), the dataset
tables (users, items, training interactions), a versions table, the feature log of what
the server used, and the previous model's rankings. Nothing in the folder names the
fault: the diagnosis has to find it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from feedback.explore import rank_with_exploration
from feedback.join import JoinConfig, run_join
from feedback.sink import SqliteEventLog

FAULTS = (
    "none",
    "mix_shift",
    "feature_skew",
    "delayed_labels",
    "stale_catalogue",
    "worse_model",
    "taste_drift",
    "feature_stuck",
    "popularity_shock",
    "history_truncated",
)
# What serving keeps of a user's history under `history_truncated`, and how much of the
# user's own taste the model can still read from so little.
TRUNCATED_HISTORY, TRUNCATED_KNOWLEDGE = 2, 0.2
DAY = 86_400.0
# Reference 2026-10-18..2026-10-31, current 2026-11-01..2026-11-07 (UTC, inclusive dates).
REF_START = 1_792_281_600.0  # 2026-10-18T00:00:00Z
CUR_START = 1_793_491_200.0  # 2026-11-01T00:00:00Z
REF_DAYS, CUR_DAYS = 14, 7
REFERENCE = "2026-10-18:2026-10-31"
CURRENT = "2026-11-01:2026-11-07"
WINDOW_S = 1800.0

GENDERS = ("F", "M")
AGES = ("18-24", "25-34", "35-49", "50+")
ACTIVITY = ("low", "mid", "high")
ACTIVITY_BIAS = {"low": -1.2, "mid": 0.0, "high": 0.5}
GENRES = ("action", "comedy", "drama", "docs", "kids")


@dataclass
class World:
    users: pd.DataFrame  # user_id, gender, age_bucket, activity, history_len
    items: pd.DataFrame  # item_id, genre, provider, release_ts
    interactions: pd.DataFrame  # training data: user_id, item_id, timestamp, event_type, value
    versions: pd.DataFrame  # model_version, trained_until
    impressions: pd.DataFrame  # the log's impression columns
    clicks: pd.DataFrame  # the log's interaction columns
    # user_id, ts, gender, age_bucket, activity, history_len: what was served
    served_features: pd.DataFrame
    previous_recs: pd.DataFrame  # user_id, position, item_id: the reference model's top k
    meta: dict = field(default_factory=dict)


def generate(
    fault: str = "none",
    *,
    seed: int = 0,
    n_users: int = 4000,
    n_items: int = 400,
    ref_requests: int = 8000,
    cur_requests: int = 5000,
    k: int = 10,
    n_candidates: int = 20,
    epsilon: float = 0.3,
    dim: int = 8,
) -> World:
    """Draw a reference and a current window; `fault` changes the current one (see above)."""

    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}: expected one of {FAULTS}")
    rng = np.random.default_rng(seed)
    cutoff_v1 = REF_START - 3 * DAY

    # ---- users: 15% have no training history (new), the rest do
    gender = rng.choice(len(GENDERS), n_users)
    age = rng.choice(len(AGES), n_users)
    activity = rng.choice(len(ACTIVITY), n_users, p=[0.3, 0.45, 0.25])
    age_c = rng.normal(0, 0.8, (len(AGES), dim))
    gen_c = rng.normal(0, 0.4, (len(GENDERS), dim))
    own = rng.normal(0, 0.7, (n_users, dim))
    u_vec = age_c[age] + gen_c[gender] + own
    # Taste drift keeps each user's marginal taste distribution (so random slates click as
    # before) but decorrelates it from what the model learned.
    keep = 0.5
    u_vec_cur = u_vec
    if fault == "taste_drift":
        fresh_taste = rng.normal(0, 1.0, u_vec.shape) * u_vec.std(axis=0)
        u_vec_cur = keep * u_vec + np.sqrt(1 - keep**2) * fresh_taste
    # The stale world adds a cohort of users who signed up after the model's cutoff.
    late_cohort = rng.random(n_users) < (0.45 if fault == "stale_catalogue" else 0.0)
    has_history = (rng.random(n_users) > 0.1) & ~late_cohort

    # ---- items: genre centroid + own part; lognormal popularity; release times
    genre = rng.choice(len(GENRES), n_items)
    genre_c = rng.normal(0, 0.6, (len(GENRES), dim))
    i_vec = genre_c[genre] + rng.normal(0, 0.6, (n_items, dim))
    pop = rng.lognormal(0.0, 1.0, n_items)
    provider = np.where(rng.random(n_items) < 0.6, "major", "indie")
    release = cutoff_v1 - rng.uniform(30, 400, n_items) * DAY
    # A few items are released between the cutoff and the reference window in every world.
    fresh = rng.random(n_items) < 0.05
    release[fresh] = cutoff_v1 + rng.uniform(0.2, 2.5, fresh.sum()) * DAY
    if fault == "stale_catalogue":
        wave = (rng.random(n_items) < 0.35) & ~fresh
        release[wave] = CUR_START - rng.uniform(0.5, 5, wave.sum()) * DAY
        pop[wave] *= 3.0  # new releases are promoted: they get shown
    pop = pop / pop.sum()
    # The popularity shock hits the items the model's prior pushes most: the top decile.
    shocked = (pop >= np.quantile(pop, 0.9)) & (fault == "popularity_shock")

    users = pd.DataFrame(
        {
            "user_id": np.arange(n_users, dtype=np.int64),
            "gender": np.asarray(GENDERS)[gender],
            "age_bucket": np.asarray(AGES)[age],
            "activity": np.asarray(ACTIVITY)[activity],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int64) + 10_000,
            "genre": np.asarray(GENRES)[genre],
            "provider": provider,
            "release_ts": release.astype(np.int64),
        }
    )

    # ---- training interactions (before the v1 cutoff) for users with history
    hist_users = np.flatnonzero(has_history)
    n_hist = rng.integers(3, 25, len(hist_users))
    tr_u = np.repeat(hist_users, n_hist)
    old_items = np.flatnonzero(release < cutoff_v1 - DAY)
    p_old = pop[old_items] / pop[old_items].sum()
    tr_i = rng.choice(old_items, len(tr_u), p=p_old)
    tr_ts = cutoff_v1 - rng.uniform(1, 120, len(tr_u)) * DAY
    interactions = pd.DataFrame(
        {
            "user_id": tr_u.astype(np.int64),
            "item_id": items["item_id"].to_numpy()[tr_i],
            "timestamp": tr_ts.astype(np.int64),
            "event_type": "click",
            "value": np.ones(len(tr_u), np.float32),
        }
    ).sort_values("timestamp", kind="stable", ignore_index=True)

    # ---- model versions
    cutoff_v2 = CUR_START - 1 * DAY
    versions = pd.DataFrame(
        {"model_version": np.array([1, 2], np.int64), "trained_until": [cutoff_v1, cutoff_v2]}
    )
    noise = {1: 0.35, 2: 1.6}

    user_hist = np.zeros(n_users, np.int64)
    user_hist[hist_users] = n_hist
    # the history length as training saw it: the users table is the training features
    users["history_len"] = user_hist

    def model_scores(
        version, cutoff, user_idx, served_age, served_gender, req_ts, noise_rng, truncated=False
    ):
        knows_user = has_history[user_idx]
        u_model = age_c[served_age] + gen_c[served_gender]
        known = TRUNCATED_KNOWLEDGE if truncated else 1.0
        u_model = u_model + np.where(knows_user[:, None], known * own[user_idx], 0.0)
        known_item = release < cutoff
        i_model = np.where(known_item[:, None], i_vec, genre_c[genre] * 0.2)
        s = u_model @ i_model.T + 0.8 * np.log(pop * n_items)[None, :]
        s = s + noise_rng.normal(0, noise[version], s.shape)
        s[release[None, :] > req_ts[:, None]] = -np.inf  # not released yet
        return s

    def window(start, days, n_req, current):
        wrng = np.random.default_rng(rng.integers(2**32))
        w_act = np.array([1.0, 1.0, 1.0])
        if current and fault == "mix_shift":
            w_act = np.array([5.0, 1.0, 1.0])
        weight = w_act[activity]
        if fault == "stale_catalogue":
            # the late cohort signs up just before the current window
            weight = np.where(late_cohort, 1.0 if current else 0.0, weight)
        u = wrng.choice(n_users, n_req, p=weight / weight.sum())
        ts = np.sort(start + wrng.uniform(0, days * DAY - 2 * WINDOW_S, n_req))
        version = 2 if (current and fault == "worse_model") else 1
        cutoff = cutoff_v2 if version == 2 else cutoff_v1
        served_age = age[u].copy()
        served_gender = gender[u].copy()
        if current and fault == "feature_stuck":
            served_age[:] = 0
        if current and fault == "feature_skew":
            bad = wrng.random(n_req) < 0.7
            served_age[bad] = (served_age[bad] + 1 + wrng.integers(0, 2, bad.sum())) % len(AGES)
        truncated = current and fault == "history_truncated"
        served_hist = user_hist[u]
        if truncated:
            served_hist = np.minimum(served_hist, TRUNCATED_HISTORY)
        scores = model_scores(
            version, cutoff, u, served_age, served_gender, ts, wrng, truncated=truncated
        )
        order = np.argsort(-scores, axis=1)[:, :n_candidates]
        cand_scores = np.take_along_axis(scores, order, axis=1)
        cand_valid = np.isfinite(cand_scores)
        ranking = rank_with_exploration(
            items["item_id"].to_numpy()[order],
            np.where(cand_valid, cand_scores, 0.0),
            k,
            epsilon=epsilon,
            rng=wrng,
            valid=cand_valid,
        )
        shown = ranking.item_ids  # (B, k) raw ids
        idx = shown - 10_000
        aff = np.einsum("bd,bkd->bk", (u_vec_cur if current else u_vec)[u], i_vec[idx])
        exam = 1.0 / (1.0 + np.arange(k)) ** 0.6
        logit = (
            -3.2
            + 0.9 * aff
            + np.vectorize(ACTIVITY_BIAS.get)(np.asarray(ACTIVITY)[activity[u]])[:, None]
        )
        if current:
            logit = logit - 1.5 * shocked[idx]
        p = exam[None, :] * (1.0 / (1.0 + np.exp(-logit)))
        click = wrng.random(p.shape) < p
        delay = wrng.lognormal(np.log(90.0), 1.0, p.shape)
        if current and fault == "delayed_labels":
            slow = wrng.random(p.shape) < 0.6
            delay = np.where(slow, delay * 40.0, delay)
        req_ids = np.asarray([f"{'c' if current else 'r'}{i:08d}" for i in range(n_req)], object)
        imp_ts = np.repeat(ts, k).reshape(n_req, k)
        return {
            "u": u,
            "ts": ts,
            "req": req_ids,
            "shown": shown,
            "scores": ranking.scores,
            "prop": ranking.propensity,
            "version": version,
            "click": click,
            "click_ts": imp_ts + delay,
            "served_age": served_age,
            "served_gender": served_gender,
            "served_hist": served_hist,
        }

    ref = window(REF_START, REF_DAYS, ref_requests, current=False)
    cur = window(CUR_START, CUR_DAYS, cur_requests, current=True)

    imps, clicks, feats = [], [], []
    for w in (ref, cur):
        b = len(w["u"])
        pos = np.broadcast_to(np.arange(k), (b, k))
        req_bk = np.broadcast_to(w["req"][:, None], (b, k))
        imps.append(
            pd.DataFrame(
                {
                    "event_id": [
                        f"{r}:{p}" for r, p in zip(req_bk.ravel(), pos.ravel(), strict=True)
                    ],
                    "request_id": req_bk.ravel(),
                    "user_id": np.repeat(w["u"], k).astype(np.int64),
                    "item_id": w["shown"].ravel().astype(np.int64),
                    "position": pos.ravel().astype(np.int64),
                    "score": w["scores"].ravel().astype(np.float64),
                    "model_version": np.full(b * k, w["version"], np.int64),
                    "propensity": w["prop"].ravel(),
                    "ts": np.repeat(w["ts"], k),
                }
            )
        )
        c = w["click"].ravel()
        clicks.append(
            pd.DataFrame(
                {
                    "event_id": [
                        f"x{r}:{p}" for r, p in zip(req_bk.ravel()[c], pos.ravel()[c], strict=True)
                    ],
                    "user_id": np.repeat(w["u"], k)[c].astype(np.int64),
                    "item_id": w["shown"].ravel()[c].astype(np.int64),
                    "type": "click",
                    "value": np.ones(int(c.sum())),
                    "ts": w["click_ts"].ravel()[c],
                    "request_id": req_bk.ravel()[c],
                }
            )
        )
        feats.append(
            pd.DataFrame(
                {
                    "user_id": w["u"].astype(np.int64),
                    "ts": w["ts"],
                    "gender": np.asarray(GENDERS)[w["served_gender"]],
                    "age_bucket": np.asarray(AGES)[w["served_age"]],
                    "activity": np.asarray(ACTIVITY)[activity[w["u"]]],
                    "history_len": w["served_hist"].astype(np.int64),
                }
            )
        )

    # The reference model's top k for every user, as `northstar recommend --all-users` gives.
    all_u = np.arange(n_users)
    prev = model_scores(
        1,
        cutoff_v1,
        all_u,
        age,
        gender,
        np.full(n_users, CUR_START + CUR_DAYS * DAY),
        np.random.default_rng(seed + 1),
    )
    top = np.argsort(-prev, axis=1)[:, :k]
    previous_recs = pd.DataFrame(
        {
            "user_id": np.repeat(all_u, k).astype(np.int64),
            "position": np.tile(np.arange(k), n_users).astype(np.int64),
            "item_id": (top.ravel() + 10_000).astype(np.int64),
        }
    )
    clicks_df = pd.concat(clicks, ignore_index=True).sort_values("ts", ignore_index=True)
    return World(
        users=users,
        items=items,
        interactions=interactions,
        versions=versions,
        impressions=pd.concat(imps, ignore_index=True),
        clicks=clicks_df,
        served_features=pd.concat(feats, ignore_index=True),
        previous_recs=previous_recs,
        meta={"seed": seed, "reference": REFERENCE, "current": CURRENT, "window_s": WINDOW_S},
    )


def write_world(world: World, folder: str | Path, *, batch: int = 20_000) -> dict[str, Path]:
    """Write the log, run the real join, and write the side tables. Returns name -> path.

    Layout: events.db, labels/ (the join's output, every window closed), data/users.parquet,
    data/items.parquet, data/interactions.parquet, versions.json, served_features.parquet,
    previous_recs.parquet.
    """

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    paths = {
        "log": folder / "events.db",
        "labels": folder / "labels",
        "data": folder / "data",
        "versions": folder / "versions.json",
        "served_features": folder / "served_features.parquet",
        "previous_recs": folder / "previous_recs.parquet",
    }
    with SqliteEventLog(paths["log"], max_future_s=10 * 365 * DAY) as log:
        imps = world.impressions
        for s in range(0, len(imps), batch):
            part = imps.iloc[s : s + batch]
            log.write_impressions({c: part[c].to_numpy() for c in part.columns})
        clicks = world.clicks
        for s in range(0, len(clicks), batch):
            part = clicks.iloc[s : s + batch]
            log.write_interactions({c: part[c].to_numpy() for c in part.columns})
    run_join(
        JoinConfig(
            log=str(paths["log"]), out=str(paths["labels"]), window_s=WINDOW_S, as_of=float("inf")
        )
    )
    world.users.to_parquet(paths["data"] / "users.parquet", index=False)
    world.items.to_parquet(paths["data"] / "items.parquet", index=False)
    world.interactions.to_parquet(paths["data"] / "interactions.parquet", index=False)
    paths["versions"].write_text(
        json.dumps(
            [
                {"model_version": int(v), "trained_until": float(t)}
                for v, t in world.versions.itertuples(index=False)
            ]
        )
    )
    world.served_features.to_parquet(paths["served_features"], index=False)
    world.previous_recs.to_parquet(paths["previous_recs"], index=False)
    return paths
