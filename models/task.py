"""The training task: towers + frequency estimator + loss, as one module DDP can wrap."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.loss import in_batch_softmax_loss
from models.towers import TwoTower


class TwoTowerTrainTask(nn.Module):
    def __init__(self, model: TwoTower, temperature: float, n_random_negatives: int = 0):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.n_random_negatives = n_random_negatives

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        log_q: torch.Tensor,
        neg_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        user = self.model.user_embed(batch["user_index"], batch["user_cats"], batch["history"])
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
