"""online/ without a Redis server: the version view against FeatureSnapshot, the row
contract, the settings, and what the cache does when Redis does not answer at all."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.features import UNKNOWN, USER_CATEGORICALS, FeatureVocab
from models.snapshot import FeatureSnapshot
from online.cache import CachedFeatures
from online.config import OnlineConfigError, OnlineStoreConfig, OnlineStoreError
from online.rows import HISTORY_EVENT_TYPES, RowsError, history_rows
from online.state import ABSENT, RawUserState, UserRecord
from online.store import RedisFeatureStore
from online.view import VersionView

CAT_VALUES = {
    "gender": ["f", "m", "x"],
    "age_bucket": ["18-24", "25-34", "35+"],
    "activity": ["hi", "lo"],
    "occupation": ["a", "b", UNKNOWN],
}


def make_vocab(user_ids, item_ids, history_len: int, *, drop_cat_value: bool = True):
    """A vocabulary that knows some users, some items and not every category value."""
    cats = {
        c: [UNKNOWN, *sorted(set(v[:-1] if drop_cat_value else v) - {UNKNOWN})]
        for c, v in CAT_VALUES.items()
    }
    return FeatureVocab(
        user_ids=np.sort(np.asarray(user_ids, dtype=np.int64)),
        item_ids=np.sort(np.asarray(item_ids, dtype=np.int64)),
        user_cats=cats,
        item_cats={"genre": [UNKNOWN], "provider": [UNKNOWN]},
        n_hash_buckets=7,
        history_len=history_len,
    )


@st.composite
def datasets(draw):
    n_users = draw(st.integers(1, 12))
    user_ids = np.array(
        sorted(draw(st.sets(st.integers(1, 10**12), min_size=n_users, max_size=n_users)))
    )
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            **{
                c: [draw(st.sampled_from(v)) for _ in range(n_users)] for c, v in CAT_VALUES.items()
            },
        }
    )
    n = draw(st.integers(0, 120))
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(user_ids.tolist()),
                st.integers(100, 130),  # few items: repeats are common
                st.integers(0, 20),  # few distinct times: ties are common
            ),
            min_size=n,
            max_size=n,
        )
    )
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype(np.int64)
    inter["timestamp"] += 1_700_000_000
    inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
    inter["event_type"] = "click"
    # min_size=1: FeatureVocab.user_index fails on a vocab without users (models/, not ours)
    known_users = draw(st.lists(st.sampled_from(user_ids.tolist()), min_size=1, max_size=n_users))
    catalogue = draw(st.sets(st.integers(100, 130), min_size=1))
    h = draw(st.integers(1, 6))
    return users, inter, make_vocab(np.unique(known_users), sorted(catalogue), h)


def records_from(users: pd.DataFrame, inter: pd.DataFrame) -> dict[int, UserRecord]:
    """What a store with a window longer than anyone's history holds, built by hand."""
    out = {}
    for u in users["user_id"]:
        mine = inter[inter["user_id"] == u]
        row = users[users["user_id"] == u].iloc[0]
        out[int(u)] = UserRecord(
            exists=True,
            history_items=mine["item_id"].to_numpy(np.int64),
            history_ts=mine["timestamp"].to_numpy(np.float64),
            seen=np.unique(mine["item_id"].to_numpy(np.int64)),
            cats={c: str(row[c]) for c in USER_CATEGORICALS},
        )
    return out


def assert_same_features(got, want):
    np.testing.assert_array_equal(got.user_index, want.user_index)
    np.testing.assert_array_equal(got.user_cats, want.user_cats)
    np.testing.assert_array_equal(got.history, want.history)
    np.testing.assert_array_equal(got.history_ts, want.history_ts)
    np.testing.assert_array_equal(got.known, want.known)
    assert len(got.seen) == len(want.seen)
    for g, w in zip(got.seen, want.seen, strict=True):
        np.testing.assert_array_equal(g, np.unique(w))  # a set: sorted, no repeats


@settings(max_examples=150, deadline=None)
@given(datasets(), st.lists(st.integers(0, 10**12), max_size=4))
def test_view_matches_the_snapshot_field_by_field(data, strangers):
    users, inter, vocab = data
    recs = records_from(users, inter)
    ids = np.array([*users["user_id"], *strangers, *users["user_id"][:2]], dtype=np.int64)
    raw = RawUserState(ids, [recs.get(int(u), ABSENT) for u in ids], np.zeros(len(ids), bool))
    want = FeatureSnapshot.build(vocab, users, inter).lookup(ids)
    assert_same_features(VersionView(vocab).to_features(raw), want)


def test_view_maps_items_to_its_own_catalogue_and_hashes_strangers():
    vocab = make_vocab([5], [10, 20, 30], history_len=3)
    rec = UserRecord(
        exists=True,
        history_items=np.array([10, 99, 20, 30, 99]),  # 99 is outside the catalogue
        history_ts=np.arange(5.0),
        seen=np.array([10, 20, 30, 99]),
        cats={"gender": "f", "age_bucket": "never-seen"},
    )
    raw = RawUserState(np.array([5, 6]), [rec, ABSENT], np.array([False, True]))
    f = VersionView(vocab).to_features(raw)
    np.testing.assert_array_equal(f.history, [[3, 2, 1], [0, 0, 0]])  # newest first, index + 1
    assert f.user_index[0, 0] == 0 and f.user_index[1, 0] >= 1  # own row; hashed row
    assert f.user_cats[0].tolist() == [1, 0, 0, 0]  # "f"; unseen values and missing -> 0
    assert f.known.tolist() == [True, False]
    assert f.seen[1].size == 0


def test_history_event_types_follow_training_and_the_live_log():
    from feedback.events import INTERACTION_TYPES
    from training.schema import EVENT_TYPES

    assert set(EVENT_TYPES) == HISTORY_EVENT_TYPES
    assert set(INTERACTION_TYPES) <= HISTORY_EVENT_TYPES


def test_rows_accept_both_spellings_and_drop_non_history_types():
    log_rows = pd.DataFrame(
        {
            "seq": [7, 8, 9],
            "event_id": ["e1", "e2", "e3"],
            "user_id": [1, 1, 2],
            "item_id": [10, 11, 12],
            "type": ["click", "impression", "like"],
            "ts": [1.7e9, 1.7e9 + 1, 1.7e9 + 2],
        }
    )
    r = history_rows(log_rows, need_event_id=True)
    assert r.item_id.tolist() == [10, 12] and r.ignored == 1 and r.seq == 9
    assert r.event_id.tolist() == ["e1", "e3"]
    with pytest.raises(RowsError, match="'event_id'"):
        history_rows(log_rows.drop(columns="event_id"), need_event_id=True)
    with pytest.raises(RowsError, match="'ts' or 'timestamp'"):
        history_rows(log_rows.drop(columns="ts"), need_event_id=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("url", "localhost:6379"),
        ("prefix", "has space"),
        ("prefix", "a{b}"),
        ("history_len", 0),
        ("history_len", 2.5),
        ("cache_ttl_s", -1),
        ("socket_timeout_s", 0),
        ("socket_timeout_s", float("nan")),
        ("retry_interval_s", float("inf")),
        ("seed_chunk_users", True),
    ],
)
def test_bad_config_names_the_field(field, value):
    kwargs = {"url": "redis://127.0.0.1:6379/0", field: value}
    with pytest.raises(OnlineConfigError, match=f"^{field}: "):
        OnlineStoreConfig(**kwargs)


def _closed_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_a_url_that_does_not_answer_is_a_clear_error():
    url = _closed_port_url()
    with pytest.raises(OnlineStoreError) as err:
        RedisFeatureStore(url)
    msg = str(err.value)
    assert msg.startswith(f"{url}: no answer (") and "fix --online-store" in msg


def test_without_redis_every_user_is_a_degraded_cold_start_and_nothing_raises():
    now = [0.0]
    store = RedisFeatureStore(_closed_port_url(), check=False)
    cache = CachedFeatures(store, ttl_s=0.5, retry_interval_s=10.0, clock=lambda: now[0])
    raw = cache.read(np.array([1, 2, 1]))
    assert raw.degraded.tolist() == [True, True, True] and not raw.exists.any()
    assert cache.stats.failures == 1 and cache.stats.degraded == 2
    now[0] = 5.0
    cache.read(np.array([3]))  # inside the retry interval: Redis is not asked
    assert cache.stats.failures == 1 and cache.stats.skipped == 1
    now[0] = 11.0
    cache.read(np.array([3]))  # one more try after it
    assert cache.stats.failures == 2
    f = VersionView(make_vocab([1], [10], 2)).to_features(raw)
    assert not f.known.any() and not f.history.any()
