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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import pandas as pd

from common.retry import RetryPolicy, retrying
from feedback.join import JOINED, LATE, UNATTRIBUTED, attribute, new_labels
from serving.client import RecommenderClient
from serving.ingest_batches import IngestResult
from serving.ingest_client import send_interactions
from simulator.behaviour import ClickMemory, interactions, with_noise
from simulator.config import SimReport, SimulateConfig
from training.synth import World

log = logging.getLogger(__name__)


class Sender(Protocol):
    def __call__(self, columns: dict[str, np.ndarray]) -> IngestResult: ...


def simulate(
    cfg: SimulateConfig,
    *,
    client_factory: Callable[[], Any] | None = None,
    sender: Sender | None = None,
    memory: ClickMemory | None = None,
    clock: Callable[[], float] = time.time,
) -> SimReport:
    """Run the loop once. `client_factory` makes one recommend client per thread (default
    serving.client.RecommenderClient on cfg.url); `sender` sends interaction columns
    (default: the Triton `feedback` model at cfg.url). `clock` (unix seconds) stamps
    requests, responses and failed attempts: the event times and `error_window_s` follow
    it, so a test can pass a fake one and assert exact values."""

    t_start = time.perf_counter()
    world = World.load(cfg.world)
    rng = np.random.default_rng([cfg.seed, 7])
    slate_users = draw_users(world, cfg.users, cfg.requests, rng)

    if client_factory is None:
        client_factory = _default_client_factory(cfg)
    if sender is None:
        sender = _default_sender(cfg)

    report = SimReport(requests=cfg.requests)
    served = _fetch_all(cfg, world.user_id_of(slate_users), client_factory, report, clock)
    slates = [s for s in served if s is not None]
    report.requests_ok = len(slates)
    report.requests_failed = cfg.requests - len(slates)
    report.items_returned = int(sum(len(s[0].item_ids) for s in slates))
    report.users_served = len({int(s[0].user_id) for s in slates})
    report.cold_start = int(sum(bool(s[0].cold_start) for s in slates))
    report.request_ids = [s[0].request_id for s in slates]

    imps, inter = interactions(cfg, world, slates, rng, report, memory)
    n_valid = len(inter)
    columns, kinds, inter = with_noise(cfg, world, inter, imps, rng, report)
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


def draw_users(world, users: int, requests: int, rng: np.random.Generator) -> np.ndarray:
    """Who sends each of a call's `requests`, as dense user indices: a population of
    `users` drawn by activity rate, then requests from it by rate. `simulate` draws with
    `default_rng([seed, 7])` before anything else, so `studies.replay` can rebuild a run's
    request stream from its seeds alone."""
    rate = world.user_rate / world.user_rate.sum()
    n_pop = min(users, world.n_users)
    population = rng.choice(world.n_users, size=n_pop, replace=False, p=rate)
    w = world.user_rate[population]
    return rng.choice(population, size=requests, p=w / w.sum())


def _fetch_all(
    cfg: SimulateConfig,
    user_ids: np.ndarray,
    factory,
    report: SimReport,
    clock: Callable[[], float] = time.time,
):
    """One slate per request, from `concurrency` threads; None where it failed.

    A slate is (recommendation, t_sent, t_resp), both times from `clock`."""
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
    failures: list[float] = []  # clock time of each failed attempt

    def on_failure(_exc: BaseException) -> None:
        with lock:
            failures.append(clock())

    def on_retry(exc: BaseException, attempt: int) -> None:
        with lock:
            report.retries += 1
        log.debug("request retry %d after: %s", attempt, exc)

    def one(i: int):
        try:
            for attempt in retrying(policy, on_retry=on_retry, on_failure=on_failure):
                with attempt:
                    t_sent = clock()
                    (rec,) = client().recommend([int(user_ids[i])], cfg.k)
            return rec, t_sent, clock()
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


def retry_policy(cfg: SimulateConfig) -> RetryPolicy:
    return RetryPolicy(
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        max_backoff_s=cfg.max_backoff_s,
        deadline_s=cfg.retry_deadline_s,
    )


def _default_client_factory(cfg: SimulateConfig):
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
