"""The batching peer (Ray Serve + @serve.batch) answers what the naive peer answers, for
each user, also when many requests arrive at once and are batched together."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loadtest.naive import NaiveRecommender
from loadtest.ray_peer import RayPeerServer
from loadtest.users import production_snapshot
from serving.testing import tiny_export

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_batched_answers_match_the_naive_peer_user_by_user(tmp_path):
    run, repo, _ = tiny_export(tmp_path / "repo")
    snap = production_snapshot(repo)
    users = [int(u) for u in snap.user_ids[:48]] + [10**9 + 7]  # the last one is unknown
    naive = NaiveRecommender.load(str(run), str(repo), threads=1)
    with RayPeerServer(repo, threads=1, max_batch_size=16, log_dir=tmp_path) as peer:
        peer.wait_ready()
        with ThreadPoolExecutor(max_workers=24) as pool:  # concurrent: batches of many users
            got = list(pool.map(lambda u: _get(f"{peer.url}/recommend?user_id={u}&k=5"), users))
        with pytest.raises(urllib.error.HTTPError) as bad:
            _get(f"{peer.url}/recommend?user_id=abc")
        assert bad.value.code == 400 and "user_id" in bad.value.read().decode()
        assert _get(f"{peer.url}/health") == {"ok": True}  # still serving after the bad one
    for u, answer in zip(users, got, strict=True):
        want = naive.recommend(u, 5)
        assert answer["user_id"] == u
        assert answer["item_ids"] == want["item_ids"], u
        np.testing.assert_allclose(answer["scores"], want["scores"], rtol=1e-4, atol=1e-5)
        assert answer["cold_start"] == want["cold_start"]
    assert got[-1]["cold_start"] and not got[0]["cold_start"]
