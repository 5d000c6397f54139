"""Baselines (TopPop, RecentPop, EASE) ranked by the model's evaluator, and the bias metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fairness import exposure as fx
from models.features import FeatureVocab
from models.prior import DAY_S, RecentWindow
from training.baselines import EASE, RecentPop, TopPop, ease_weights, parse_baseline
from training.evaluate import evaluate, format_table
from training.metrics import arp_at_k, exposure_gini_at_k


def test_ease_two_items_by_hand():
    # G = XᵀX = [[a, c], [c, b]]: B_12 = c / (a + λ), the ridge fit of item 2 on item 1 alone.
    x = np.array([[1, 1], [1, 0], [1, 1], [0, 1], [1, 0]], dtype=float)
    a, b, c, lam = 4.0, 3.0, 2.0, 0.5
    assert (x.T @ x).tolist() == [[a, c], [c, b]]
    w = ease_weights(x, lam)
    assert w[0, 1] == pytest.approx(c / (a + lam)) and w[1, 0] == pytest.approx(c / (b + lam))
    assert w[0, 0] == w[1, 1] == 0.0


def test_ease_columns_are_ridge_regressions_on_the_other_items():
    # EASE with diag(B) = 0 splits into one ridge regression per item on all the others.
    rng = np.random.default_rng(0)
    x = (rng.random((40, 6)) < 0.35).astype(float)
    lam = 3.0
    w = ease_weights(sp.csr_matrix(x), lam)
    for j in range(6):
        rest = [i for i in range(6) if i != j]
        xr = x[:, rest]
        expected = np.linalg.solve(xr.T @ xr + lam * np.eye(5), xr.T @ x[:, j])
        np.testing.assert_allclose(w[rest, j], expected, rtol=1e-9, atol=1e-12)
        assert w[j, j] == 0.0


ITEMS = np.arange(100, 110)  # 10 items


@pytest.fixture(scope="module")
def world():
    """Users 1-4. Item 100 was popular long ago, item 103 only in the last day."""
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "gender": ["F", "M", "F", "M"],
            "age_bucket": ["25-34"] * 4,
            "activity": ["high"] * 4,
            "occupation": ["unknown"] * 4,
        }
    )
    items = pd.DataFrame({"item_id": ITEMS, "genre": "drama", "provider": "p"})
    t0 = 1_700_000_000
    rows = [(u, 100, t0 + u) for u in (1, 2, 3, 4)]  # 100: 4 interactions, 10 days ago
    rows += [(1, 101, t0 + 10), (2, 101, t0 + 11), (1, 102, t0 + 12)]
    late = t0 + 10 * DAY_S
    rows += [(2, 103, late), (3, 103, late + 1), (4, 103, late + 2)]  # 103: 3, all recent
    rows += [(3, 104, late + 3)]
    known = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    target = pd.DataFrame({"user_id": [1, 2, 3, 4], "item_id": [103, 104, 105, 101]})
    vocab = FeatureVocab.fit(users, items, known, n_hash_buckets=2, history_len=3)
    return vocab, users, known, target


def _ranked_ids(res, vocab, k=3):
    r = res.ranked[:, :k]
    return np.where(r >= 0, vocab.item_ids[np.maximum(r, 0)], -1).tolist()


def test_baselines_go_through_the_same_evaluator(world):
    vocab, users, known, target = world
    bl = [TopPop(), RecentPop("1d"), RecentPop("30%"), EASE(1.0)]
    res = evaluate(model=None, vocab=vocab, users=users, known=known, target=target, baselines=bl)
    assert set(res) == {"toppop", "recentpop_1d", "recentpop_30pct", "ease"}
    assert res.skipped == {}
    seen = known.groupby("user_id")["item_id"].apply(set).to_dict()
    for name, r in res.items():
        assert r.user_ids.tolist() == [1, 2, 3, 4], name
        assert r.summary["users"] == 4.0
        for u, ranked in zip(r.user_ids, _ranked_ids(r, vocab, k=r.ranked.shape[1]), strict=True):
            assert not (set(ranked) & seen[u]), f"{name} ranked a known item for user {u}"
        assert {"ndcg@10", "recall@10", "arp@10", "exposure_gini@10"} <= set(r.summary)
    # TopPop here is the one the default evaluation reports.
    default = evaluate(model=None, vocab=vocab, users=users, known=known, target=target)
    np.testing.assert_array_equal(default["toppop"].ranked, res["toppop"].ranked)
    # User 1 has seen 100, 101, 102: TopPop offers 103 (3) first; so does RecentPop.
    assert _ranked_ids(res["toppop"], vocab)[0][0] == 103
    # User 4 has seen 100 and 103. TopPop: 101 (2 all-time); the last day: 104 beats 101.
    assert _ranked_ids(res["toppop"], vocab)[3][:2] == [101, 102]
    assert _ranked_ids(res["recentpop_1d"], vocab)[3][0] == 104
    # EASE: user 4 (100, 103) -> items that co-occur with them, 101 (with 100 twice) first.
    assert _ranked_ids(res["ease"], vocab)[3][0] == 101


def test_ease_is_skipped_above_its_catalogue_limit_with_the_reason(world):
    vocab, users, known, target = world
    res = evaluate(
        model=None,
        vocab=vocab,
        users=users,
        known=known,
        target=target,
        baselines=[TopPop(), EASE(1.0, max_items=5)],
    )
    assert set(res) == {"toppop"}
    assert "10 items > ease_max_items=5" in res.skipped["ease"]


def test_recent_window_days_and_share():
    ts = np.array([0, 10, 20, DAY_S * 5, DAY_S * 5 + 1, DAY_S * 6])
    assert RecentWindow.parse("2d").mask(ts).tolist() == [False] * 3 + [True] * 3
    assert RecentWindow.parse("50%").mask(ts).tolist() == [False] * 3 + [True] * 3
    assert RecentWindow.parse("0.5") == RecentWindow(share=0.5)
    assert RecentWindow.parse("7d").label == "7d" and RecentWindow(share=0.1).label == "10pct"
    with pytest.raises(ValueError, match="recent window"):
        RecentWindow.parse("lots")
    with pytest.raises(ValueError, match="expected 'toppop'"):
        parse_baseline("itemknn")
    assert parse_baseline("ease:50").lam == 50.0
    assert parse_baseline("recentpop:7d").name == "recentpop_7d"


def test_bias_metrics_match_the_fairness_definitions():
    rng = np.random.default_rng(1)
    n = 50
    ranked = rng.integers(0, n, size=(30, 12))
    ranked[3, 5:] = -1  # a short list
    ranked[7, :] = -1  # an empty one
    pop = rng.integers(0, 100, size=n).astype(float)
    exp = fx.item_exposure(ranked=ranked, n_items=n, k=10)
    assert exposure_gini_at_k(ranked=ranked, n_items=n, k=10) == pytest.approx(fx.gini(values=exp))
    assert arp_at_k(ranked=ranked, popularity=pop, k=10) == pytest.approx(
        fx.average_recommendation_popularity(ranked=ranked, popularity=pop, k=10)
    )


def test_the_table_shows_the_model_against_each_baseline_with_the_lift():
    m = {"ndcg@10": 0.2, "users": 5.0}
    table = format_table(
        {"test": {"model": m, "toppop": {"ndcg@10": 0.1}, "ease": {"ndcg@10": 0.25}}}
    )
    head, row = table.splitlines()
    assert "toppop" in head and "ease" in head and "users" not in table
    assert "2.00x" in row and "0.80x" in row
