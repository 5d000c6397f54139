"""Two `tritonserver` replicas on ONE model repository, routing in a real redis-server.

- a canary start, a promote and a rollback across both replicas under traffic on both:
  zero failed requests, zero retries, and at every instant outside a switch's own instant
  both replicas answer every user with the version the routing in force names (each
  switch takes effect at the record's `effective_at`, on every replica at once);
- the routing epoch only grows; a stale writer's compare-and-set is refused;
- `kill -9` of one replica under traffic from a client spreading over both: zero failed
  requests, the retries on the other replica counted and reported;
- the asyncio client and the feedback sender, given both replicas with one of them dead,
  answer and store everything through the other, the failovers counted;
- a replica that is down blocks a switch with an error naming it, and routing is unchanged;
- a replica started again takes its routing from the store, not from what it had.

Nothing is mocked. The waits below are bounded only to turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from common.redis_server import RedisServer
from online.routing_store import RoutingStore, StaleEpochError
from serving import repository as layout
from serving.client import AsyncRecommenderClient, RecommenderClient
from serving.control import ReplicaError, ready_versions, switch_routing
from serving.ingest_client import send_interactions
from serving.routing import RoutingState
from serving.server import ServerConfig, TritonServer
from serving.testing import seeded_store, world_repo

pytestmark = pytest.mark.integration

HANG_BOUND_S = 120  # loops below wait for a condition; this only bounds a hang
BATCH = 8  # users per request


@dataclass
class Fleet:
    ds: object
    repo: object
    redis: RedisServer
    servers: list[TritonServer]
    root: object
    # every server started, replaced ones included: the fixture stops them all
    started: list[TritonServer] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [s.grpc_url for s in self.servers]

    def restart(self, i: int, log) -> TritonServer:
        """Replica `i` started again (stopped first if it still runs: a test run alone)."""
        self.servers[i].stop()
        new = _start(self.repo, self.redis.url, log, self.started)
        self.servers[i] = new
        return new

    def record(self):
        rs = RoutingStore.from_url(self.redis.url)
        try:
            return rs.read()
        finally:
            rs.close()


def _start(repo, redis_url, log, started: list[TritonServer]) -> TritonServer:
    # Replicas share one event stream on the same Redis, as they would in production.
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            online_store=redis_url,
            event_log=f"{redis_url}?groups=log",
            log_file=str(log),
        )
    )
    started.append(server)  # before start(): stop() is safe on any of them, started or not
    return server.start()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    ds, _, repo = world_repo(root, versions=2)
    redis = seeded_store(ds, root / "redis")
    started: list[TritonServer] = []
    try:
        servers = [_start(repo, redis.url, root / f"tritonserver-{n}.log", started) for n in "ab"]
        yield Fleet(ds, repo, redis, servers, root, started)
    finally:
        # Each stopped whatever the others do: a server that fails to stop (or a Ctrl-C)
        # must not leave the rest running.
        with contextlib.ExitStack() as stack:
            stack.callback(redis.close)
            for server in started:
                stack.callback(server.stop)


@dataclass
class Traffic:
    """Threads sending recommend requests until stopped; every answer kept with the wall-
    clock times it was sent and received (one host: the replicas' and Redis's clock)."""

    answers: list = field(default_factory=list)  # (replica, t_sent, t_recv, users, versions)
    failures: list = field(default_factory=list)  # (replica, error)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, client: RecommenderClient, label: str, users: np.ndarray, seed: int) -> None:
        """A thread sending on `client` (the caller closes it, after `finish`)."""

        def loop() -> None:
            rng = random.Random(seed)
            while not self.stop.is_set():
                batch = np.array(rng.sample(list(users), BATCH), dtype=np.int64)
                t0 = time.time()
                try:
                    recs = client.recommend(batch, 5)
                except Exception as exc:  # every failure is kept and asserted on
                    with self.lock:
                        self.failures.append((label, f"{type(exc).__name__}: {exc}"))
                    continue
                t1 = time.time()
                versions = np.array([r.model_version for r in recs], dtype=np.int64)
                with self.lock:
                    self.answers.append((label, t0, t1, batch, versions))

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self.threads.append(t)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def wait_for(self, n: int, what: str) -> None:
        deadline = time.monotonic() + HANG_BOUND_S
        target = self.count() + n
        while self.count() < target:
            assert time.monotonic() < deadline, f"traffic stalled waiting for {what}"
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(HANG_BOUND_S)


def _users(fleet: Fleet) -> np.ndarray:
    return fleet.ds.users["user_id"].to_numpy(np.int64)[:200]


def test_promote_and_rollback_across_replicas_under_traffic(fleet):
    a, b = fleet.urls
    start = RoutingState(production=1)
    switch_routing(fleet.repo, start, urls=[a, b], drain_s=0.0)
    users = _users(fleet)
    traffic = Traffic()
    clients = [RecommenderClient(a), RecommenderClient(b)]
    spread = RecommenderClient(urls=[a, b])  # round-robin over both: must never retry here
    for i, (client, label) in enumerate([(clients[0], "a"), (clients[1], "b")] * 2):
        traffic.run(client, label, users, seed=i)
    traffic.run(spread, "a|b", users, seed=99)

    steps = [
        RoutingState(production=1, canary=2, canary_percent=50),  # canary start
        RoutingState(production=2),  # promote
        RoutingState(production=1),  # rollback
    ]
    switches = []  # (effective_at, routing from then on)
    epochs = [fleet.record().epoch]
    try:
        traffic.wait_for(40, "traffic before the first switch")
        for new in steps:
            done = switch_routing(fleet.repo, new, urls=[a, b], drain_s=0.5)
            assert done.effective_at is not None and not done.unload_errors
            switches.append((done.effective_at, new))
            epochs.append(done.epoch)
            traffic.wait_for(40, f"traffic after switching to {new}")
            # what no routing names any more is unloaded on both replicas, after the drain
            assert ready_versions(a) == ready_versions(b) == sorted(new.versions)
    finally:
        traffic.finish()
        for c in [*clients, spread]:
            c.close()

    assert traffic.failures == [], traffic.failures[:5]
    assert spread.failover.retries == 0 and not spread.failover.failed
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)  # only grows

    # At every instant, both replicas answer each user with the routing in force. A request
    # sent before a switch's instant and answered after it may be either: left out.
    in_force = [(float("-inf"), start), *switches]
    checked = {label: [0] * len(in_force) for label in ("a", "b", "a|b")}
    wrong = []
    straddled = 0
    for label, t0, t1, batch, versions in traffic.answers:
        if any(t0 < t <= t1 for t, _ in switches):
            straddled += 1
            continue
        k = max(i for i, (t, _) in enumerate(in_force) if t <= t0)
        expected = in_force[k][1].version_for(batch)
        checked[label][k] += 1
        if not np.array_equal(versions, expected):
            wrong.append((label, k, batch.tolist(), versions.tolist(), expected.tolist()))
    assert wrong == [], wrong[:5]
    # every period was seen from both replicas, so the comparison is not vacuous
    for label in ("a", "b"):
        assert all(n > 0 for n in checked[label]), checked
    # the canary really split users between the versions on both replicas
    canary_users = [
        set(v.tolist())
        for label, t0, t1, batch, v in traffic.answers
        if switches[0][0] <= t0 and t1 < switches[1][0]
    ]
    assert set().union(*canary_users) == {1, 2}
    print(
        f"\nswitch consistency: {len(traffic.answers)} answers, {straddled} straddling a "
        f"switch instant, per period checked {checked}, epochs {epochs}"
    )


def test_the_epoch_only_grows_and_a_stale_writer_is_refused(fleet):
    a, b = fleet.urls
    before = fleet.record()
    # a second controller read the record, then this one switched
    done = switch_routing(fleet.repo, RoutingState(production=1), urls=[a, b])
    assert done.epoch == before.epoch + 1
    rs = RoutingStore.from_url(fleet.redis.url)
    try:
        with pytest.raises(StaleEpochError, match=f"epoch {done.epoch}, not {before.epoch}"):
            rs.write(RoutingState(production=2).to_dict(), expect_epoch=before.epoch, delay_s=0)
    finally:
        rs.close()
    after = fleet.record()
    assert after.epoch == done.epoch and after.current == RoutingState(production=1).to_dict()
    # routing.json mirrors the store's record
    assert RoutingState.load(layout.routing_path(fleet.repo)) == RoutingState(production=1)


def test_kill_9_of_one_replica_under_traffic_fails_no_request(fleet):
    a, b = fleet.urls
    victim = fleet.servers[1]
    client = RecommenderClient(urls=[a, b])
    traffic = Traffic()
    users = _users(fleet)
    for i in range(4):  # the gRPC client is shared by the threads
        traffic.run(client, "a|b", users, seed=100 + i)
    try:
        traffic.wait_for(60, "traffic before the kill")
        assert client.failover.requests[b] > 0  # both replicas were answering
        victim.process.kill()  # kill -9, under traffic
        victim.process.wait()
        traffic.wait_for(200, "traffic after the kill")
    finally:
        traffic.finish()
        client.close()
        victim.stop()  # reaps the stubs the dead server left behind
    stats = client.failover
    report = {
        "answered": len(traffic.answers),
        "failed": len(traffic.failures),
        "retries": stats.retries,
        "answered_per_replica": dict(stats.requests),
        "unreachable_per_replica": dict(stats.failed),
    }
    (fleet.root / "kill9-report.json").write_text(json.dumps(report, indent=1))
    print(f"\nkill -9 of one replica under traffic: {report}")
    assert traffic.failures == [], traffic.failures[:5]
    assert stats.retries > 0 and stats.failed[b] > 0 and stats.failed[a] == 0


def _kill_b(fleet: Fleet) -> str:
    victim = fleet.servers[1]
    if victim.is_alive():  # when run alone
        victim.process.kill()
        victim.stop()
    return victim.grpc_url


def test_async_and_feedback_clients_fail_over_to_the_replica_that_is_up(fleet):
    a, _ = fleet.urls
    b = _kill_b(fleet)
    users = _users(fleet)[:40]

    async def ask() -> tuple[int, object]:
        # the dead replica first: the first request must move on to the live one
        async with AsyncRecommenderClient(urls=[b, a]) as client:
            answered = 0
            for i in range(0, len(users), BATCH):
                recs = await client.recommend(users[i : i + BATCH], 5)
                answered += sum(len(r.item_ids) == 5 for r in recs)
            return answered, client.failover

    answered, stats = asyncio.run(ask())
    assert answered == len(users)
    assert stats.failed[b] >= 1 and stats.retries >= 1 and stats.requests[a] >= 1

    n = 30
    events = {
        "event_id": np.array([f"replicas-{i}" for i in range(n)], dtype=object),
        "user_id": users[:n],
        "item_id": np.full(n, int(fleet.ds.items["item_id"].iloc[0])),
        "type": np.array(["click"] * n, dtype=object),
        "value": np.ones(n),
        "ts": np.full(n, time.time()),
        "request_id": np.array([""] * n, dtype=object),
    }
    first = send_interactions(f"{b},{a}", events, batch_size=8)
    assert first.accepted.all() and first.failed_batches == 0, first.errors
    again = send_interactions(f"{b},{a}", events, batch_size=8)  # a resend: acknowledged
    assert again.accepted.all() and again.failed_batches == 0, again.errors


def test_a_replica_that_is_down_blocks_the_switch(fleet):
    a, _ = fleet.urls
    b = _kill_b(fleet)
    before = fleet.record()
    mirror = layout.routing_path(fleet.repo).read_text()
    loaded = ready_versions(a)
    new = RoutingState(production=1, canary=2, canary_percent=20)
    with pytest.raises(ReplicaError, match=rf"replica {b} does not answer") as err:
        switch_routing(fleet.repo, new, urls=[a, b], drain_s=0.0)
    assert err.value.replica == b
    assert fleet.record() == before  # routing unchanged: same epoch, same routing
    assert layout.routing_path(fleet.repo).read_text() == mirror
    assert ready_versions(a) == loaded  # nothing was loaded on the replica that answered


def test_a_restarted_replica_takes_its_routing_from_the_store(fleet):
    a, _ = fleet.urls
    # the operator leaves the dead replica out and switches the one that is up
    new = RoutingState(production=2)
    done = switch_routing(fleet.repo, new, urls=[a], drain_s=0.0)
    # routing.json (the mirror) says otherwise: the store is the truth
    RoutingState(production=1).save(layout.routing_path(fleet.repo))
    again = fleet.restart(1, fleet.root / "tritonserver-b2.log")
    assert again.routing == new and again.routing_epoch == done.epoch
    assert 2 in ready_versions(again.grpc_url)
    with RecommenderClient(again.grpc_url) as client:
        got = {r.model_version for r in client.recommend(_users(fleet)[:20], 5)}
    assert got == {2}
