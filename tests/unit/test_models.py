import math

import numpy as np
import torch

from models.features import FeatureSpec
from models.loss import StreamingFrequencyEstimator, in_batch_softmax_loss
from models.retrieval import TwoTowerRetrieval
from models.towers import TowerConfig, TwoTower

SPEC = FeatureSpec(
    n_users=10,
    n_items=30,
    n_hash_buckets=4,
    history_len=5,
    user_cat_cardinalities=(3, 4, 2, 5),
    item_cat_cardinalities=(6, 3),
)
CFG = TowerConfig(id_dim=8, cat_dim=4, hidden_dim=16, out_dim=12, dropout=0.0)


def _model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(SPEC, CFG, item_cats=torch.randint(0, 3, (SPEC.n_items, 2)))


def _user_batch(b: int):
    return (
        torch.randint(0, SPEC.user_rows, (b, 1)),
        torch.randint(0, 2, (b, 4)),
        torch.randint(0, SPEC.n_items + 1, (b, SPEC.history_len)),
    )


def test_tower_shapes_and_unit_norm():
    m = _model()
    u = m.user_embed(*_user_batch(7))
    v = m.item_embed(torch.arange(5))
    assert u.shape == (7, 12) and v.shape == (5, 12)
    assert torch.allclose(u.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert m.item_embeddings().shape == (SPEC.n_items, 12)


def test_history_padding_is_ignored():
    m = _model().eval()
    uid, cats, hist = _user_batch(1)
    hist[:] = 0
    hist[0, 0] = 3
    padded = m.user_embed(uid, cats, hist)
    hist2 = hist.clone()
    hist2[0, 1:] = 0  # same history, different amount of padding has no effect
    assert torch.allclose(padded, m.user_embed(uid, cats, hist2))


def test_retrieval_topk_matches_bruteforce():
    m = _model().eval()
    raw = torch.arange(100, 100 + SPEC.n_items)
    r = TwoTowerRetrieval.from_two_tower(m, raw, k=7)
    batch = _user_batch(4)
    ids, scores = r(*batch)
    full = m.user_embed(*batch) @ m.item_embeddings().T
    assert ids.shape == (4, 7) and scores.shape == (4, 7)
    assert torch.equal(ids, raw[full.topk(7).indices])
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_loss_with_logq_hand_computed():
    # Two users, two items, orthogonal embeddings: logits are easy to write down.
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_q = torch.log(torch.tensor([0.5, 0.25]))
    t = 0.5
    loss = in_batch_softmax_loss(
        user_emb=u, item_emb=v, item_ids=torch.tensor([0, 1]), log_q=log_q, temperature=t
    )
    # row 0: logits [1/t - log .5, 0 - log .25] = [2.693, 1.386]; target 0
    l0 = -(2 - math.log(0.5)) + math.log(math.exp(2 - math.log(0.5)) + math.exp(-math.log(0.25)))
    # row 1: logits [0 - log .5, 2 - log .25]; target 1
    l1 = -(2 - math.log(0.25)) + math.log(math.exp(-math.log(0.5)) + math.exp(2 - math.log(0.25)))
    assert math.isclose(float(loss), (l0 + l1) / 2, rel_tol=1e-6)


def test_loss_masks_duplicate_positives():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = in_batch_softmax_loss(
        user_emb=u, item_emb=v, item_ids=torch.tensor([3, 3]), log_q=torch.zeros(2), temperature=1.0
    )
    # Each row's only other column is the same item: masked, so the loss is exactly 0.
    assert float(loss) == 0.0


def test_loss_random_negatives_masked_when_equal_to_positive():
    u = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0]])
    loss = in_batch_softmax_loss(
        user_emb=u,
        item_emb=v,
        item_ids=torch.tensor([2]),
        log_q=torch.zeros(1),
        temperature=1.0,
        neg_emb=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        neg_ids=torch.tensor([2, 5]),
        neg_log_q=torch.zeros(2),
    )
    expected = -1.0 + math.log(math.exp(1.0) + math.exp(0.0))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_frequency_estimator_tracks_rates():
    est = StreamingFrequencyEstimator(n_items=3, alpha=0.1)
    for step in range(400):
        items = [0] if step % 2 == 0 else [0, 1]  # item 0 every step, item 1 every 2nd
        if step % 4 == 0:
            items.append(2)  # item 2 every 4th step
        est.update(torch.tensor(items))
    p = est.probability(torch.arange(3)).numpy()
    np.testing.assert_allclose(p, [1.0, 0.5, 0.25], rtol=0.05)
