"""ε-greedy exploration: the logged propensity is P(item at slot) under the mixture policy."""

import numpy as np
import pytest

from feedback.explore import rank_with_exploration

IDS = np.array([[10, 11, 12, 13, 14]])
SCORES = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)


def test_greedy_rows_log_one_minus_eps_plus_eps_over_n():
    rng = np.random.default_rng(0)
    r = rank_with_exploration(
        np.repeat(IDS, 50, 0), np.repeat(SCORES, 50, 0), 3, epsilon=0.2, rng=rng
    )
    greedy = ~r.explored
    assert greedy.any() and r.explored.any()
    assert (r.item_ids[greedy] == [10, 11, 12]).all()
    # 1 - 0.2 + 0.2 / 5 = 0.84, by hand
    np.testing.assert_allclose(r.propensity[greedy], 0.84)
    # explored rows: 0.84 where the random slot happens to match greedy, else 0.2 / 5 = 0.04
    ex = r.propensity[r.explored]
    assert set(np.round(ex, 10).ravel()) <= {0.84, 0.04}
    match = r.item_ids[r.explored] == np.array([10, 11, 12])
    np.testing.assert_allclose(ex[match], 0.84)
    np.testing.assert_allclose(ex[~match], 0.04)


def test_epsilon_zero_is_the_greedy_ranking_with_propensity_one():
    r = rank_with_exploration(IDS, SCORES, 2, epsilon=0.0, rng=np.random.default_rng(1))
    assert r.item_ids.tolist() == [[10, 11]] and r.propensity.tolist() == [[1.0, 1.0]]
    assert r.scores.tolist() == [[5.0, 4.0]]


def test_propensity_matches_the_empirical_frequency():
    """Monte Carlo: over many requests, P(item i at slot p) equals the logged propensity."""
    rng = np.random.default_rng(42)
    n, eps = 40_000, 0.3
    r = rank_with_exploration(
        np.repeat(IDS, n, 0), np.repeat(SCORES, n, 0), 3, epsilon=eps, rng=rng
    )
    for slot in range(3):
        for item in IDS[0]:
            hit = r.item_ids[:, slot] == item
            logged = r.propensity[hit, slot]
            if not hit.any():
                continue
            assert np.allclose(logged, logged[0])  # a function of (item, slot) only
            assert abs(hit.mean() - logged[0]) < 0.01, (slot, item, hit.mean(), logged[0])


def test_invalid_candidates_are_never_shown_and_short_rows_are_padded():
    ids = np.array([[10, 11, 12, 13], [20, -1, 21, -1]])
    scores = np.ones_like(ids, dtype=np.float32)
    valid = np.array([[True, False, True, True], [True, False, True, False]])
    r = rank_with_exploration(
        ids, scores, 3, epsilon=1.0, rng=np.random.default_rng(3), valid=valid
    )
    assert 11 not in r.item_ids[0]
    assert sorted(r.item_ids[1].tolist()) == [-1, 20, 21]
    # row 1 has 2 valid candidates: every shown item has ε / 2 (+ 1 - ε if greedy there)
    shown = r.item_ids[1] >= 0
    assert (r.propensity[1][~shown] == 0).all()
    assert set(r.propensity[1][shown].tolist()) <= {0.5, 1.0}
    assert (r.scores[1][~shown] == 0.0).all()  # pad score: JSON-safe, not -inf


def test_per_row_k():
    ids = np.repeat(IDS, 2, 0)
    r = rank_with_exploration(
        ids, np.repeat(SCORES, 2, 0), np.array([1, 3]), epsilon=0.0, rng=np.random.default_rng(0)
    )
    assert r.item_ids.tolist() == [[10, -1, -1], [10, 11, 12]]


@pytest.mark.parametrize("epsilon", [-0.1, 1.5])
def test_epsilon_must_be_a_probability(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        rank_with_exploration(IDS, SCORES, 2, epsilon=epsilon, rng=np.random.default_rng(0))
