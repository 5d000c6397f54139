"""How simulated users behave: the world's click model turned into timed interaction events.

For each returned slate the world's position-based click model decides the clicks:
P(click) = examination(position) * relevance(user, item). A click may be followed by a
watch (value = watch seconds) and a like, as in the world's offline log. Events get
delayed timestamps (click = response time + a lognormal delay), so some land after the
attribution window; re-sends, malformed events and orphan clicks exercise dedupe and
quarantine.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pandas as pd

from feedback.ids import uuid7_batch
from simulator.config import MALFORMED

log = logging.getLogger(__name__)


class ClickMemory:
    """What each simulated user clicked in earlier simulate() calls: (user_idx, item_idx).

    Thread-safe, because the scenario's traffic thread adds while others read its size.
    Clicks of one call count from the next call on (the call samples them all at once).
    """

    def __init__(self) -> None:
        self._pairs: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pairs)

    def seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        with self._lock:
            pairs = self._pairs
            return np.fromiter(
                ((int(u), int(i)) in pairs for u, i in zip(users, items, strict=True)),
                dtype=bool,
                count=len(users),
            )

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        with self._lock:
            self._pairs.update(zip(map(int, users), map(int, items), strict=True))


def interactions(
    cfg, world, slates, rng, report, memory: ClickMemory | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Impressions as the simulator saw them, and the interaction events they cause."""
    rows = []
    for rec, t_sent, t_resp in slates:
        n = len(rec.item_ids)
        rows.append(
            pd.DataFrame(
                {
                    "request_id": rec.request_id,
                    "user_id": int(rec.user_id),
                    "item_id": np.asarray(rec.item_ids, np.int64),
                    "position": np.arange(n),
                    "model_version": int(rec.model_version),
                    "t_sent": t_sent,
                    "t_resp": t_resp,
                }
            )
        )
    imps = (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(
            columns=[
                "request_id",
                "user_id",
                "item_id",
                "position",
                "model_version",
                "t_sent",
                "t_resp",
            ]
        )
    )
    in_world = (
        imps["item_id"].between(1, world.n_items) & imps["user_id"].between(1, world.n_users)
    ).to_numpy()
    if not in_world.all():
        log.warning(
            "%d returned items or users are not in the world; they get no clicks",
            int((~in_world).sum()),
        )
    u = world.user_index(imps["user_id"].to_numpy()[in_world])
    i = world.item_index(imps["item_id"].to_numpy()[in_world])
    pos = imps["position"].to_numpy()[in_world]
    # Taste at the end of the world's period: the simulator plays "today" in that world.
    now_w = world.cfg.end_ts
    clicked = np.zeros(len(imps), dtype=bool)
    hit = world.sample_clicks(u, i, pos, now_w, rng)
    if memory is not None and cfg.rewatch_factor < 1.0 and len(memory):
        again = memory.seen(u, i)
        report.rewatch_impressions = int(again.sum())
        hit &= ~again | (rng.random(len(hit)) < cfg.rewatch_factor)
    clicked[in_world] = hit
    if memory is not None:
        memory.add(u[hit], i[hit])
    c = imps[clicked].reset_index(drop=True)
    report.clicks = len(c)
    if not len(c):
        return imps, empty_interactions()

    latency = (c["t_resp"] - c["t_sent"]).to_numpy()
    delay = np.minimum(
        rng.lognormal(math.log(cfg.delay_median_s), cfg.delay_sigma, len(c)), cfg.max_delay_s
    )
    click_off = _off_the_edge(delay, latency, cfg.window_s)
    report.delay_after_window = int((click_off > cfg.window_s).sum())
    rel = world.relevance(
        world.user_index(c["user_id"].to_numpy()), world.item_index(c["item_id"].to_numpy()), now_w
    )
    completion = np.clip(rel + 0.2 * rng.standard_normal(len(c)), 0.01, 1.0)
    duration = world.item_duration_s[world.item_index(c["item_id"].to_numpy())]
    watch_s = completion * duration
    watched = completion >= 0.15  # below: a bounce, the click is the only event
    liked = watched & (completion > 0.8) & (rng.random(len(c)) < cfg.like_share)
    keep_req = rng.random(len(c)) < cfg.request_id_share
    t0 = c["t_resp"].to_numpy()
    # A watch event carries the session's watch seconds and is sent with the player's
    # first progress report, ~30 s after the click (a simplification: a real player keeps
    # reporting; the join keeps the max value, so repeated reports would not double count).
    watch_off = _off_the_edge(click_off + cfg.watch_report_s, latency, cfg.window_s)
    like_off = _off_the_edge(watch_off + 1.0, latency, cfg.window_s)

    parts = []
    for kind, mask, off, value in (
        ("click", np.ones(len(c), bool), click_off, np.ones(len(c))),
        ("watch", watched, watch_off, watch_s),
        ("like", liked, like_off, np.ones(len(c))),
    ):
        parts.append(
            pd.DataFrame(
                {
                    "user_id": c["user_id"].to_numpy()[mask],
                    "item_id": c["item_id"].to_numpy()[mask],
                    "type": kind,
                    "value": value[mask],
                    "ts": t0[mask] + off[mask],
                    "request_id": np.where(keep_req, c["request_id"].to_numpy(), "")[mask],
                }
            )
        )
    inter = pd.concat(parts, ignore_index=True).sort_values("ts", kind="stable")
    inter = inter.reset_index(drop=True)
    inter.insert(0, "event_id", uuid7_batch(len(inter), ts=inter["ts"].to_numpy(), rng=rng))
    report.events = inter["type"].value_counts().to_dict()
    return imps, inter


def _off_the_edge(offset: np.ndarray, latency: np.ndarray, window_s: float) -> np.ndarray:
    """Move offsets that the response latency could push across the window edge to 1 s
    past it, so that joined-vs-late does not depend on when the server stamped the
    impression (somewhere between request sent and response received)."""
    ambiguous = (offset > window_s - latency - 1.0) & (offset < window_s + 1.0)
    return np.where(ambiguous, window_s + 1.0, offset)


def with_noise(cfg, world, inter, imps, rng, report):
    """The rows to send: valid events, orphans, re-sends and malformed ones, in ts order."""
    frames = [inter.assign(_kind="valid")]
    n = len(inter)
    n_orphan = round(cfg.orphan_share * n)
    if n_orphan:
        shown = set(zip(imps["user_id"], imps["item_id"], strict=True))
        users = rng.choice(imps["user_id"].to_numpy(), n_orphan)
        items = world.item_id_of(rng.integers(0, world.n_items, n_orphan))
        ok = np.array([(u, i) not in shown for u, i in zip(users, items, strict=True)], bool)
        t = time.time() + rng.uniform(0, cfg.window_s, ok.sum())
        orphans = pd.DataFrame(
            {
                "event_id": uuid7_batch(int(ok.sum()), ts=t, rng=rng),
                "user_id": users[ok],
                "item_id": items[ok],
                "type": "click",
                "value": 1.0,
                "ts": t,
                "request_id": "",
            }
        )
        inter = pd.concat([inter, orphans], ignore_index=True)
        frames = [inter.assign(_kind="valid")]
        report.orphans_sent = len(orphans)
    n_dup = round(cfg.resend_share * len(inter))
    if n_dup:
        frames.append(
            inter.sample(n=n_dup, random_state=rng.integers(2**31)).assign(_kind="resend")
        )
        report.resent = n_dup
    n_bad = round(cfg.malformed_share * len(inter))
    if n_bad and len(inter):
        bad = inter.sample(n=n_bad, replace=True, random_state=rng.integers(2**31)).copy()
        bad["event_id"] = uuid7_batch(n_bad, ts=bad["ts"].to_numpy(), rng=rng)
        bad = bad.astype({"item_id": np.int64, "ts": np.float64, "type": object})
        for j, (col, value, _reason) in enumerate(MALFORMED):
            bad.iloc[j :: len(MALFORMED), bad.columns.get_loc(col)] = value
        frames.append(bad.assign(_kind="malformed"))
        report.malformed_sent = n_bad
    sent = pd.concat(frames, ignore_index=True)
    # Re-sends arrive later than the original; everything else in event-time order.
    order_key = sent["ts"].fillna(0).to_numpy() + np.where(sent["_kind"] == "resend", 60.0, 0)
    sent = sent.iloc[np.argsort(order_key, kind="stable")].reset_index(drop=True)
    report.events_sent = len(sent)
    cols = {
        c: sent[c].to_numpy()
        for c in ("event_id", "user_id", "item_id", "type", "value", "ts", "request_id")
    }
    cols["value"] = cols["value"].astype(np.float64)
    # `inter` now holds every valid event, orphans included (unattributed by design).
    return cols, sent["_kind"].to_numpy(), inter


def empty_interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": np.zeros(0, object),
            "user_id": np.zeros(0, np.int64),
            "item_id": np.zeros(0, np.int64),
            "type": np.zeros(0, object),
            "value": np.zeros(0),
            "ts": np.zeros(0),
            "request_id": np.zeros(0, object),
        }
    )
