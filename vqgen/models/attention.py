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

import torch
from einops import rearrange
from torch import nn

from vqgen.kernels.causal_attention import strictly_causal_attention


class CausalAttentionBlock(nn.Module):
    """Pre-norm residual block of strictly causal multi-head self-attention over a code map.

    ``forward(h, x)`` with ``h`` the horizontal-stack features and ``x`` the input code embeddings,
    both ``[B, C, H, W]``; returns updated features ``[B, C, H, W]``. A learned factorised 2-D
    positional embedding (row + column) is added to the block input.
    """

    def __init__(self, *, channels: int, num_heads: int, shape: tuple[int, ...], dropout: float):
        super().__init__()
        height, width = shape
        self.num_heads = num_heads
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

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        height, width = h.shape[-2:]
        positions = rearrange(self.row_embed[:, None] + self.col_embed[None], "h w c -> (h w) c")
        a = rearrange(h, "b c h w -> b (h w) c") + positions  # [B, L, C]
        normed = self.norm(a)
        q = self.split_heads(self.query(normed))
        k, v = self.keys_values(normed, rearrange(x, "b c h w -> b (h w) c"))
        attended = strictly_causal_attention(q, k, v, self.start[0], self.start[1])
        out = self.finish(a, attended)
        return rearrange(out, "b (h w) c -> b c h w", h=height, w=width)
