import math

import numpy as np

from training.metrics import coverage_at_k, hit_matrix, hit_rate_at_k, ndcg_at_k, recall_at_k


def test_hit_matrix_and_metrics_by_hand():
    ranked = np.array([[3, 1, 2], [0, 4, -1]])
    hits = hit_matrix(
        ranked=ranked,
        relevant_users=np.array([0, 0, 1]),
        relevant_items=np.array([1, 5, 4]),
        n_items=6,
    )
    assert hits.tolist() == [[False, True, False], [False, True, False]]
    n_rel = np.array([2, 1])
    np.testing.assert_allclose(recall_at_k(hits=hits, n_relevant=n_rel, k=2), [0.5, 1.0])
    np.testing.assert_allclose(recall_at_k(hits=hits, n_relevant=n_rel, k=1), [0.0, 0.0])
    # user 0: DCG = 1/log2(3); IDCG (2 relevant, k=3) = 1 + 1/log2(3)
    # user 1: DCG = 1/log2(3); IDCG (1 relevant) = 1
    d = 1 / math.log2(3)
    np.testing.assert_allclose(ndcg_at_k(hits=hits, n_relevant=n_rel, k=3), [d / (1 + d), d])
    np.testing.assert_allclose(hit_rate_at_k(hits=hits, k=1), [0.0, 0.0])
    np.testing.assert_allclose(hit_rate_at_k(hits=hits, k=2), [1.0, 1.0])
    assert coverage_at_k(ranked=ranked, n_items=10, k=2) == 0.4  # {3, 1, 0, 4}


def test_perfect_ranking_has_ndcg_one_and_empty_slot_is_not_a_hit():
    ranked = np.array([[7, 8, -1]])
    hits = hit_matrix(
        ranked=ranked, relevant_users=np.array([0, 0]), relevant_items=np.array([7, 8]), n_items=10
    )
    assert ndcg_at_k(hits=hits, n_relevant=np.array([2]), k=3)[0] == 1.0
    assert recall_at_k(hits=hits, n_relevant=np.array([0]), k=3)[0] == 0.0
