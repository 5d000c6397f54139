"""loadtest.answers: what Locust counts as a right answer, on hand-made responses."""

import numpy as np

from loadtest.answers import check_recommend, check_retrieval
from serving.repository import PAD_ITEM

CAT = np.arange(100, 200)


def test_a_full_unseen_slate_from_the_catalogue_is_right():
    ids = np.arange(100, 110)
    assert check_recommend(ids, k=10, graph_k=20, seen=np.array([150]), catalogue=CAT) is None
    assert check_recommend(ids, k=10, graph_k=20, seen=None) is None


def test_wrong_slates_are_named():
    seen = np.array([150])
    cases = {
        "repeated": np.array([100, 100, *range(102, 110)]),
        "already seen": np.arange(145, 155),
        "not in the catalogue": np.array([*range(101, 110), 999]),
        "padding before items": np.array([PAD_ITEM, *range(101, 110)]),
        "expected 10": np.array([*range(110, 119), PAD_ITEM]),  # short with little seen
        "expected 10 ": np.arange(110, 115),  # too few ids at all
    }
    for why, ids in cases.items():
        got = check_recommend(ids, k=10, graph_k=20, seen=seen, catalogue=CAT)
        assert got is not None and why.strip().split()[0] in got, (why, got)


def test_a_short_slate_is_right_only_where_seen_items_used_the_overfetch():
    ids = np.array([*range(110, 118), PAD_ITEM, PAD_ITEM])
    many_seen = np.arange(120, 135)  # 15 seen > graph_k - k = 10
    assert check_recommend(ids, k=10, graph_k=20, seen=many_seen) is None
    assert check_recommend(ids, k=10, graph_k=20, seen=None) is None  # unknown: allowed
    assert "expected 10" in check_recommend(ids, k=10, graph_k=20, seen=np.arange(120, 125))
    few = np.arange(120, 125)  # a server that takes feedback may know more seen items
    assert check_recommend(ids, k=10, graph_k=20, seen=few, seen_is_all=False) is None
    empty = np.full(10, PAD_ITEM)  # every candidate seen: an empty slate, by contract
    assert check_recommend(empty, k=10, graph_k=20, seen=many_seen) is None
    assert "0 items" in check_recommend(empty, k=10, graph_k=20, seen=np.arange(120, 125))


def test_retrieval_rows_are_distinct_catalogue_ids_in_score_order():
    ids = np.array([[100, 101, 102], [103, 104, 105]])
    scores = np.array([[3.0, 2.0, 1.0], [5.0, 5.0, 0.5]])
    assert check_retrieval(ids, scores, batch=2, graph_k=3, catalogue=CAT) is None
    assert "shapes" in check_retrieval(ids, scores, batch=3, graph_k=3)
    assert "descending" in check_retrieval(ids, scores[:, ::-1], batch=2, graph_k=3)
    rep = np.array([[100, 100, 102], [103, 104, 105]])
    assert "repeated" in check_retrieval(rep, scores, batch=2, graph_k=3)
    assert "catalogue" in check_retrieval(ids + 100, scores, batch=2, graph_k=3, catalogue=CAT)
    assert "finite" in check_retrieval(ids, scores * np.nan, batch=2, graph_k=3)
