"""Training objectives: in-batch sampled softmax with logQ correction (Yi et al., RecSys 2019),
and the full softmax over the whole catalogue for catalogues small enough to score per batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StreamingFrequencyEstimator(nn.Module):
    """Estimates each item's sampling probability from the stream of training batches.

    Yi et al. (2019), Algorithm 2: keep, per item, the step it was last seen (A)
    and a moving average of the gap between sightings (B); the item then appears
    about once every B steps, so its per-batch probability is 1/B. Items here
    have dense indices, so the "hash" is the identity and there are no collisions.
    """

    def __init__(self, n_items: int, alpha: float = 0.05, init_gap: float | None = None):
        super().__init__()
        self.alpha = alpha
        # Unseen items start as rare: a gap of n_items steps is the uniform guess.
        gap = float(init_gap if init_gap is not None else max(n_items, 1))
        self.register_buffer("last_step", torch.zeros(n_items, dtype=torch.float64))
        self.register_buffer("gap", torch.full((n_items,), gap, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, items: torch.Tensor) -> None:
        self.step += 1
        uniq = torch.unique(items)
        seen_before = self.last_step[uniq] > 0
        delta = self.step - self.last_step[uniq]
        new_gap = (1 - self.alpha) * self.gap[uniq] + self.alpha * delta
        self.gap[uniq] = torch.where(seen_before, new_gap, self.gap[uniq])
        self.last_step[uniq] = self.step

    def probability(self, items: torch.Tensor) -> torch.Tensor:
        """Per-batch probability that an item is sampled, clipped to (0, 1]."""
        return (1.0 / self.gap[items].clamp(min=1.0)).to(torch.float32)


def in_batch_softmax_loss(
    *,
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    neg_emb: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax over the batch's positives (plus optional random negatives).

    logits[i, j] = <u_i, v_j> / T - log q_j

    The logQ term removes the bias toward popular items that in-batch sampling
    introduces: a popular item appears as a negative more often, so without the
    correction it is pushed down more than it should be. A column j != i whose
    item equals row i's positive is masked: it is the same item, not a negative.

    Shapes: user_emb (B, d), item_emb (B, d), item_ids (B,), log_q (B,),
    neg_emb (N, d), neg_ids (N,), neg_log_q (N,). Returns the mean loss; with `weight`
    (B,), the weighted mean (a weak label counts less than a strong one, feedback.tiers).
    """
    logits = user_emb @ item_emb.T / temperature - log_q.unsqueeze(0)  # (B, B)
    same = item_ids.unsqueeze(1) == item_ids.unsqueeze(0)
    eye = torch.eye(len(item_ids), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    if neg_emb is not None:
        neg = user_emb @ neg_emb.T / temperature - neg_log_q.unsqueeze(0)  # (B, N)
        neg = neg.masked_fill(item_ids.unsqueeze(1) == neg_ids.unsqueeze(0), float("-inf"))
        logits = torch.cat([logits, neg], dim=1)
    return _cross_entropy(logits, torch.arange(len(item_ids), device=logits.device), weight)


def _cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy; with `weight` (B,), the weighted mean."""
    if weight is None:
        return F.cross_entropy(logits, target)
    per_row = F.cross_entropy(logits, target, reduction="none")
    return (per_row * weight).sum() / weight.sum().clamp(min=1e-12)


def full_softmax_loss(
    *,
    user_emb: torch.Tensor,
    all_item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    weight: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each positive against every item in the catalogue.

    logits[i, j] = <u_i, v_j> / T over all N items. Nothing is sampled, so there is no
    sampling bias to correct: the softmax is the model of p(item | user) itself, and it keeps
    the items' popularity in the scores (which logQ correction removes on purpose). It costs
    a (B, N) matrix per batch, so it suits catalogues of up to tens of thousands of items.

    With `log_prior` (N,), logits[i, j] = <u_i, v_j> / T + log_prior[j] (logit adjustment,
    Menon et al. 2021): with log_prior = log p(item) the offset explains the popularity the
    data shows, so the scores, used without it, learn what is left.

    Shapes: user_emb (B, d), all_item_emb (N, d), item_ids (B,). With `weight` (B,), the
    weighted mean.
    """
    logits = user_emb @ all_item_emb.T / temperature  # (B, N)
    if log_prior is not None:
        logits = logits + log_prior.unsqueeze(0)
    return _cross_entropy(logits, item_ids, weight)


def skip_unlikelihood_loss(
    *,
    user_emb: torch.Tensor,
    all_item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log(1 - p(item | user)) for items the user was shown and did not pick (unlikelihood,
    Welleck et al. 2020), under the same full softmax `full_softmax_loss` trains.

    A positive says what to rank up; a skip says what to stop showing. Pushing a skipped
    item's probability towards 0 is bounded (unlike maximising -log p), so a skip lowers the
    item for that user without driving it to minus infinity, and an item skipped by some
    users and chosen by others settles where both are heard.

    Shapes: user_emb (B, d) the users at impression time, all_item_emb (N, d), item_ids (B,)
    the skipped items. Returns the mean over the B skips.
    """
    logits = user_emb @ all_item_emb.T / temperature  # (B, N)
    if log_prior is not None:
        logits = logits + log_prior.unsqueeze(0)
    total = torch.logsumexp(logits, dim=1)
    others = torch.logsumexp(logits.scatter(1, item_ids.unsqueeze(1), float("-inf")), dim=1)
    return (total - others).mean()  # log(all) - log(all but the skip) = -log(1 - p)
