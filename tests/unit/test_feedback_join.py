"""The join: attribution edges, pending vs final, late clicks, idempotent incremental runs."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

import feedback.join as join_mod
from feedback.join import (
    JoinConfig,
    export_positives,
    parse_as_of,
    parse_duration,
    read_labels,
    read_state,
    read_statuses,
    run_join,
)
from feedback.sink import impression_rows, open_sink
from training.schema import INTERACTION_COLUMNS, validate_table

T = 1_750_000_000.0  # 2025-06-15T15:06:40Z
W = 1800.0


@pytest.fixture
def log(tmp_path):
    return open_sink(tmp_path / "events.db")


def show(log, request_id, user, items, ts, version=1):
    log.write_impressions(
        impression_rows(
            request_ids=[request_id],
            user_ids=[user],
            item_ids=np.array([items]),
            scores=np.linspace(1, 0, len(items))[None],
            model_version=version,
            ts=ts,
        )
    )


def act(log, event_id, user, item, ts, request_id="", type="click", value=1.0):
    r = log.write_interactions(
        {
            "event_id": np.array([event_id], dtype=object),
            "user_id": np.array([user]),
            "item_id": np.array([item]),
            "type": np.array([type], dtype=object),
            "value": np.array([value]),
            "ts": np.array([ts]),
            "request_id": np.array([request_id], dtype=object),
        }
    )
    assert r.accepted.all(), r.reasons


def join(log, tmp_path, as_of=None):
    return run_join(
        JoinConfig(log=str(log.path), out=str(tmp_path / "labels"), window_s=W, as_of=as_of)
    )


def statuses(tmp_path):
    st = read_statuses(tmp_path / "labels")
    return dict(zip(st["event_id"], zip(st["status"], st["reason"], strict=True), strict=True))


def labels(tmp_path):
    return read_labels(tmp_path / "labels").set_index("event_id")


def test_click_exactly_at_the_end_of_the_window_counts(log, tmp_path):
    """The window is inclusive: impression ts <= click ts <= impression ts + W."""
    show(log, "r1", 1, [10, 11, 12], T)
    act(log, "at-end", 1, 10, T + W, request_id="r1")
    act(log, "just-after", 1, 11, T + W + 0.001, request_id="r1")
    act(log, "at-end-no-req", 1, 12, T + W)  # same edge through the (user, item) path
    join(log, tmp_path, as_of=math.inf)
    assert statuses(tmp_path) == {
        "at-end": ("joined", "request_id"),
        "just-after": ("late", "after_window"),
        "at-end-no-req": ("joined", "user_item"),
    }
    lab = labels(tmp_path)
    assert lab.loc["r1:0", "clicked"] and lab.loc["r1:2", "clicked"]
    assert not lab.loc["r1:1", "clicked"]  # a late click never turns a label positive
    assert lab.loc["r1:0", "label_ts"] == T + W
    assert lab.loc["r1:1", "label_ts"] == T + W  # negatives: known when the window closed


def test_click_before_its_impression_is_unattributed(log, tmp_path):
    show(log, "r1", 1, [10, 11], T)
    act(log, "early-req", 1, 10, T - 1, request_id="r1")
    act(log, "early-pair", 1, 11, T - 1)  # the pair is shown, but only later
    act(log, "never-shown", 1, 99, T + 1)
    join(log, tmp_path, as_of=math.inf)
    assert statuses(tmp_path) == {
        "early-req": ("unattributed", "before_impression"),
        "early-pair": ("unattributed", "before_impression"),
        "never-shown": ("unattributed", "no_impression"),
    }
    assert not labels(tmp_path)["clicked"].any()


def test_duplicate_clicks(log, tmp_path):
    show(log, "r1", 1, [10, 11], T)
    act(log, "c1", 1, 10, T + 5, request_id="r1")
    act(log, "c1", 1, 10, T + 5, request_id="r1")  # the same event re-sent: stored once
    act(log, "c2", 1, 10, T + 7, request_id="r1")  # a second click on the same item
    act(log, "w1", 1, 10, T + 60, request_id="r1", type="watch", value=300.0)
    act(log, "w2", 1, 10, T + 90, request_id="r1", type="watch", value=420.0)  # progress
    rep = join(log, tmp_path, as_of=math.inf)
    assert rep.new_interactions == 4
    st = read_statuses(tmp_path / "labels")
    assert sorted(st["event_id"]) == ["c1", "c2", "w1", "w2"]
    assert (st["status"] == "joined").all()
    lab = labels(tmp_path)
    row = lab.loc["r1:0"]
    assert row["clicked"] and row["n_interactions"] == 4
    assert row["value"] == 420.0  # max watch value, not the sum of progress reports
    assert row["event_type"] == "watch" and row["label_ts"] == T + 5
    assert lab["clicked"].sum() == 1  # one positive impression, however many clicks


def test_request_id_paths_that_cannot_attribute(log, tmp_path):
    show(log, "r1", 1, [10], T)
    act(log, "other-user", 2, 10, T + 1, request_id="r1")
    act(log, "not-in-slate", 1, 77, T + 1, request_id="r1")
    act(log, "no-such-request", 1, 10, T + 1, request_id="nope")
    join(log, tmp_path, as_of=math.inf)
    assert statuses(tmp_path) == {
        "other-user": ("unattributed", "user_mismatch"),
        "not-in-slate": ("unattributed", "unknown_request"),
        "no-such-request": ("unattributed", "unknown_request"),
    }


def test_nearest_earlier_impression_wins_without_a_request_id(log, tmp_path):
    show(log, "r1", 1, [10], T)
    show(log, "r2", 1, [10], T + 1000)
    show(log, "r3", 1, [10], T + 2000)  # after the click: not a candidate
    act(log, "c", 1, 10, T + 1500)
    join(log, tmp_path, as_of=math.inf)
    st = read_statuses(tmp_path / "labels").set_index("event_id")
    assert st.loc["c", "impression_event_id"] == "r2:0"
    lab = labels(tmp_path)
    assert lab["clicked"].to_dict() == {"r1:0": False, "r2:0": True, "r3:0": False}


def test_open_windows_are_pending_not_negative(log, tmp_path):
    show(log, "r1", 1, [10, 11], T)
    act(log, "other", 5, 55, T + 100)  # moves the event-time watermark to T + 100
    rep = join(log, tmp_path)
    assert (rep.labels_written, rep.pending) == (0, 2)
    assert read_labels(tmp_path / "labels").empty  # nothing written as a negative

    act(log, "c", 1, 11, T + 600, request_id="r1")  # inside the window, next batch
    act(log, "tick", 5, 56, T + W + 1)  # the watermark passes T + W: the window closes
    rep = join(log, tmp_path)
    assert (rep.labels_written, rep.pending) == (2, 0)
    assert labels(tmp_path)["clicked"].to_dict() == {"r1:0": False, "r1:1": True}


def test_click_after_the_label_was_final_is_late_and_changes_nothing(log, tmp_path):
    show(log, "r1", 1, [10], T)
    act(log, "tick", 5, 55, T + W + 10)
    join(log, tmp_path)
    before = labels(tmp_path)
    act(log, "slow-phone", 1, 10, T + 30, request_id="r1")  # happened in time, arrived late
    act(log, "slow-pair", 1, 10, T + 40)
    rep = join(log, tmp_path)
    assert rep.labels_written == 0
    assert statuses(tmp_path)["slow-phone"] == ("late", "after_finalized")
    assert statuses(tmp_path)["slow-pair"] == ("late", "after_finalized")
    pd.testing.assert_frame_equal(labels(tmp_path), before)


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def _scenario(log):
    rng = np.random.default_rng(0)
    for r in range(30):
        ts = T + 60 * r
        items = rng.choice(50, 5, replace=False) + 1
        show(log, f"r{r}", r % 7, items.tolist(), ts)
        for p in np.flatnonzero(rng.random(5) < 0.3):
            delay = float(rng.choice([3, 200, W, W + 5, 4000]))
            req = f"r{r}" if rng.random() < 0.5 else ""
            act(log, f"c{r}-{p}", r % 7, int(items[p]), ts + delay, request_id=req)


def test_rerunning_the_join_changes_nothing(log, tmp_path):
    _scenario(log)
    first = join(log, tmp_path, as_of=T + 2500)  # some windows still open
    assert first.labels_written > 0 and first.pending > 0
    snapshot = _files(tmp_path / "labels")
    again = join(log, tmp_path, as_of=T + 2500)
    assert again.noop
    assert _files(tmp_path / "labels") == snapshot
    rest = join(log, tmp_path)  # the log's own watermark closes the remaining windows
    assert rest.labels_written == first.pending
    snapshot = _files(tmp_path / "labels")
    assert join(log, tmp_path).noop
    assert _files(tmp_path / "labels") == snapshot


def test_incremental_runs_equal_one_run_over_everything(tmp_path):
    inc = open_sink(tmp_path / "inc.db")
    one = open_sink(tmp_path / "one.db")
    _scenario(one)
    # The same events, with a join after every few appends.
    src = one.read("impression"), one.read("interaction")
    imps, inter = src
    cuts = [0, 40, 90, len(imps)]
    for a, b in itertools.pairwise(cuts):
        part = imps.iloc[a:b]
        inc.write_impressions({c: part[c].to_numpy() for c in part.columns})
        hi = part["ts"].max()
        lo = imps["ts"].iloc[a]
        chunk = inter[(inter["ts"] >= (lo if a else -np.inf)) & (inter["ts"] < hi)]
        chunk = chunk[~chunk["event_id"].isin(inc.read("interaction")["event_id"])]
        inc.write_interactions({c: chunk[c].to_numpy() for c in chunk.columns})
        run_join(JoinConfig(log=str(inc.path), out=str(tmp_path / "inc"), window_s=W))
    rest = inter[~inter["event_id"].isin(inc.read("interaction")["event_id"])]
    inc.write_interactions({c: rest[c].to_numpy() for c in rest.columns})
    run_join(JoinConfig(log=str(inc.path), out=str(tmp_path / "inc"), window_s=W, as_of=math.inf))
    run_join(JoinConfig(log=str(one.path), out=str(tmp_path / "one"), window_s=W, as_of=math.inf))

    def norm(df):
        return df.drop(columns=["date"]).sort_values("event_id").reset_index(drop=True)

    a, b = read_labels(tmp_path / "inc"), read_labels(tmp_path / "one")
    assert len(a) == len(imps)
    # Labels agree except where an in-window click reached the log after its impression
    # was final: the incremental run counts it late (by design), the one-shot run joins it.
    st = read_statuses(tmp_path / "inc")
    late_final = set(st.loc[st["reason"] == "after_finalized", "impression_event_id"])
    keep_a, keep_b = norm(a), norm(b)
    keep_a = keep_a[~keep_a["event_id"].isin(late_final)].reset_index(drop=True)
    keep_b = keep_b[~keep_b["event_id"].isin(late_final)].reset_index(drop=True)
    pd.testing.assert_frame_equal(keep_a, keep_b)
    assert len(read_statuses(tmp_path / "inc")) == len(inter)


def test_a_crash_before_the_state_commit_leaves_no_duplicates(log, tmp_path, monkeypatch):
    _scenario(log)
    real = join_mod.atomic_write_text

    def crash(path, text):
        raise OSError("disk vanished")  # after the label files, before the state

    monkeypatch.setattr(join_mod, "atomic_write_text", crash)
    with pytest.raises(OSError):
        join(log, tmp_path, as_of=math.inf)
    assert read_state(tmp_path / "labels") is None
    monkeypatch.setattr(join_mod, "atomic_write_text", real)
    rep = join(log, tmp_path, as_of=math.inf)
    lab = read_labels(tmp_path / "labels")
    assert rep.labels_written == len(lab) == 150
    assert not lab["event_id"].duplicated().any()
    assert not read_statuses(tmp_path / "labels")["event_id"].duplicated().any()


def test_window_change_needs_a_fresh_folder(log, tmp_path):
    show(log, "r1", 1, [10], T)
    join(log, tmp_path)
    with pytest.raises(ValueError, match="window_s"):
        run_join(JoinConfig(log=str(log.path), out=str(tmp_path / "labels"), window_s=60))


def test_partitions_and_positives_export(log, tmp_path):
    day = 86_400.0
    show(log, "r1", 1, [10, 11], T)
    show(log, "r2", 2, [10], T + day)
    act(log, "c1", 1, 10, T + 5, request_id="r1", type="click")
    act(log, "l1", 1, 10, T + 9, request_id="r1", type="like")
    act(log, "w2", 2, 10, T + day + 5, type="watch", value=120.0)
    join(log, tmp_path, as_of=math.inf)
    root = tmp_path / "labels"
    assert sorted(p.name for p in root.glob("date=*")) == ["date=2025-06-15", "date=2025-06-16"]
    n = export_positives(root, tmp_path / "pos.parquet")
    pos = pd.read_parquet(tmp_path / "pos.parquet")
    assert n == 2
    validate_table(pos, INTERACTION_COLUMNS, "positives")  # what `northstar train` reads
    assert pos.to_dict("list") == {
        "user_id": [1, 2],
        "item_id": [10, 10],
        "timestamp": [int(T + 5), int(T + day + 5)],
        "event_type": ["like", "watch"],
        "value": [0.0, 120.0],
    }


def test_parsers():
    assert parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration("45") == 45 and parse_duration("1.5d") == 129_600
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
    assert parse_as_of(None) is None and parse_as_of("end") == math.inf
    assert parse_as_of("2025-06-15T15:06:40") == T
    assert parse_as_of("1750000000") == T
