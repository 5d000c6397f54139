"""The online feature store against a real redis-server (never a mock): seeding, live
writes, the per-version view, and what serving gets while Redis is dead and after."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.features import UNKNOWN, FeatureVocab
from models.snapshot import FeatureSnapshot
from online.cache import CachedFeatures
from online.state import same_record
from online.store import RedisFeatureStore
from online.view import VersionView

pytestmark = pytest.mark.integration

T0 = 1_700_000_000
CATS = {"gender": ["f", "m"], "age_bucket": ["18-24", "35+"], "activity": ["hi", "lo"]}
_prefixes = (f"t{i}" for i in itertools.count())


def vocab_of(user_ids, item_ids, history_len=4) -> FeatureVocab:
    return FeatureVocab(
        user_ids=np.sort(np.asarray(user_ids, dtype=np.int64)),
        item_ids=np.sort(np.asarray(item_ids, dtype=np.int64)),
        user_cats={
            "gender": [UNKNOWN, "f", "m"],
            "age_bucket": [UNKNOWN, "18-24"],  # "35+" unseen by this version
            "activity": [UNKNOWN, "hi", "lo"],
            "occupation": [UNKNOWN],  # absent from the users table
        },
        item_cats={"genre": [UNKNOWN], "provider": [UNKNOWN]},
        n_hash_buckets=5,
        history_len=history_len,
    )


def dataset(seed=0, n_users=30, n_rows=600, items=(100, 140)):
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            **{c: rng.choice(v, n_users) for c, v in CATS.items()},
        }
    )
    inter = pd.DataFrame(
        {
            "user_id": rng.integers(1, n_users + 1, n_rows),
            "item_id": rng.integers(*items, n_rows),  # repeats of (user, item) happen
            "timestamp": np.sort(rng.integers(T0, T0 + n_rows // 3 + 1, n_rows)),  # and ties
            "event_type": rng.choice(["view", "click", "watch", "like", "rating"], n_rows),
            "value": 1.0,
        }
    )
    return users, inter


def clicks(rows, first_id=0):
    """Event-log rows (feedback.events interaction schema) for (user, item, ts) tuples."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    df["event_id"] = [f"e{first_id + i:06d}" for i in range(len(df))]
    df["type"] = "click"
    return df


def assert_same(got, want):
    for name in ("user_index", "user_cats", "history", "history_ts", "known"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for g, w in zip(got.seen, want.seen, strict=True):
        np.testing.assert_array_equal(g, np.unique(w))


def snapshot_of(store: RedisFeatureStore, ids) -> list:
    return store.read(np.asarray(ids)).records


def assert_same_records(a, b):
    assert len(a) == len(b)
    assert all(same_record(x, y) for x, y in zip(a, b, strict=True))


def test_seed_then_read_is_the_snapshot(redis_server):
    users, inter = dataset()
    vocab = vocab_of(np.arange(1, 21), np.arange(100, 130))  # items 130..139 unknown
    # A window that holds everyone's whole history: exact parity even with items the
    # version does not know (see online/view.py on the window).
    store = RedisFeatureStore(redis_server.url, history_len=1000)
    stats = store.seed(users, inter, checkpoint=42)
    assert stats.users == 30 and stats.interactions == len(inter)
    ids = np.array([*range(1, 31), 31, 10**15, 5])  # strangers and a repeat
    want = FeatureSnapshot.build(vocab, users, inter).lookup(ids)
    assert_same(VersionView(vocab).to_features(store.read(ids)), want)
    m = store.meta()
    assert (m.state, m.checkpoint, m.applied_seq, m.users) == ("ready", 42, 42, 30)


def test_parity_with_a_window_of_exactly_h_when_the_version_knows_every_item(redis_server):
    users, inter = dataset(seed=1)
    vocab = vocab_of(np.arange(1, 31, 2), np.arange(100, 140), history_len=6)
    store = RedisFeatureStore(redis_server.url, history_len=6)
    store.seed(users, inter)
    ids = np.arange(0, 33)
    want = FeatureSnapshot.build(vocab, users, inter).lookup(ids)
    assert_same(VersionView(vocab).to_features(store.read(ids)), want)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10**6),
    n_users=st.integers(1, 15),
    n_rows=st.integers(0, 200),
    h=st.integers(1, 8),
)
def test_seed_parity_property(redis_server, seed, n_users, n_rows, h):
    users, inter = dataset(seed, n_users, n_rows, items=(100, 112))
    vocab = vocab_of(np.arange(1, n_users + 1, 2), np.arange(100, 109), history_len=h)
    store = RedisFeatureStore(redis_server.url, prefix=next(_prefixes), history_len=1000)
    store.seed(users, inter, progress=lambda done, total: None)
    ids = np.arange(0, n_users + 3)
    want = FeatureSnapshot.build(vocab, users, inter).lookup(ids)
    assert_same(VersionView(vocab).to_features(store.read(ids)), want)


def test_seed_is_idempotent_and_replaces(redis_server):
    users, inter = dataset()
    store = RedisFeatureStore(redis_server.url, history_len=5, seed_chunk_users=7)
    first = store.seed(users, inter)
    before = snapshot_of(store, range(0, 32))
    store.apply_interactions(clicks([(3, 555, T0 + 10**6)]))  # a write the seed will replace
    again = store.seed(users, inter)
    assert again.epoch == first.epoch
    assert_same_records(snapshot_of(store, range(0, 32)), before)


def test_apply_twice_is_apply_once(redis_server):
    users, inter = dataset()
    store = RedisFeatureStore(redis_server.url, history_len=5)
    store.seed(users, inter)
    batch = clicks([(u, 100 + u, T0 + 10**6 + u) for u in (1, 2, 2, 7)])
    batch["seq"] = np.arange(50, 54)
    store.apply_interactions(batch)
    once = snapshot_of(store, range(0, 32))
    store.apply_interactions(batch)  # redelivered
    store.apply_interactions(batch.iloc[::-1])  # and out of order
    assert_same_records(snapshot_of(store, range(0, 32)), once)
    assert store.replay_from() == 53


def test_history_is_capped_at_h_newest_last_with_repeats(redis_server):
    store = RedisFeatureStore(redis_server.url, history_len=3)
    store.apply_interactions(clicks([(9, 10, T0 + 1), (9, 11, T0 + 2), (9, 12, T0 + 3)]))
    # A re-click of 10 is a new event: it is history again (training keeps repeats too).
    store.apply_interactions(clicks([(9, 13, T0 + 4), (9, 10, T0 + 5)], first_id=100))
    rec = store.read(np.array([9])).records[0]
    assert rec.history_items.tolist() == [12, 13, 10]
    assert rec.history_ts.tolist() == [T0 + 3, T0 + 4, T0 + 5]
    assert rec.seen.tolist() == [10, 11, 12, 13]
    # A late event older than the window is trimmed away, and only counts as seen.
    store.apply_interactions(clicks([(9, 14, T0)], first_id=200))
    rec = store.read(np.array([9])).records[0]
    assert rec.history_items.tolist() == [12, 13, 10] and 14 in rec.seen


def test_a_user_unknown_to_the_model_gets_history_after_first_clicks(redis_server):
    users, inter = dataset()
    vocab = vocab_of(np.arange(1, 31), np.arange(100, 140))
    store = RedisFeatureStore(redis_server.url, history_len=10)
    store.seed(users, inter)
    view, new = VersionView(vocab), np.array([777])
    before = view.to_features(store.read(new))
    assert not before.known[0] and not before.history.any()
    store.apply_interactions(clicks([(777, 101, T0 + 10**6), (777, 150, T0 + 10**6 + 1)]))
    after = view.to_features(store.read(new))
    assert after.known[0]
    assert after.history[0].tolist() == [0 + 1 + 1, 0, 0, 0]  # 101 -> index 1; 150 unknown
    assert after.user_index[0, 0] == before.user_index[0, 0] >= 30  # still the hashed row
    assert after.seen[0].tolist() == [101, 150]


def test_two_versions_read_one_store_each_in_its_own_vocab(redis_server):
    users, inter = dataset()
    store = RedisFeatureStore(redis_server.url, history_len=50)
    store.seed(users, inter)
    prod = vocab_of(np.arange(1, 11), np.arange(100, 120))
    canary = vocab_of(np.arange(1, 31), np.arange(110, 140))  # newer catalogue and users
    ids = np.arange(1, 31)
    raw = store.read(ids)
    for vocab in (prod, canary):
        assert_same(
            VersionView(vocab).to_features(raw),
            FeatureSnapshot.build(vocab, users, inter).lookup(ids),
        )
    p, c = VersionView(prod).to_features(raw), VersionView(canary).to_features(raw)
    assert not np.array_equal(p.history, c.history)
    assert (p.user_index[10:] >= 10).all() and (c.user_index[10:] < 30).all()


def test_kill_9_serves_cached_then_cold_and_recovers(redis_server):
    users, inter = dataset()
    store = RedisFeatureStore(redis_server.url, history_len=10, socket_timeout_s=0.5)
    store.seed(users, inter)
    now = [0.0]
    cache = CachedFeatures(store, ttl_s=1.0, retry_interval_s=5.0, clock=lambda: now[0])
    warm = cache.read(np.arange(1, 11))
    assert warm.exists.all() and not warm.degraded.any()

    redis_server.kill()
    now[0] = 2.0  # the cached copies are stale: Redis is asked, and does not answer
    for _ in range(3):  # several batches while it is down: none raises
        raw = cache.read(np.arange(1, 21))
        assert raw.degraded.tolist() == [False] * 10 + [True] * 10
        assert all(same_record(a, b) for a, b in zip(raw.records[:10], warm.records, strict=True))
        assert not raw.exists[10:].any()
    assert cache.stats.failures == 1 and cache.stats.skipped == 2  # asked once per interval
    feats = VersionView(vocab_of(np.arange(1, 31), np.arange(100, 140))).to_features(raw)
    assert feats.known[:10].all() and not feats.known[10:].any()

    redis_server.start()  # same data dir: the AOF brings back every acknowledged write
    now[0] = 10.0
    for _ in range(3):  # a connection from before the kill may fail once more
        raw = cache.read(np.arange(1, 21))
        if not raw.degraded.any():
            break
        now[0] += 10.0
    assert not raw.degraded.any() and raw.exists.all()
    assert_same_records(raw.records, snapshot_of(store, range(1, 21)))


def test_freshness_through_the_cache_is_bounded_by_the_ttl(redis_server):
    store = RedisFeatureStore(redis_server.url, history_len=10)
    now = [0.0]
    cache = CachedFeatures(store, ttl_s=0.2, clock=lambda: now[0])
    assert not cache.read(np.array([5])).exists[0]
    store.apply_interactions(clicks([(5, 101, T0)]))
    now[0] = 0.1
    assert not cache.read(np.array([5])).exists[0]  # cached copy still fresh
    now[0] = 0.2
    assert cache.read(np.array([5])).records[0].history_items.tolist() == [101]


def test_rebuild_from_the_event_log_after_redis_lost_its_data(redis_server, tmp_path):
    from feedback.events import INTERACTION
    from feedback.sink import open_sink

    users, inter = dataset()
    store = RedisFeatureStore(redis_server.url, history_len=8)
    seed = store.seed(users, inter, checkpoint=0)
    with open_sink(tmp_path / "events.db") as log:
        rng = np.random.default_rng(3)
        now_ts = float(pd.Timestamp.now().timestamp())
        for b in range(4):  # the consumer applies each committed batch
            n = 25
            rows = {
                "event_id": np.array([f"ev-{b}-{i}" for i in range(n)], dtype=object),
                "user_id": rng.integers(1, 40, n),
                "item_id": rng.integers(100, 140, n),
                "type": rng.choice(["click", "watch", "like"], n).astype(object),
                "value": np.ones(n),
                "ts": now_ts - 100 + b * 10 + np.arange(n) * 0.1,
                "request_id": np.array([""] * n, dtype=object),
            }
            assert log.write_interactions(rows).inserted == n
            seq = store.replay_from()
            store.apply_interactions(log.read(INTERACTION, after=seq, with_meta=True))
        ids = np.arange(0, 42)
        before = snapshot_of(store, ids)
        applied = store.replay_from()
        assert applied == log.snapshot()[INTERACTION]

        store.redis.flushdb()  # Redis came back without its data (no AOF, a new node)
        assert store.replay_from() is None  # so: seed again, then replay the log
        store.seed(users, inter, checkpoint=seed.checkpoint)
        frames = (
            log.read(INTERACTION, after=lo, upto=lo + 30, with_meta=True)
            for lo in range(store.replay_from(), applied, 30)
        )
        st_ = store.rebuild(frames)
        assert st_.rows == 100 and st_.applied_seq == applied
        assert_same_records(snapshot_of(store, ids), before)
        assert store.replay_from() == applied


def test_event_ids_with_separators_and_big_ids_read_back_exactly(redis_server):
    store = RedisFeatureStore(redis_server.url, history_len=5)
    big = 2**62 + 1  # beyond float precision: ids must never round-trip through a float
    batch = clicks([(big, big - 1, T0 + 0.123456), (big, -7, T0 + 1)])
    batch["event_id"] = ["a|b c", "100%"]
    store.apply_interactions(batch)
    store.apply_interactions(batch)
    rec = store.read(np.array([big])).records[0]
    assert rec.history_items.tolist() == [big - 1, -7]
    assert rec.history_ts.tolist() == [T0 + 0.123456, T0 + 1]
    assert rec.seen.tolist() == [-7, big - 1]


def test_open_cached_from_config(redis_server):
    from online.cache import open_cached
    from online.config import OnlineStoreConfig

    cached = open_cached(OnlineStoreConfig(url=redis_server.url, prefix="cfg", history_len=3))
    cached.store.apply_interactions(clicks([(1, 10, T0), (1, 11, T0 + 1)]))
    raw = cached.read(np.array([1, 2]))
    assert raw.exists.tolist() == [True, False] and not raw.degraded.any()
    assert cached.store.redis.exists("cfg:u:{1}:h") == 1
