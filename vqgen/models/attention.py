"""Strictly causal multi-head self-attention for the PixelCNN priors (after PixelSNAIL / VQ-VAE-2).

Position ``p`` (raster order) attends only to positions ``< p``. Instead of passing a mask tensor we
shift keys and values one step to the right, prepending a learned start key/value, and run
``scaled_dot_product_attention(..., is_causal=True)``: query ``p`` then sees the start slot and the
keys of positions ``0 .. p-1``. With no explicit mask the flash / memory-efficient kernels can run.

Keys and values are computed from the block input *and* the embedding of the code at each position,
so the attention gives every position direct access to all earlier codes (including its left
neighbour), which is what makes strict causality necessary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from vqgen.kernels import Backend
from vqgen.kernels.causal_attention import (
    attend_to_cache,
    new_kv_cache,
    reset_kv_cache,
    strictly_causal_attention,
)


@dataclass(eq=False)
class AttentionCache:
    """A :class:`CausalAttentionBlock`'s state for sampling ``L`` positions one at a time, in place.

    ``keys``/``values`` are in the shifted layout of
    :func:`~vqgen.kernels.causal_attention.strictly_causal_attention` (slot 0 = learned start, slot
    ``q+1`` = position ``q``); ``step`` reads them with one query through a fixed-shape visibility mask.
    """

    keys: torch.Tensor  # [B, heads, L+1, d]
    values: torch.Tensor  # [B, heads, L+1, d]
    normed: torch.Tensor  # [B, C]: normalised input at the current position, until commit writes its key/value
    slots: torch.Tensor  # arange(L+1): the visible slots of position p are slots <= p


class CausalAttentionBlock(nn.Module):
    """Pre-norm residual block of strictly causal multi-head self-attention over a code map.

    ``forward(h, x)`` with ``h`` the horizontal-stack features and ``x`` the input code embeddings,
    both ``[B, C, H, W]``; returns updated features ``[B, C, H, W]``. A learned factorised 2-D
    positional embedding (row + column) is added to the block input.
    """

    def __init__(self, *, channels: int, num_heads: int, shape: tuple[int, ...], dropout: float,
                 backend: Backend = "auto"):
        super().__init__()
        height, width = shape
        self.num_heads = num_heads
        self.backend = backend  # "torch": the explicit-mask reference; otherwise the fused SDPA path
        head_dim = channels // num_heads
        self.row_embed = nn.Parameter(torch.randn(height, channels) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(width, channels) * 0.02)
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, channels)
        # Keys/values read the normalised block input and the code embedding at that position.
        self.key_value = nn.Linear(2 * channels, 2 * channels)
        self.start = nn.Parameter(torch.randn(2, num_heads, head_dim) * 0.02)
        self.proj = nn.Linear(channels, channels)
        self.dropout = nn.Dropout(dropout)

    def position_embedding(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` embeddings of the positions ``(rows[n], cols[n])`` (int64 tensors)."""
        return self.row_embed.index_select(0, rows) + self.col_embed.index_select(0, cols)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b l (n d) -> b n l d", n=self.num_heads)

    def keys_values(self, normed: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``normed, x: [B, L, C]`` → keys and values ``[B, heads, L, d]``."""
        k, v = self.key_value(torch.cat([normed, x], dim=-1)).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def finish(self, a: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual update: ``a [B, L, C] + proj(attended [B, heads, L, d])``."""
        merged = rearrange(attended, "b n l d -> b l (n d)")
        return a + self.dropout(self.proj(merged))

    def new_cache(self, batch_size: int, length: int) -> AttentionCache:
        """Empty cache for sampling ``length`` positions of ``batch_size`` maps."""
        keys, values = new_kv_cache(self.start[0], self.start[1], batch_size, length + 1)
        normed = keys.new_zeros(batch_size, self.norm.normalized_shape[0])
        return AttentionCache(keys, values, normed, torch.arange(length + 1, device=keys.device))

    def reset_cache(self, cache: AttentionCache) -> None:
        reset_kv_cache(cache.keys, cache.values, self.start[0], self.start[1])
        cache.normed.zero_()

    def step(
        self, cache: AttentionCache, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` at ``position`` (int64 ``[1]``; ``row``, ``col`` its indices): ``h [B, C]`` → ``[B, C]``."""
        a = h + self.position_embedding(row, col)
        normed = self.norm(a)
        cache.normed.copy_(normed)  # this position's key/value are written by commit()
        q = self.split_heads(self.query(normed)[:, None])  # [B, heads, 1, d]
        attended = attend_to_cache(q, cache.keys, cache.values, cache.slots <= position)
        return self.finish(a[:, None], attended)[:, 0]

    def commit(self, cache: AttentionCache, x: torch.Tensor, position: torch.Tensor) -> None:
        """Store the key/value of ``position`` (after :meth:`step` there), ``x [B, C]`` its code embedding."""
        k, v = self.keys_values(cache.normed[:, None], x[:, None])  # [B, heads, 1, d]
        cache.keys.index_copy_(2, position + 1, k)
        cache.values.index_copy_(2, position + 1, v)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        height, width = h.shape[-2:]
        positions = rearrange(self.row_embed[:, None] + self.col_embed[None], "h w c -> (h w) c")
        a = rearrange(h, "b c h w -> b (h w) c") + positions  # [B, L, C]
        normed = self.norm(a)
        q = self.split_heads(self.query(normed))
        k, v = self.keys_values(normed, rearrange(x, "b c h w -> b (h w) c"))
        attended = strictly_causal_attention(q, k, v, self.start[0], self.start[1], self.backend)
        out = self.finish(a, attended)
        return rearrange(out, "b (h w) c -> b c h w", h=height, w=width)
