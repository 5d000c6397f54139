"""Label tiers: a click is a weak label as soon as the join has seen it, a long watch or a
like makes it strong, written labels are final and pending ones are not, and each retrain
schedule takes the positives it should."""

import pytest

from feedback.join import JoinConfig, run_join
from feedback.sink import open_sink
from feedback.tiers import TierConfig, export_tiered, read_tiered, select_positives

from .test_feedback_join import act, show

T = 1_750_000_000.0
W = 1800.0
CFG = TierConfig(strong_watch_s=600.0, weak_weight=0.25)


@pytest.fixture
def labels_dir(tmp_path):
    log = open_sink(tmp_path / "events.db")
    show(log, "r1", 1, [10, 11, 12, 13], T)
    act(log, "c10", 1, 10, T + 60, request_id="r1")  # click only: weak
    act(log, "c11", 1, 11, T + 60, request_id="r1")
    act(log, "w11", 1, 11, T + 90, request_id="r1", type="watch", value=900.0)  # strong
    act(log, "c12", 1, 12, T + 60, request_id="r1")
    act(log, "w12", 1, 12, T + 90, request_id="r1", type="watch", value=120.0)  # weak
    show(log, "r2", 2, [20, 21], T + 3 * W)  # still in its window at the join below
    act(log, "c20", 2, 20, T + 3 * W + 30, request_id="r2")  # weak, not final
    out = tmp_path / "labels"
    run_join(JoinConfig(log=str(log.path), out=str(out), window_s=W))
    return out


def test_tiers_and_finality(labels_dir):
    df = read_tiered(labels_dir, CFG).set_index("event_id")
    assert df.loc[["r1:0", "r1:1", "r1:2", "r1:3"], "tier"].tolist() == [
        "weak",
        "strong",
        "weak",
        None,
    ]
    assert df.loc[["r1:0", "r1:3"], "final"].tolist() == [True, True]
    assert df.loc["r2:0", "tier"] == "weak" and not df.loc["r2:0", "final"]
    assert df.loc["r2:1", "tier"] is None and not df.loc["r2:1", "final"]
    only_written = read_tiered(labels_dir, CFG, pending=False)
    assert only_written["final"].all() and "r2:0" not in set(only_written["event_id"])


def test_each_schedule_takes_its_positives(labels_dir):
    weak = select_positives(labels_dir, "weak", CFG).set_index("item_id")
    assert sorted(weak.index) == [10, 11, 12, 20]  # everything attributed, final or not
    assert weak.loc[11, "weight"] == 1.0 and weak.loc[10, "weight"] == 0.25
    assert not weak.loc[20, "final"]
    strong = select_positives(labels_dir, "strong", CFG)
    assert strong["item_id"].tolist() == [11] and strong["final"].all()
    final = select_positives(labels_dir, "final", CFG)
    assert sorted(final["item_id"]) == [10, 11, 12]


def test_a_like_is_strong_unless_told_otherwise(tmp_path):
    log = open_sink(tmp_path / "events.db")
    show(log, "r1", 1, [10], T)
    act(log, "c", 1, 10, T + 60, request_id="r1")
    act(log, "l", 1, 10, T + 70, request_id="r1", type="like")
    act(log, "tick", 9, 99, T + 2 * W)
    run_join(JoinConfig(log=str(log.path), out=str(tmp_path / "labels"), window_s=W))
    assert read_tiered(tmp_path / "labels", CFG)["tier"].tolist() == ["strong"]
    no_likes = TierConfig(strong_watch_s=600.0, like_is_strong=False)
    assert read_tiered(tmp_path / "labels", no_likes)["tier"].tolist() == ["weak"]


def test_export_counts_and_bad_settings(labels_dir, tmp_path):
    counts = export_tiered(labels_dir, tmp_path / "pos.parquet", "weak", CFG)
    assert counts == {"positives": 4, "weak": 3, "strong": 1, "not_final": 1}
    with pytest.raises(ValueError, match="use='fresh'"):
        select_positives(labels_dir, "fresh", CFG)
    with pytest.raises(ValueError, match="strong_watch_s"):
        TierConfig(strong_watch_s=0)
