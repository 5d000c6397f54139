"""The sequential history encoder: causal self-attention over the last H items (SASRec-style).

The history arrives newest first (`models.features.last_n_history`): position 0 is the most
recent item and padding (0) fills the tail. So a position's "past" is every position at or
after it, the newest item's output (position 0) has seen the whole history, and the learned
position embedding counts steps back from now, which means the same thing for a user with 3
items as for one with 300.

Written with plain MatMul / Softmax / Where rather than `nn.MultiheadAttention` or
`scaled_dot_product_attention`: those take fused paths in eval mode that the ONNX exporters
handle unevenly, and a boolean mask that blocks every key of a row (a cold user's empty
history) makes them return NaN. Here blocked scores get a large finite negative instead, so an
all-padding row softmaxes to a finite average, and the encoder zeroes it anyway.

Serving reads only the newest position, so `forward` runs the last block for that one query;
`encode` runs every position (tests check the two agree).

Time gaps (optional): each position also gets an embedding of how long after the user's
previous item it came, in log2 minutes (`gap_buckets`). The gaps are between the user's own
items, never against "now": the training log's clock and the serving clock need not agree
(a replayed or simulated log), but the spacing of a user's items means the same on both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Time-gap buckets: 0 = unknown (padding, or the oldest item in the window, whose
# predecessor is not in it); 1 + floor(log2(1 + gap in minutes)), capped: the last bucket
# holds gaps of about 23 days and more.
GAP_BUCKETS = 17


def gap_buckets(history_ts: torch.Tensor) -> torch.Tensor:
    """(B, H) unix seconds, newest first, 0 = padding -> (B, H) bucket of the time between
    each item and the user's previous one (position i + 1)."""
    newer, older = history_ts[:, :-1], history_ts[:, 1:]
    known = (newer > 0) & (older > 0)
    minutes = (newer - older).clamp(min=0).to(torch.float32) / 60.0
    bucket = torch.floor(torch.log(1.0 + minutes) / math.log(2.0)).to(torch.long) + 1
    bucket = torch.where(known, bucket.clamp(max=GAP_BUCKETS - 1), torch.zeros_like(bucket))
    return torch.cat([bucket, torch.zeros_like(bucket[:, :1])], dim=1)


# Added to blocked attention scores: far below any real score, but finite so a row with every
# key blocked stays finite (all -inf would softmax to NaN).
_BLOCKED = -1e9


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor):
        # x (B, Q, D) queries, context (B, H, D) keys and values, allowed (B, 1, Q, H) bool:
        # query i may read key j -> (B, Q, D)
        b, nq, d = x.shape
        dh = d // self.heads
        q = self.q(x).reshape(b, nq, self.heads, dh).transpose(1, 2)  # (B, heads, Q, dh)
        k, v = self.kv(context).reshape(b, -1, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)  # (B, heads, Q, H)
        scores = scores.masked_fill(~allowed, _BLOCKED)
        att = self.drop(torch.softmax(scores, dim=-1))
        return self.out((att @ v).transpose(1, 2).reshape(b, nq, d))


class _Block(nn.Module):
    """Pre-norm Transformer block; pre-norm trains without a warm-up at this depth."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        # ReLU rather than GELU: opset 18 has no Gelu, and SASRec's feed-forward is ReLU too.
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, Q, D) reads `context` (B, H, D; default x itself) where `allowed`."""
        h = self.norm1(x)
        x = x + self.attn(h, h if context is None else self.norm1(context), allowed)
        return x + self.ff(self.norm2(x))


class SequenceEncoder(nn.Module):
    """(B, H, D) embedded history + (B, H) bool validity -> (B, D): the newest valid
    position's output after `layers` causal self-attention blocks; zeros for an empty history."""

    def __init__(
        self,
        dim: int,
        history_len: int,
        layers: int,
        heads: int,
        dropout: float,
        time_gaps: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SequenceEncoder: dim={dim} is not divisible by heads={heads}")
        self.pos_emb = nn.Embedding(history_len, dim)  # index = steps back from the newest
        # None without time gaps: such runs keep their state_dict keys and their graph.
        self.gap_emb = nn.Embedding(GAP_BUCKETS, dim) if time_gaps else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def _inputs(self, emb: torch.Tensor, gaps: torch.Tensor | None) -> torch.Tensor:
        """The items' embeddings plus their time-gap embeddings, when this encoder has them."""
        if self.gap_emb is None:
            return emb
        if gaps is None:
            raise ValueError("SequenceEncoder: this encoder reads time gaps; pass gap buckets")
        return emb + self.gap_emb(gaps)

    def _run(self, emb: torch.Tensor, valid: torch.Tensor, n_blocks: int):
        """(x after the first `n_blocks` blocks, padding rows zero; keep (B, H, 1))."""
        h = emb.shape[1]
        pos = torch.arange(h, device=emb.device)
        # Newest first: position i's past is positions j >= i. Padding keys are never read.
        causal = pos[None, :] >= pos[:, None]  # (H, H) [i, j]
        allowed = causal[None, None] & valid[:, None, None, :]  # (B, 1, H, H)
        keep = valid.unsqueeze(-1).to(emb.dtype)  # (B, H, 1)
        x = self.drop(emb + self.pos_emb(pos)[None]) * keep
        for block in self.blocks[:n_blocks]:
            # Padding rows are never read (the key mask) and zeroed anyway, so they stay small
            # and finite whatever the block computes for them.
            x = block(x, allowed) * keep
        return x, keep

    def encode(
        self, emb: torch.Tensor, valid: torch.Tensor, gaps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, H, D) the output at every position; padding positions are zero."""
        x, keep = self._run(self._inputs(emb, gaps), valid, len(self.blocks))
        return self.norm(x) * keep

    def forward(
        self, emb: torch.Tensor, valid: torch.Tensor, gaps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`gaps` (B, H): `gap_buckets` of the history's timestamps, for a time-gap encoder."""
        # The newest valid position: position 0 for every history the feature code builds
        # (padding trails), but a hand-made request with a leading 0 still gets its newest item.
        keep = valid.to(emb.dtype)
        newest = keep * (keep.cumsum(dim=1) == 1).to(emb.dtype)  # (B, H) one-hot or all zero
        x, _ = self._run(self._inputs(emb, gaps), valid, len(self.blocks) - 1)
        # Only the newest position's output is used, so the last block runs its query alone
        # (SASRec's inference shortcut): about half the work of two blocks at H = 50. Its
        # past is every valid position, since none is newer.
        query = (x * newest.unsqueeze(-1)).sum(dim=1, keepdim=True)  # (B, 1, D)
        y = self.blocks[-1](query, valid[:, None, None, :], context=x)[:, 0]  # (B, D)
        return self.norm(y) * newest.sum(dim=1, keepdim=True)  # zeros for an empty history
