"""Closed-loop simulator: users from a synthetic world's ground truth use the live server.

    northstar simulate --world DIR --users 500 --requests 2000 [--url localhost:8001]

1. Draw a population of `users` from the world, weighted by activity, and `requests`
   slates (a user each, again by activity). All draws come from `seed`.
2. Ask the server for each slate (serving.client.RecommenderClient) from `concurrency`
   threads, with retries and exponential backoff; count what failed.
3. For each returned slate, the world's position-based click model decides the clicks:
   P(click) = examination(position) * relevance(user, item). A click may be followed by a
   watch (value = watch seconds) and a like, as in the world's offline log.
4. Events get delayed timestamps: click = response time + a lognormal delay, so some land
   after the attribution window (delayed labels); watch and like follow the click.
5. Interactions are sent to the `feedback` ingest model in batches (plus optional
   re-sends, malformed events and orphan clicks, to exercise dedupe and quarantine).

The report carries what reconciliation needs: items returned (= impressions the server
must have logged) and, per interaction event, the status the join must give it. The
expected statuses come from the join's own `attribute()` applied to the simulator's view
(impression time = response time). A delay within the response latency of the window
edge is moved 1 s past it, so statuses of events with a request_id are exact.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from feedback.events import INTERACTION
from feedback.explore import rank_with_exploration
from feedback.hook import ImpressionLogger
from feedback.ids import uuid7_batch
from feedback.ingest_client import IngestResult, send_interactions
from feedback.join import JOINED, LATE, UNATTRIBUTED, attribute, new_labels
from feedback.sink import EventSink
from northstar.retry import RetryPolicy, retrying

log = logging.getLogger(__name__)

# Malformed events the simulator can inject, with the quarantine reason each must get.
MALFORMED = (
    ("type", "purchase", "type: not one of click|watch|like"),
    ("item_id", -5, "item_id: negative"),
    ("ts", float("nan"), "ts: missing"),
    ("event_id", "", "event_id: empty"),
)


@dataclass(frozen=True)
class SimulateConfig:
    world: str  # folder with world.npz + world.json (northstar data synth --out)
    users: int = 500  # population size, drawn by activity rate
    requests: int = 2000  # slates asked for (one user each)
    url: str | None = None  # default: the protocol's localhost port
    protocol: Literal["grpc", "http"] = "grpc"
    seed: int = 0
    k: int = 10
    concurrency: int = 8  # client threads; one client per thread
    # Only used to keep the expected statuses exact (see the module docstring); the join
    # has its own window, which must be the same.
    window_s: float = 1800.0
    # Median 90 s, sigma 1.5: most clicks in the first minutes, a few percent after 30 min.
    delay_median_s: float = 90.0
    delay_sigma: float = 1.5
    max_delay_s: float = 6 * 3600.0  # well inside the log's one-day future bound
    request_id_share: float = 0.8  # clients that keep the request id; the rest by (user, item)
    like_share: float = 0.3  # P(like | watched more than 80%)
    watch_report_s: float = 30.0  # watch event time after its click (first progress report)
    resend_share: float = 0.01  # at-least-once delivery: events sent twice
    malformed_share: float = 0.0  # extra malformed events, per valid event
    orphan_share: float = 0.0  # extra clicks on items never shown to the user
    retries: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    # Retry each request for up to this long instead of `retries` times: a client that
    # must ride out a server restart (hardening test, soak) sets it to tens of seconds.
    retry_deadline_s: float | None = None
    send_batch: int = 512
    timeout_s: float = 30.0
    # A user clicks an item they already clicked earlier in the simulation at this fraction
    # of the usual rate (people rarely rewatch a film right away). It needs a ClickMemory
    # that lives across simulate() calls (canary.scenario.Traffic keeps one); 1.0 = no memory.
    rewatch_factor: float = 0.2


@dataclass
class SimReport:
    requests: int = 0  # slates asked for
    requests_ok: int = 0
    requests_failed: int = 0  # after retries
    retries: int = 0
    failed_attempts: int = 0  # attempts that raised, retried or not
    # Wall-clock span from the first failed attempt to the last one (0: none failed): how
    # long the server was unreachable as this client saw it.
    error_window_s: float = 0.0
    items_returned: int = 0  # = impressions the server must have logged for these requests
    users_served: int = 0
    cold_start: int = 0
    clicks: int = 0
    events: dict[str, int] = field(default_factory=dict)  # unique valid events by type
    events_sent: int = 0  # every row sent: valid + re-sent + malformed + orphans
    resent: int = 0
    malformed_sent: int = 0
    orphans_sent: int = 0
    accepted: int = 0  # unique valid events acknowledged (incl. orphans)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows
    send_failed_batches: int = 0
    send_retries: int = 0
    expected: dict[str, int] = field(default_factory=dict)  # joined / late / unattributed
    expected_exact: bool = True  # False when some events have no request_id
    delay_after_window: int = 0  # clicks whose delay put them past the window
    rewatch_impressions: int = 0  # items shown again to a user who had clicked them
    seconds: float = 0.0
    request_ids: list[str] = field(default_factory=list, repr=False)
    event_ids: list[str] = field(default_factory=list, repr=False)  # accepted, unique
    expected_by_event: dict[str, str] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("request_ids", "event_ids", "expected_by_event"):
            d.pop(k)
        return d


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


class Slate(Protocol):
    user_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    model_version: int
    request_id: str
    cold_start: bool


class Sender(Protocol):
    def __call__(self, columns: dict[str, np.ndarray]) -> IngestResult: ...


# ---------------------------------------------------------------------------- the loop


def simulate(
    cfg: SimulateConfig,
    *,
    client_factory: Callable[[], Any] | None = None,
    sender: Sender | None = None,
    memory: ClickMemory | None = None,
) -> SimReport:
    """Run the loop once. `client_factory` makes one recommend client per thread (default
    serving.client.RecommenderClient on cfg.url); `sender` sends interaction columns
    (default: the Triton `feedback` model at cfg.url)."""
    from training.synth import World

    t_start = time.perf_counter()
    world = World.load(cfg.world)
    rng = np.random.default_rng([cfg.seed, 7])
    rate = world.user_rate / world.user_rate.sum()
    n_pop = min(cfg.users, world.n_users)
    population = rng.choice(world.n_users, size=n_pop, replace=False, p=rate)
    w = world.user_rate[population]
    slate_users = rng.choice(population, size=cfg.requests, p=w / w.sum())  # (R,) dense idx

    if client_factory is None:
        client_factory = _default_client_factory(cfg)
    if sender is None:
        sender = _default_sender(cfg)

    report = SimReport(requests=cfg.requests)
    served = _fetch_all(cfg, world.user_id_of(slate_users), client_factory, report)
    slates = [s for s in served if s is not None]
    report.requests_ok = len(slates)
    report.requests_failed = cfg.requests - len(slates)
    report.items_returned = int(sum(len(s[0].item_ids) for s in slates))
    report.users_served = len({int(s[0].user_id) for s in slates})
    report.cold_start = int(sum(bool(s[0].cold_start) for s in slates))
    report.request_ids = [s[0].request_id for s in slates]

    imps, inter = _interactions(cfg, world, slates, rng, report, memory)
    n_valid = len(inter)
    columns, kinds, inter = _with_noise(cfg, world, inter, imps, rng, report)
    orphan_ids = set(inter["event_id"].iloc[n_valid:])
    res = sender(columns)
    report.send_failed_batches, report.send_retries = res.failed_batches, res.retries
    report.rejected = res.reason_counts()

    # Expected statuses: the join's rules on the simulator's view, for acked unique events.
    acked = res.accepted & (kinds == "valid")
    acked_ids = set(np.asarray(columns["event_id"], dtype=object)[acked].tolist())
    expected_rows = inter[inter["event_id"].isin(acked_ids)].reset_index(drop=True)
    labels = _labels_view(imps)
    status = attribute(expected_rows, labels, window_s=cfg.window_s)
    report.accepted = len(expected_rows)
    report.event_ids = expected_rows["event_id"].tolist()
    report.expected_by_event = dict(zip(status["event_id"], status["status"], strict=True))
    counts = status["status"].value_counts()
    report.expected = {s: int(counts.get(s, 0)) for s in (JOINED, LATE, UNATTRIBUTED)}
    # Exact when every event either has a request_id or is an orphan (never shown at all).
    orphan = expected_rows["event_id"].isin(orphan_ids)
    report.expected_exact = bool(((expected_rows["request_id"] != "") | orphan).all())
    report.seconds = time.perf_counter() - t_start
    return report


def _fetch_all(cfg: SimulateConfig, user_ids: np.ndarray, factory, report: SimReport):
    """One slate per request, from `concurrency` threads; None where it failed."""
    local = threading.local()
    lock = threading.Lock()
    clients: list[Any] = []

    def client():
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = factory()
            with lock:
                clients.append(c)
        return c

    policy = retry_policy(cfg)
    failures: list[float] = []  # wall-clock time of each failed attempt

    def on_failure(_exc: BaseException) -> None:
        with lock:
            failures.append(time.time())

    def on_retry(exc: BaseException, attempt: int) -> None:
        with lock:
            report.retries += 1
        log.debug("request retry %d after: %s", attempt, exc)

    def one(i: int):
        try:
            for attempt in retrying(policy, on_retry=on_retry, on_failure=on_failure):
                with attempt:
                    t_sent = time.time()
                    (rec,) = client().recommend([int(user_ids[i])], cfg.k)
            return rec, t_sent, time.time()
        except Exception as exc:
            log.warning("request %d failed after retries: %s", i, exc)
            return None

    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
            return list(pool.map(one, range(len(user_ids))))
    finally:
        report.failed_attempts = len(failures)
        report.error_window_s = round(max(failures) - min(failures), 3) if failures else 0.0
        for c in clients:
            close = getattr(c, "close", None)
            if close:
                close()


def _interactions(
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
        return imps, _empty_interactions()

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


def _with_noise(cfg, world, inter, imps, rng, report):
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


def _labels_view(imps: pd.DataFrame) -> pd.DataFrame:
    """The simulator's impressions in the join's label layout (impression ts = response)."""
    view = pd.DataFrame(
        {
            "event_id": (
                imps["request_id"].astype(str) + ":" + imps["position"].astype(str)
            ).to_numpy(dtype=object),
            "request_id": imps["request_id"].to_numpy(dtype=object),
            "user_id": imps["user_id"].to_numpy(np.int64),
            "item_id": imps["item_id"].to_numpy(),
            "position": imps["position"].to_numpy(np.int64),
            "score": 0.0,
            "model_version": imps["model_version"].to_numpy(np.int64),
            "propensity": 1.0,
            "ts": imps["t_resp"].to_numpy(np.float64),
        }
    )
    return new_labels(view)


def _empty_interactions() -> pd.DataFrame:
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


def retry_policy(cfg: SimulateConfig) -> RetryPolicy:
    return RetryPolicy(
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        max_backoff_s=cfg.max_backoff_s,
        deadline_s=cfg.retry_deadline_s,
    )


def _default_client_factory(cfg: SimulateConfig):
    from serving.client import RecommenderClient

    return lambda: RecommenderClient(cfg.url, protocol=cfg.protocol, timeout_s=cfg.timeout_s)


def _default_sender(cfg: SimulateConfig) -> Sender:
    def send(columns: dict[str, np.ndarray]) -> IngestResult:
        return send_interactions(
            cfg.url,
            columns,
            protocol=cfg.protocol,
            batch_size=cfg.send_batch,
            retry=retry_policy(cfg),
            timeout_s=cfg.timeout_s,
        )

    return send


# ---------------------------------------------------------------------------- offline doubles


class SinkSender:
    """Sends straight into an EventSink, in batches: the loop without a server."""

    def __init__(self, sink: EventSink, batch: int = 512) -> None:
        self.sink, self.batch = sink, batch

    def __call__(self, columns: dict[str, np.ndarray]) -> IngestResult:
        n = len(columns["event_id"])
        accepted, reasons = np.zeros(n, bool), [""] * n
        res = IngestResult(accepted, reasons)
        for s in range(0, n, self.batch):
            sl = slice(s, min(n, s + self.batch))
            r = self.sink.write_interactions({k: v[sl] for k, v in columns.items()})
            accepted[sl], reasons[sl] = r.accepted, r.reasons
            res.batches += 1
        return res


@dataclass(frozen=True)
class LocalSlate:
    user_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    model_version: int
    request_id: str
    cold_start: bool = False


class LocalRecommender:
    """An in-process stand-in for `recommend`: ranks by the world's noisy truth, explores
    with ε, logs impressions through the same ImpressionLogger. For tests and dry runs."""

    def __init__(
        self,
        world_dir: str | Path,
        sink: EventSink,
        *,
        epsilon: float = 0.1,
        overfetch: int = 30,
        noise: float = 1.0,
        seed: int = 0,
        model_version: int = 1,
    ) -> None:
        from training.synth import World

        self.world = World.load(world_dir)
        self.logger = ImpressionLogger(sink)
        self.epsilon, self.overfetch, self.noise = epsilon, overfetch, noise
        self.model_version = model_version
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def recommend(self, user_ids, k: int = 10) -> list[LocalSlate]:
        uid = np.atleast_1d(np.asarray(user_ids, np.int64))
        with self.lock:
            u = self.world.user_index(uid)
            truth = self.world.oracle_scores(u, self.world.cfg.end_ts)  # (B, I)
            noisy = truth + self.noise * self.rng.standard_normal(truth.shape)
            top = np.argsort(-noisy, axis=1)[:, : self.overfetch]  # (B, N)
            cand = self.world.item_id_of(top)
            scores = np.take_along_axis(noisy, top, axis=1).astype(np.float32)
            r = rank_with_exploration(cand, scores, k, epsilon=self.epsilon, rng=self.rng)
            req = uuid7_batch(len(uid), rng=self.rng)
            rows, pos = np.nonzero(r.item_ids >= 0)
            self.logger.write(
                _Served(
                    request_id=req[rows],
                    user_id=uid[rows],
                    item_id=r.item_ids[rows, pos],
                    position=pos,
                    score=r.scores[rows, pos],
                    model_version=np.full(len(rows), self.model_version),
                    propensity=r.propensity[rows, pos],
                )
            )
        return [
            LocalSlate(
                int(uid[b]),
                r.item_ids[b][r.item_ids[b] >= 0],
                r.scores[b][r.item_ids[b] >= 0],
                self.model_version,
                str(req[b]),
            )
            for b in range(len(uid))
        ]

    def close(self) -> None:
        pass


@dataclass
class _Served:
    request_id: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    position: np.ndarray
    score: np.ndarray
    model_version: np.ndarray
    propensity: np.ndarray


# ---------------------------------------------------------------------------- reconciliation


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
    from feedback.join import JoinConfig, read_labels, read_statuses, run_join
    from feedback.sink import open_source

    src = open_source(log_path)
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
