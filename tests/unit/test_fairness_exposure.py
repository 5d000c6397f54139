"""Item-side metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from fairness import exposure as ex


def test_position_weights_are_the_dcg_discount():
    np.testing.assert_allclose(ex.position_weights(k=3), [1.0, 1 / math.log2(3), 0.5])


def test_item_exposure_sums_position_weights_and_skips_empty_slots():
    ranked = np.array([[0, 1, 2], [1, -1, 3]])
    got = ex.item_exposure(ranked=ranked, n_items=5, k=3)
    # item 0: rank 1 once; item 1: rank 2 (user 0) + rank 1 (user 1); items 2, 3: rank 3.
    np.testing.assert_allclose(got, [1.0, 1 / math.log2(3) + 1.0, 0.5, 0.5, 0.0])
    # k cuts the list: only the first column counts.
    np.testing.assert_allclose(ex.item_exposure(ranked=ranked, n_items=5, k=1), [1, 1, 0, 0, 0])


def test_group_shares():
    shares = ex.group_shares(
        values=np.array([1.0, 3.0, 4.0]), groups=np.array([0, 1, 1]), n_groups=3
    )
    np.testing.assert_allclose(shares, [0.125, 0.875, 0.0])
    np.testing.assert_allclose(
        ex.group_shares(values=np.zeros(2), groups=np.array([0, 1]), n_groups=2), [0, 0]
    )


def test_gini_by_hand():
    assert ex.gini(values=np.ones(4)) == 0.0
    assert ex.gini(values=np.array([0, 0, 0, 1.0])) == pytest.approx(0.75)  # (n-1)/n
    # [1, 2, 3]: sum |xi - xj| over ordered pairs = 8; G = 8 / (2 * 3^2 * mean 2) = 2/9.
    assert ex.gini(values=np.array([3.0, 1.0, 2.0])) == pytest.approx(2 / 9)
    assert ex.gini(values=np.zeros(3)) == 0.0


def test_lorenz_curve_by_hand_and_its_area_is_half_the_gini():
    x, y = ex.lorenz_curve(values=np.array([0, 0, 0, 1.0]), points=5)
    np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(y, [0, 0, 0, 0, 1])
    v = np.array([5.0, 1.0, 0.0, 2.0, 2.0])
    x, y = ex.lorenz_curve(values=v, points=6)  # points fall on item boundaries: exact
    area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))  # trapezoids
    assert 1 - 2 * area == pytest.approx(ex.gini(values=v))


def test_disparate_treatment_ratio_by_hand():
    # a: 20% of exposure for 40% of relevance (0.5); b: 80% for 60% (4/3): DTR = 0.375.
    dtr = ex.disparate_treatment_ratio(
        exposure_a=0.2, relevance_a=0.4, exposure_b=0.8, relevance_b=0.6
    )
    assert dtr == pytest.approx(0.375)
    # Exposure in proportion to relevance is parity, whatever the group sizes.
    assert ex.disparate_treatment_ratio(
        exposure_a=0.1, relevance_a=0.1, exposure_b=0.9, relevance_b=0.9
    ) == pytest.approx(1.0)
    assert math.isnan(
        ex.disparate_treatment_ratio(
            exposure_a=0.1, relevance_a=0.0, exposure_b=0.9, relevance_b=1.0
        )
    )


def test_catalogue_coverage():
    ranked = np.array([[0, 1], [1, 2], [-1, -1]])
    assert ex.catalogue_coverage(ranked=ranked, n_items=10, k=2) == pytest.approx(0.3)
    assert ex.catalogue_coverage(ranked=ranked, n_items=10, k=1) == pytest.approx(0.2)


def test_popularity_buckets_by_share_of_interactions():
    counts = np.array([10, 5, 3, 1, 1, 0])
    # Share held by the items before each: 0, .5, .75, .9, .95, 1.0 (total 20).
    # head: < 0.2 -> item 0; tail: >= 0.8 -> items 3, 4, 5; mid: the rest.
    got = ex.popularity_buckets(counts=counts, head_share=0.2, tail_share=0.2)
    assert got.tolist() == [ex.HEAD, ex.MID, ex.MID, ex.TAIL, ex.TAIL, ex.TAIL]
    # The order of the input does not matter.
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert ex.popularity_buckets(counts=counts[perm]).tolist() == got[perm].tolist()
    assert ex.popularity_buckets(counts=np.zeros(3)).tolist() == [ex.TAIL] * 3


def test_arp_and_aplt_by_hand():
    popularity = np.array([10.0, 5.0, 1.0, 0.0])
    long_tail = np.array([False, False, True, True])
    ranked = np.array([[0, 1], [2, -1], [-1, -1]])
    # user 0: (10 + 5) / 2 = 7.5; user 1: 1 / 1 = 1; user 2 has no list and is left out.
    assert ex.average_recommendation_popularity(
        ranked=ranked, popularity=popularity, k=2
    ) == pytest.approx(4.25)
    # user 0: 0 of 2 long-tail; user 1: 1 of 1.
    assert ex.average_percentage_long_tail(
        ranked=ranked, long_tail=long_tail, k=2
    ) == pytest.approx(0.5)
    assert ex.average_recommendation_popularity(
        ranked=ranked, popularity=popularity, k=1
    ) == pytest.approx(5.5)
