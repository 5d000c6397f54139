"""Inference wrapper: user tower -> scores against the frozen catalogue -> top-K.

This is exactly the graph that export writes to ONNX and Triton serves, so
that offline evaluation and serving rank with the same code.

With a popularity prior (`models.prior`, beta > 0) the item table comes with a per-item
bias, beta * log(1 + recent count), added to the scores before TopK (one Add in the graph).
Without one (beta = 0) there is no bias buffer and the graph is the plain one.
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
        item_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        if not 0 < k <= len(raw_item_ids):
            raise ValueError(f"k={k}: expected 0 < k <= n_items={len(raw_item_ids)}")
        self.user_tower = user_tower
        self.k = k
        # Buffers become ONNX initializers: the catalogue travels inside model.onnx.
        self.register_buffer("item_embeddings", item_embeddings.detach().clone())  # (N, d)
        self.register_buffer("raw_item_ids", raw_item_ids.to(torch.long).clone())  # (N,)
        self.register_buffer("item_bias", None)  # no prior: no buffer, no Add, the plain graph
        if item_bias is not None and bool(torch.any(item_bias != 0)):
            if item_bias.shape != (len(raw_item_ids),):
                raise ValueError(
                    f"item_bias has shape {tuple(item_bias.shape)}; expected ({len(raw_item_ids)},)"
                )
            bias = item_bias.detach().to(item_embeddings.dtype).clone()
            self.register_buffer("item_bias", bias)  # (N,)

    @classmethod
    def from_two_tower(
        cls, model: TwoTower, raw_item_ids: torch.Tensor, k: int
    ) -> TwoTowerRetrieval:
        model = model.eval()
        bias = getattr(model, "item_bias", None) if getattr(model, "prior", None) else None
        return cls(model.user_tower, model.item_embeddings(), raw_item_ids, k, bias).eval()

    @property
    def input_names(self) -> tuple[str, ...]:
        """The graph's inputs, in forward's order (models.features.input_names)."""
        return self.user_tower.input_names

    def scores(
        self,
        user_index: torch.Tensor,
        user_cats: torch.Tensor,
        history: torch.Tensor,
        history_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) what TopK ranks: the dot product, plus the item bias when there is one.
        `history_ts` only for a tower that reads time gaps (`input_names` has four)."""
        u = self.user_tower(user_index, user_cats, history, history_ts)  # (B, d)
        scores = u @ self.item_embeddings.T  # (B, N)
        if self.item_bias is not None:
            scores = scores + self.item_bias
        return scores

    def forward(
        self,
        user_index: torch.Tensor,
        user_cats: torch.Tensor,
        history: torch.Tensor,
        history_ts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(user_index, user_cats, history, history_ts)  # (B, N)
        top_scores, top_idx = torch.topk(scores, self.k, dim=1)  # (B, K) each
        return self.raw_item_ids[top_idx], top_scores
