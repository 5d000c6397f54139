"""Inference wrapper: user tower -> scores against the frozen catalogue -> top-K.

This is exactly the graph that export writes to ONNX and Triton serves, so
that offline evaluation and serving rank with the same code.
"""

from __future__ import annotations

import torch
from torch import nn

from models.towers import TwoTower, UserTower


class TwoTowerRetrieval(nn.Module):
    def __init__(
        self,
        user_tower: UserTower,
        item_embeddings: torch.Tensor,
        raw_item_ids: torch.Tensor,
        k: int,
    ):
        super().__init__()
        if not 0 < k <= len(raw_item_ids):
            raise ValueError(f"k={k}: expected 0 < k <= n_items={len(raw_item_ids)}")
        self.user_tower = user_tower
        self.k = k
        # Buffers become ONNX initializers: the catalogue travels inside model.onnx.
        self.register_buffer("item_embeddings", item_embeddings.detach().clone())  # (N, d)
        self.register_buffer("raw_item_ids", raw_item_ids.to(torch.long).clone())  # (N,)

    @classmethod
    def from_two_tower(
        cls, model: TwoTower, raw_item_ids: torch.Tensor, k: int
    ) -> TwoTowerRetrieval:
        model = model.eval()
        return cls(model.user_tower, model.item_embeddings(), raw_item_ids, k).eval()

    def forward(
        self, user_index: torch.Tensor, user_cats: torch.Tensor, history: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.user_tower(user_index, user_cats, history)  # (B, d)
        scores = u @ self.item_embeddings.T  # (B, N)
        top_scores, top_idx = torch.topk(scores, self.k, dim=1)  # (B, K) each
        return self.raw_item_ids[top_idx], top_scores
