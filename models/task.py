"""The training task: towers + frequency estimator + loss, as one module DDP can wrap."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.loss import full_softmax_loss, in_batch_softmax_loss, skip_unlikelihood_loss
from models.towers import TwoTower


def user_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """The user tower's arguments from a training batch (training.data.TrainingExamples)."""
    return batch["user_index"], batch["user_cats"], batch["history"], batch.get("history_ts")


class StabilityTerm(nn.Module):
    """Distillation against production's top K: keeps a retrain's scores near the model it
    would replace, where that model is confident.

    A retrain that starts from production still drifts: every epoch on new data moves users
    and items, and users see their lists reshuffle for no reason they can tell (the canary's
    churn guardrail rejects candidates for exactly this). For each user in the batch the
    frozen production model (the teacher) picks its top `k` items over the whole catalogue;
    the term is the KL divergence from the teacher's softmax over those k scores to the
    candidate's softmax over the same items, times `weight`. Only the order and spread of
    production's best items are held; everything below its top k is free to change.
    """

    def __init__(self, teacher: TwoTower, *, weight: float, k: int, temperature: float):
        super().__init__()
        if not weight > 0 or k < 2:
            raise ValueError(f"stability weight={weight}, k={k}: expected weight > 0, k >= 2")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)
        self.k = min(int(k), teacher.spec.n_items)
        with torch.no_grad():
            self.register_buffer("teacher_items", teacher.item_embeddings())  # (N, d)

    def train(self, mode: bool = True) -> StabilityTerm:
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, whatever the task's mode
        return self

    def forward(
        self, student: TwoTower, batch: dict[str, torch.Tensor], student_user: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            tu = self.teacher.user_embed(*user_inputs(batch))
            top, idx = (tu @ self.teacher_items.T).topk(self.k, dim=1)  # (B, k)
        b, k = idx.shape
        items = student.item_embed(idx.reshape(-1)).view(b, k, -1)  # (B, k, d)
        scores = (student_user.unsqueeze(1) * items).sum(-1)  # (B, k)
        log_p = F.log_softmax(scores / self.temperature, dim=1)
        q = F.softmax(top / self.temperature, dim=1)
        return self.weight * F.kl_div(log_p, q, reduction="batchmean")


class TwoTowerTrainTask(nn.Module):
    """`full=True`: softmax over the whole catalogue (`log_q` and negatives are unused);
    otherwise in-batch sampled softmax with logQ correction."""

    def __init__(
        self,
        model: TwoTower,
        temperature: float,
        n_random_negatives: int = 0,
        stability: StabilityTerm | None = None,
        full: bool = False,
        skip_weight: float = 0.0,
    ):
        super().__init__()
        if skip_weight and not full:
            raise ValueError(
                f"skip_weight={skip_weight}: the skip term needs the full softmax (a catalogue "
                "of at most full_softmax_max_items, or softmax='full')"
            )
        self.full = full
        self.skip_weight = float(skip_weight)
        # Full softmax: per-item offset added to the training logits; None = no adjustment.
        self.register_buffer("item_log_prior", None)
        self.model = model
        self.temperature = temperature
        self.n_random_negatives = n_random_negatives
        self.stability = stability

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        log_q: torch.Tensor,
        neg_items: torch.Tensor | None = None,
        skips: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`skips`: a batch of impressions nobody picked (training.data.SkipExamples), each
        with its user's features at impression time; needs `skip_weight` > 0."""
        user = self.model.user_embed(*user_inputs(batch))
        if self.full:
            # The whole catalogue once a step, for the positives and the skips alike.
            every = torch.arange(self.model.spec.n_items, device=user.device)
            all_items = self.model.item_embed(every)
            loss = full_softmax_loss(
                user_emb=user,
                all_item_emb=all_items,
                item_ids=batch["item_index"],
                temperature=self.temperature,
                weight=batch.get("weight"),
                log_prior=self.item_log_prior,
            )
            if skips is not None and self.skip_weight:
                loss = loss + self.skip_weight * skip_unlikelihood_loss(
                    user_emb=self.model.user_embed(*user_inputs(skips)),
                    all_item_emb=all_items,
                    item_ids=skips["item_index"],
                    temperature=self.temperature,
                    log_prior=self.item_log_prior,
                )
        else:
            loss = self._sampled(batch, user, log_q, neg_items)
        if self.stability is not None:
            loss = loss + self.stability(self.model, batch, user)
        return loss

    def set_item_log_prior(self, log_prior: torch.Tensor) -> None:
        """Logit adjustment for the full softmax: `log_prior` (n_items,) is added to every
        training logit and left out at inference, so the scores leave out what it explains."""
        # On the model's device: the task itself is never moved (train moves the model).
        device = next(self.model.parameters()).device
        self.item_log_prior = log_prior.detach().to(device=device, dtype=torch.float32)

    def _sampled(self, batch, user, log_q, neg_items) -> torch.Tensor:
        item = self.model.item_embed(batch["item_index"])  # (B, d)
        neg_emb = neg_log_q = None
        if neg_items is not None:
            neg_emb = self.model.item_embed(neg_items)  # (N, d)
            # Uniform draws: an item is among the N negatives with probability ~ N / n_items.
            q = len(neg_items) / self.model.spec.n_items
            neg_log_q = torch.full((len(neg_items),), math.log(q), device=neg_emb.device)
        return in_batch_softmax_loss(
            user_emb=user,
            item_emb=item,
            item_ids=batch["item_index"],
            log_q=log_q,
            temperature=self.temperature,
            neg_emb=neg_emb,
            neg_ids=neg_items,
            neg_log_q=neg_log_q,
            weight=batch.get("weight"),
        )
