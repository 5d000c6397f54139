"""The full softmax and its logit adjustment, on a catalogue where popularity is all there is."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.loss import full_softmax_loss

POPULARITY = torch.tensor([8.0, 4.0, 2.0, 1.0]) / 15.0


def _fit(log_prior: torch.Tensor | None) -> torch.Tensor:
    """Learn one score per item for identical users whose positives follow POPULARITY."""
    torch.manual_seed(0)
    scores = torch.zeros(4, 1, requires_grad=True)
    opt = torch.optim.Adam([scores], lr=0.05)
    for _ in range(400):
        items = torch.multinomial(POPULARITY, 256, replacement=True)
        loss = full_softmax_loss(
            user_emb=torch.ones(256, 1),
            all_item_emb=scores,
            item_ids=items,
            temperature=1.0,
            log_prior=log_prior,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return scores.detach()[:, 0]


def test_full_softmax_is_cross_entropy_over_every_item():
    torch.manual_seed(1)
    u, v, ids = torch.randn(5, 3), torch.randn(7, 3), torch.tensor([0, 6, 2, 2, 5])
    got = full_softmax_loss(user_emb=u, all_item_emb=v, item_ids=ids, temperature=0.5)
    assert torch.allclose(got, F.cross_entropy(u @ v.T / 0.5, ids))
    w = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    one = full_softmax_loss(user_emb=u, all_item_emb=v, item_ids=ids, temperature=0.5, weight=w)
    assert torch.allclose(one, F.cross_entropy(u[:1] @ v.T / 0.5, ids[:1]))


def test_without_adjustment_the_scores_learn_popularity_and_with_it_they_do_not():
    plain = _fit(None)
    assert torch.equal(plain.argsort(descending=True), torch.arange(4))
    # softmax(scores) recovers the popularity: the spread is log(8) between first and last.
    assert plain[0] - plain[3] > 0.8 * math.log(8)
    adjusted = _fit(torch.log(POPULARITY))
    assert (adjusted.max() - adjusted.min()) < 0.2 * (plain[0] - plain[3])
