"""The two towers. Each maps features to an L2-normalised embedding of size `out_dim`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.features import FeatureSpec, input_names
from models.prior import PopularityPrior
from models.sequence import SequenceEncoder, gap_buckets


@dataclass(frozen=True)
class TowerConfig:
    id_dim: int = 48  # id embeddings carry most of the signal on warm users and items
    cat_dim: int = 8  # a handful of categories per attribute: small tables are enough
    hidden_dim: int = 128  # one hidden layer: enough to mix ids, categories and history
    out_dim: int = 64  # d=64: the dimension loadtest/RESULTS.md measures the retrieval ceiling at
    # Dropout in both MLPs: user ids learnt from a few dozen interactions each overfit within
    # a few epochs (docs/results.md, "Model quality": chosen on validation).
    dropout: float = 0.2
    # How the user tower reads the last H items: "mean" = masked mean of their embeddings
    # (order-blind); "sequence" = causal self-attention with position embeddings
    # (`models.sequence`), for worlds where what comes next depends on what came last.
    user_encoder: Literal["mean", "sequence"] = "mean"
    seq_layers: int = 2  # "sequence" only: Transformer blocks
    seq_heads: int = 2  # "sequence" only: attention heads; must divide id_dim
    # "sequence" only: add an embedding of the time between consecutive history items
    # (`models.sequence.gap_buckets`). The graph then takes a fourth input, `history_ts`.
    time_gaps: bool = False

    def __post_init__(self) -> None:
        if self.user_encoder not in ("mean", "sequence"):
            raise ValueError(f"TowerConfig.user_encoder={self.user_encoder!r}: mean | sequence")
        if self.time_gaps and self.user_encoder != "sequence":
            raise ValueError(
                "TowerConfig.time_gaps=True: expected user_encoder='sequence' (the mean "
                f"encoder is order-blind and has no positions to give gaps to), got "
                f"{self.user_encoder!r}"
            )
        if self.user_encoder == "sequence" and (
            self.seq_layers < 1 or self.seq_heads < 1 or self.id_dim % self.seq_heads
        ):
            raise ValueError(
                f"TowerConfig: seq_layers={self.seq_layers} and seq_heads={self.seq_heads} must "
                f"be >= 1 and seq_heads must divide id_dim={self.id_dim}"
            )


def _mlp(in_dim: int, cfg: TowerConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, cfg.hidden_dim),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden_dim, cfg.out_dim),
    )


class UserTower(nn.Module):
    """user id (with hashed rows for unknown users) + categorical features + history, read
    as a masked mean or by the sequence encoder (`TowerConfig.user_encoder`)."""

    def __init__(self, spec: FeatureSpec, cfg: TowerConfig):
        super().__init__()
        self.user_emb = nn.Embedding(spec.user_rows, cfg.id_dim)
        self.cat_embs = nn.ModuleList(
            nn.Embedding(c, cfg.cat_dim) for c in spec.user_cat_cardinalities
        )
        # Row 0 is padding so that the masked mean ignores empty history slots.
        self.history_emb = nn.Embedding(spec.n_items + 1, cfg.id_dim, padding_idx=0)
        self.sequence = None  # "mean": no module, so mean runs keep their state_dict keys
        if cfg.user_encoder == "sequence":
            self.sequence = SequenceEncoder(
                cfg.id_dim,
                spec.history_len,
                cfg.seq_layers,
                cfg.seq_heads,
                cfg.dropout,
                time_gaps=cfg.time_gaps,
            )
        self.time_gaps = cfg.time_gaps
        # The graph inputs this tower reads, in forward's order (what export names them).
        self.input_names = input_names(cfg.time_gaps)
        in_dim = cfg.id_dim * 2 + cfg.cat_dim * len(spec.user_cat_cardinalities)
        self.mlp = _mlp(in_dim, cfg)

    def forward(
        self,
        user_index: torch.Tensor,
        user_cats: torch.Tensor,
        history: torch.Tensor,
        history_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # user_index (B, 1), user_cats (B, C), history (B, H), history_ts (B, H) -> (B, d)
        uid = self.user_emb(user_index[:, 0])  # (B, id_dim)
        cats = [emb(user_cats[:, i]) for i, emb in enumerate(self.cat_embs)]  # C x (B, cat_dim)
        if self.sequence is not None:
            gaps = None
            if self.time_gaps:
                if history_ts is None:
                    raise ValueError("UserTower: time_gaps=True needs history_ts (B, H)")
                gaps = gap_buckets(history_ts)
            hist = self.sequence(self.history_emb(history), history > 0, gaps)  # (B, id_dim)
        else:
            mask = (history > 0).unsqueeze(-1).to(uid.dtype)  # (B, H, 1)
            hist_sum = (self.history_emb(history) * mask).sum(dim=1)  # (B, id_dim)
            hist = hist_sum / mask.sum(dim=1).clamp(min=1.0)
        x = torch.cat([uid, hist, *cats], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """item id + genre + provider."""

    def __init__(self, spec: FeatureSpec, cfg: TowerConfig):
        super().__init__()
        self.item_emb = nn.Embedding(spec.n_items, cfg.id_dim)
        self.cat_embs = nn.ModuleList(
            nn.Embedding(c, cfg.cat_dim) for c in spec.item_cat_cardinalities
        )
        self.mlp = _mlp(cfg.id_dim + cfg.cat_dim * len(spec.item_cat_cardinalities), cfg)

    def forward(self, item_index: torch.Tensor, item_cats: torch.Tensor) -> torch.Tensor:
        # item_index (N,), item_cats (N, C) -> (N, d)
        cats = [emb(item_cats[:, i]) for i, emb in enumerate(self.cat_embs)]
        x = torch.cat([self.item_emb(item_index), *cats], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(nn.Module):
    """The embeddings: a user tower and an item tower that share nothing but the output space.

    Item categorical features live in a buffer so that `item_embeddings()` can
    compute the whole catalogue without the caller passing features around.

    Ranking-time popularity prior (`models.prior`): `prior` says how to compute it
    (beta, window; None = off) and `item_bias` (n_items,) holds it as of the newest data the
    run saw, which is what the exported graph adds to the scores. Training never uses either:
    they are set after training, with beta chosen on validation. Evaluation recomputes the
    bias from each evaluation's own history, so offline numbers never see the future.
    """

    def __init__(self, spec: FeatureSpec, cfg: TowerConfig, item_cats: torch.Tensor):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.user_tower = UserTower(spec, cfg)
        self.item_tower = ItemTower(spec, cfg)
        self.register_buffer("item_cats", item_cats.to(torch.long))  # (n_items, C)
        self.register_buffer("item_bias", torch.zeros(spec.n_items))  # (n_items,) 0 = no prior
        self.prior: PopularityPrior | None = None

    def set_prior(self, prior: PopularityPrior | None, bias: torch.Tensor | None = None) -> None:
        """Turn the prior on (with `bias`, (n_items,)) or off (None: zeros)."""
        self.prior = prior if prior is not None and prior.beta > 0 else None
        with torch.no_grad():
            if self.prior is None or bias is None:
                self.item_bias.zero_()
            else:
                self.item_bias.copy_(torch.as_tensor(bias, dtype=self.item_bias.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs and checkpoints written before the prior existed have no item_bias: no prior.
        state_dict.setdefault(prefix + "item_bias", torch.zeros_like(self.item_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def user_embed(
        self,
        user_index: torch.Tensor,
        user_cats: torch.Tensor,
        history: torch.Tensor,
        history_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.user_tower(user_index, user_cats, history, history_ts)

    def item_embed(self, item_index: torch.Tensor) -> torch.Tensor:
        return self.item_tower(item_index, self.item_cats[item_index])

    @torch.no_grad()
    def item_embeddings(self, chunk: int = 65536) -> torch.Tensor:
        """(n_items, d) for the whole catalogue, in eval mode, chunked to bound memory."""
        was_training = self.training
        self.eval()
        idx = torch.arange(self.spec.n_items)
        out = torch.cat([self.item_embed(idx[i : i + chunk]) for i in range(0, len(idx), chunk)])
        self.train(was_training)
        return out
