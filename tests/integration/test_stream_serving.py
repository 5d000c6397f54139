"""The whole "past one machine" path on real processes: tritonserver writing impressions and
clicks to Redis Streams, the two consumer groups as `northstar feedback consume`
subprocesses (the log writer into SQLite, the features consumer into the online store),
and `recommend` reading the store. A click travels ingest -> stream -> features consumer
-> store -> the user's next answer; every acknowledged event reaches the SQLite log once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from feedback.events import IMPRESSION, INTERACTION
from feedback.sink import open_source
from serving.client import RecommenderClient
from serving.ingest_client import send_interactions
from serving.server import ServerConfig, TritonServer
from serving.testing import seeded_store, wait_until, world_repo

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _consumer(url: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "northstar", "feedback", "consume", "--url", url, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-serving")
    ds, _, repo = world_repo(root)
    redis = seeded_store(ds, root / "redis")
    stream_url = f"{redis.url}?prefix=events&partitions=2"
    log = root / "events.db"
    procs = []
    server = None
    try:
        server = TritonServer(
            ServerConfig.on_free_ports(
                str(repo),
                event_log=stream_url,
                online_store=redis.url,
                log_file=str(root / "tritonserver.log"),
            )
        ).start()
        procs.append(_consumer(stream_url, "--log", str(log), "--consumer", "w1"))
        procs.append(
            _consumer(
                stream_url, "--online-store", redis.url, "--group", "features", "--consumer", "f1"
            )
        )
        yield ds, server, log, procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        if server is not None:
            server.stop()
        redis.close()


def _count(log: Path, kind: str) -> int:
    if not log.exists():
        return 0
    with open_source(str(log)) as src:
        return len(src.read(kind, after=0))


def test_a_click_goes_through_the_stream_to_the_users_next_answer(fleet):
    ds, server, log, procs = fleet
    user = int(ds.users["user_id"].iloc[7])
    with RecommenderClient(server.grpc_url) as client:
        first = client.recommend([user], 5)[0]
        top = int(first.item_ids[0])
        res = send_interactions(
            client,
            {
                "user_id": np.array([user]),
                "item_id": np.array([top]),
                "type": np.array(["click"], dtype=object),
                "value": np.ones(1, np.float32),
                "ts": np.array([time.time()]),
            },
        )
        assert res.accepted.all(), res.reasons
        wait_until(
            lambda: top not in client.recommend([user], 5)[0].item_ids,
            "the click reached the online store through the features consumer",
        )
    for p in procs:
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
    # The log writer stored the click once and every served slate's impressions.
    wait_until(lambda: _count(log, INTERACTION) == 1, "the click in the SQLite log")
    wait_until(lambda: _count(log, IMPRESSION) >= 5, "the impressions in the SQLite log")
    with open_source(str(log)) as src:
        imps = src.read(IMPRESSION, after=0)
    assert not imps["event_id"].duplicated().any()
    assert set(imps["user_id"]) == {user}
