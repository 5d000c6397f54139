"""Offline evaluation on a planted catalogue: known items never ranked, every other item
competes (a full ranking, no sampled negatives), and the metrics count exactly that.

The model is a stand-in with planted scores (score(user, item) is chosen per user), so
the expected ranking is known by construction; `training.evaluate.evaluate` and
`training.metrics` are the real ones.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models.features import FeatureVocab
from training.evaluate import evaluate

ITEMS = np.arange(100, 112)  # 12 items: a catalogue smaller than MAX_K, so k = 12
N = len(ITEMS)
PLANTED = 100  # user 1 trained on it, and the model scores it highest of all for user 1


class PlantedScores:
    """What `evaluate` uses of a TwoTower, with score(user row, item) = scores[row][item]:
    the user embedding is the row of planted scores, the item table the identity."""

    def __init__(self, vocab: FeatureVocab, by_user: dict[int, np.ndarray]):
        self.rows = {int(vocab.user_index(np.array([u]))[0]): s for u, s in by_user.items()}

    def eval(self) -> PlantedScores:
        return self

    def item_embeddings(self) -> torch.Tensor:
        return torch.eye(N)

    def user_embed(self, user_index, user_cats, history, history_ts=None) -> torch.Tensor:
        rows = [self.rows[int(u)] for u in user_index.reshape(-1)]
        return torch.as_tensor(np.stack(rows), dtype=torch.float32)


def _idx(*raw: int) -> list[int]:
    return [int(i) - 100 for i in raw]  # dense index of a raw item id (ids are sorted)


def _user_1_scores() -> np.ndarray:
    """The two known items (100 planted, 105) on top, then 101..111 in order."""
    s = 50.0 - np.arange(N)
    s[_idx(PLANTED)] = 100.0
    s[_idx(105)] = 99.0
    return s


@pytest.fixture(scope="module")
def results():
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "gender": ["F", "M"],
            "age_bucket": ["25-34"] * 2,
            "activity": ["high"] * 2,
            "occupation": ["unknown"] * 2,
        }
    )
    items = pd.DataFrame({"item_id": ITEMS, "genre": "drama", "provider": "p"})
    # Known (training) interactions, in time order.
    known = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [PLANTED, 105, 107]})
    # What happened next: user 1 watched the lowest-scored item and re-watched a known one.
    target = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [111, 105, 100]})
    vocab = FeatureVocab.fit(users, items, known, n_hash_buckets=2, history_len=3)
    # user 2: the reverse order (111 first), so its known item 107 sits in the middle
    scores = {1: _user_1_scores(), 2: np.arange(N, dtype=np.float64)}
    model = PlantedScores(vocab, scores)
    return evaluate(model=model, vocab=vocab, users=users, known=known, target=target)


def test_scores_are_planted_as_described():
    s = _user_1_scores()
    assert np.argsort(-s)[:2].tolist() == _idx(PLANTED, 105)  # the two known items on top
    assert int(np.argmin(s)) == _idx(111)[0]


def test_known_items_are_never_ranked_and_every_other_item_is(results):
    res = results["model"]
    assert res.user_ids.tolist() == [1, 2]
    assert res.ranked.shape == (2, N)  # k = min(MAX_K, catalogue)
    u1, u2 = res.ranked.tolist()
    # User 1: the planted item, scored highest, is not recommended; nor is the other known
    # item; the 10 unknown items all are, in score order down to the lowest one; the two
    # slots left over stay empty (-1) rather than holding known items.
    assert u1 == [*_idx(101, 102, 103, 104, 106, 107, 108, 109, 110, 111), -1, -1]
    # User 2: 11 unknown items in its planted order (by descending id), 107 skipped.
    assert u2 == [*_idx(111, 110, 109, 108, 106, 105, 104, 103, 102, 101, 100), -1]
    for row, known in ((u1, _idx(PLANTED, 105)), (u2, _idx(107))):
        shown = [i for i in row if i >= 0]
        assert sorted(shown) == sorted(set(range(N)) - set(known))  # all the others compete


def test_metrics_count_the_full_ranking(results):
    m = results["model"].per_user
    # User 1: relevant = {111 (unknown, ranked last of 10), 105 (known: never rankable)}.
    # User 2: relevant = {100}, ranked 11th of 11.
    assert m["recall@10"].tolist() == [0.5, 0.0]
    assert m["recall@50"].tolist() == [0.5, 1.0]  # a known item is never a hit, at any k
    assert m["recall@100"].tolist() == [0.5, 1.0]
    assert m["hitrate@10"].tolist() == [1.0, 0.0]
    idcg_2 = 1 + 1 / math.log2(3)  # two relevant items
    np.testing.assert_allclose(m["ndcg@10"], [(1 / math.log2(11)) / idcg_2, 0.0])
    np.testing.assert_allclose(m["ndcg@50"], [(1 / math.log2(11)) / idcg_2, 1 / math.log2(12)])
    # Top 10s: user 1 all but 100 and 105, user 2 all but 100 and 107: 11 of 12 items.
    assert results["model"].summary["coverage@10"] == pytest.approx(11 / 12)


def test_toppop_goes_through_the_same_exclusion(results):
    u1, u2 = results["toppop"].ranked.tolist()
    # Popularity in the known interactions: 100, 105, 107 once each (ties by index).
    assert u1 == [*_idx(107, 101, 102, 103, 104, 106, 108, 109, 110, 111), -1, -1]
    assert u2 == [*_idx(100, 105, 101, 102, 103, 104, 106, 108, 109, 110, 111), -1]
