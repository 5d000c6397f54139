"""The closed loop without a server: in-process recommender, ingest straight into the log."""

import threading
import time

import numpy as np
import pytest

from feedback.metrics import compute_metrics
from feedback.sink import open_sink
from simulator import SimulateConfig, reconcile, reconcile_many, simulate
from simulator.config import MALFORMED
from simulator.doubles import LocalRecommender, SinkSender
from training.synth import SynthConfig, World


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    World.generate(SynthConfig.preset("tiny")).save(d)
    return d


def _run(world_dir, log_path, **over):
    sink = open_sink(log_path)
    local = LocalRecommender(world_dir, sink, epsilon=0.2, seed=1)
    cfg = SimulateConfig(
        world=str(world_dir), users=80, requests=150, seed=5, **{"concurrency": 3, **over}
    )
    return simulate(cfg, client_factory=lambda: local, sender=SinkSender(sink)), sink


def test_counts_reconcile_exactly(world_dir, tmp_path):
    rep, sink = _run(
        world_dir,
        tmp_path / "events.db",
        request_id_share=1.0,
        malformed_share=0.04,
        orphan_share=0.03,
        resend_share=0.05,
    )
    assert rep.requests_ok == 150 and rep.requests_failed == 0
    assert rep.items_returned == 150 * 10
    assert rep.clicks > 0 and rep.delay_after_window > 0  # some labels arrive late
    assert rep.expected_exact and rep.expected["unattributed"] == rep.orphans_sent > 0
    rec = reconcile(rep, log_path=str(sink.path), labels_dir=str(tmp_path / "labels"))
    assert rec["impressions_logged"] == rep.items_returned
    assert rec["interactions_in_log"] == rep.accepted  # re-sends stored once
    assert rec["statuses"] == rep.expected and rec["status_mismatches"] == 0
    assert sum(rec["statuses"].values()) == rep.accepted
    assert rec["quarantine"] == rep.rejected
    assert set(rep.rejected) == {reason for _, _, reason in MALFORMED}
    assert rec["ok"]


def test_the_loop_without_request_ids_still_sums_up(world_dir, tmp_path):
    rep, sink = _run(world_dir, tmp_path / "events.db", request_id_share=0.0)
    assert not rep.expected_exact
    rec = reconcile(rep, log_path=str(sink.path), labels_dir=str(tmp_path / "labels"))
    assert sum(rec["statuses"].values()) == rep.accepted and rec["ok"]


def test_same_seed_same_clicks(world_dir, tmp_path):
    # One thread, so that the in-process server also answers in the same order.
    a, _ = _run(world_dir, tmp_path / "a.db", concurrency=1)
    b, _ = _run(world_dir, tmp_path / "b.db", concurrency=1)
    assert (a.clicks, a.events, a.expected) == (b.clicks, b.events, b.expected)


def test_failed_requests_are_retried_then_counted(world_dir, tmp_path):
    sink = open_sink(tmp_path / "events.db")
    local = LocalRecommender(world_dir, sink, seed=1)
    calls = {"n": 0}

    class Flaky:
        def recommend(self, user_ids, k):
            calls["n"] += 1
            if calls["n"] % 3 == 1:  # every third call fails once
                raise ConnectionError("server went away")
            if int(user_ids[0]) % 10 == 0:  # some users always fail
                raise ConnectionError("always")
            return local.recommend(user_ids, k)

    cfg = SimulateConfig(
        world=str(world_dir),
        users=80,
        requests=60,
        concurrency=1,
        seed=2,
        retries=2,
        backoff_s=0.001,
    )
    rep = simulate(cfg, client_factory=Flaky, sender=SinkSender(sink))
    assert rep.retries > 0 and rep.requests_failed > 0
    assert rep.requests_ok + rep.requests_failed == 60
    assert rep.failed_attempts == rep.retries + rep.requests_failed and rep.error_window_s > 0
    rec = reconcile(rep, log_path=str(sink.path), labels_dir=str(tmp_path / "labels"))
    assert rec["impressions_logged"] == rep.items_returned  # failed requests logged nothing


def test_exploration_shows_up_in_the_logged_propensities(world_dir, tmp_path):
    rep, sink = _run(world_dir, tmp_path / "events.db")
    prop = sink.read("impression")["propensity"].to_numpy()
    # overfetch 30, ε = 0.2: greedy slots 0.8 + 0.2/30, other explored slots 0.2/30
    assert np.isclose(prop, 0.8 + 0.2 / 30).mean() > 0.75
    assert np.isclose(prop, 0.2 / 30).any()
    reconcile(rep, log_path=str(sink.path), labels_dir=str(tmp_path / "labels"))
    from feedback.join import read_labels

    m = compute_metrics(read_labels(tmp_path / "labels"))
    assert m["by_version"][0]["impressions"] == rep.items_returned


class FakeClock:
    """A clock that moves only when told: times in the report are exact."""

    def __init__(self, start: float) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self.now += seconds
            return self.now


def test_a_retry_deadline_rides_out_an_outage(world_dir, tmp_path):
    """A server that is down for its first 0.4 s (a restart, in miniature): with a deadline
    the client retries through it, loses nothing, and reports how long it saw errors. Each
    attempt takes 0.1 s on a fake clock, so the attempts at 0.1, 0.2, 0.3 and 0.4 s fail and
    the error window is exactly 0.3 s."""
    sink = open_sink(tmp_path / "events.db")
    local = LocalRecommender(world_dir, sink, seed=1)
    start = float(int(time.time()))  # a real epoch: event times must pass validation
    clock = FakeClock(start)

    class Restarting:
        def recommend(self, user_ids, k):
            if clock.advance(0.1) - start < 0.45:  # this attempt took 0.1 s
                raise ConnectionError("connection refused")
            return local.recommend(user_ids, k)

    cfg = SimulateConfig(
        world=str(world_dir),
        users=80,
        requests=30,
        concurrency=1,  # one thread: the order of attempts, and so each time, is fixed
        backoff_s=0.001,
        max_backoff_s=0.001,
        retry_deadline_s=10.0,
    )
    rep = simulate(cfg, client_factory=Restarting, sender=SinkSender(sink), clock=clock)
    assert rep.requests_failed == 0 and rep.requests_ok == 30
    assert rep.failed_attempts == rep.retries == 4
    assert rep.error_window_s == 0.3
    assert clock() == pytest.approx(start + 0.1 * (4 + 30))  # 4 failed + 30 good attempts


def test_reconcile_many_matches_one_by_one_and_catches_a_lost_event(world_dir, tmp_path):
    log = tmp_path / "events.db"
    sink = open_sink(log)
    local = LocalRecommender(world_dir, sink, seed=1)
    reps = [
        simulate(
            SimulateConfig(world=str(world_dir), users=80, requests=40, seed=s, concurrency=1),
            client_factory=lambda: local,
            sender=SinkSender(sink),
        )
        for s in (1, 2, 3)
    ]
    together = reconcile_many(reps, log_path=str(log), labels_dir=str(tmp_path / "a"))
    alone = [reconcile(r, log_path=str(log), labels_dir=str(tmp_path / "b")) for r in reps]
    assert together == alone and all(r["ok"] for r in together)
    # An event the simulator holds as acknowledged but the log does not have: caught.
    reps[1].event_ids.append("never-stored-0001")
    reps[1].accepted += 1
    got = reconcile_many(reps, log_path=str(log), labels_dir=str(tmp_path / "a"))
    assert [r["ok"] for r in got] == [True, False, True]
    assert got[1]["interactions_in_log"] == got[1]["interactions_accepted"] - 1


def test_users_rarely_click_again_what_they_already_clicked(world_dir, tmp_path):
    """With a memory across calls, an item a user clicked is clicked again at
    rewatch_factor times the rate; the same slates without memory get their usual clicks."""
    from simulator import ClickMemory

    def run(memory, factor, log):
        sink = open_sink(tmp_path / log)
        local = LocalRecommender(world_dir, sink, seed=1)  # deterministic slates per user
        cfg = SimulateConfig(
            world=str(world_dir), users=20, requests=300, seed=4, concurrency=1,
            rewatch_factor=factor,
        )  # fmt: skip
        return [
            simulate(cfg, client_factory=lambda: local, sender=SinkSender(sink), memory=memory)
            for _ in range(2)
        ]

    remember = ClickMemory()
    _, second = run(remember, 0.0, "a.db")
    assert len(remember) > 0 and second.rewatch_impressions > 0
    _, again_free = run(ClickMemory(), 1.0, "b.db")  # factor 1: memory changes nothing
    assert again_free.rewatch_impressions == 0 and again_free.clicks > second.clicks
