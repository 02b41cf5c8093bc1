"""Gated PixelCNN prior over a VQ code map (van den Oord et al. 2016; Razavi et al. 2019).

Causality comes from shifted, non-square convolutions rather than masked square kernels, so no tap
is zero and there is no blind spot. With ``k`` the kernel size and ``s = k // 2``:

- vertical stack: a ``(s+1) x k`` convolution over rows ``i-s .. i`` (zero rows padded above).
  Its output at row ``i`` depends on rows ``<= i``; it reaches the horizontal stack only after a
  one-row down-shift, so the horizontal stack at row ``i`` sees strictly the rows above.
- horizontal stack: a ``1 x (s+1)`` convolution over columns ``j-s .. j`` of the current row. In the
  first layer the window is shifted right by one (columns ``j-s-1 .. j-1``) so the current code is
  never seen; later layers may include column ``j`` because their input already excludes it.

Each layer gates ``tanh(a) * sigmoid(b)``; the horizontal stack has a residual connection and a
skip connection to the output head. Optional causal attention blocks (``attention_every``) refine
the horizontal stack. Conditioning (a class label, and for the bottom prior the top code map
through a conditioning stack) enters every gated layer as a bias on the pre-activations.

Cached sampling runs the same layers one position at a time: see :meth:`GatedPixelCNN.new_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqgen.errors import ConfigError, DataError
from vqgen.kernels import Backend, check_backend
from vqgen.kernels.gated import gated_residual
from vqgen.models.attention import AttentionCache, CausalAttentionBlock


Condition = torch.Tensor | Sequence[torch.Tensor]
"""A prior's conditioning: the code map of the level above it, or the maps of every level above it,
top first (in a hierarchy of more than two levels)."""


def condition_maps(condition: Condition) -> tuple[torch.Tensor, ...]:
    return (condition,) if isinstance(condition, torch.Tensor) else tuple(condition)


@dataclass(kw_only=True)
class PriorConfig:
    """Architecture of one gated PixelCNN prior (the top or the bottom level): the user's choices.

    What the prior models (codebook size, map shape, conditioning maps, classes) is not here: the
    code store dictates it, and it reaches the model as a :class:`PriorLayout`.
    """

    channels: int = 128
    """Channels of the vertical and horizontal stacks."""
    num_layers: int = 20
    """Number of gated layers."""
    kernel_size: int = 5
    """Odd kernel size k: vertical windows are (k//2+1) x k, horizontal ones 1 x (k//2+1)."""
    attention_every: int = 0
    """Insert a causal attention block after every N gated layers (0 = no attention)."""
    num_heads: int = 8
    """Attention heads (must divide ``channels``)."""
    dropout: float = 0.1
    """Dropout on the inputs of every gated layer and on the attention output."""
    condition_channels: int = 128
    """Channels of the conditioning stack (ignored without a conditioning map)."""
    condition_res_blocks: int = 0
    """Residual blocks in the conditioning stack (ignored without a conditioning map)."""
    kernel_backend: Backend = "auto"
    """Backend of the fused gated-unit kernel and the attention: auto, triton or torch."""

    # Sizes that were once set here; the code store sets them now.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        name: "is set by the code store now (the extracted codes' metadata): remove it"
        for name in ("num_codes", "shape", "num_classes", "condition_num_codes", "condition_shape")
    }

    def __post_init__(self) -> None:
        for name in ("channels", "num_layers", "num_heads", "condition_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ConfigError("kernel_size", f"must be odd and >= 3, got {self.kernel_size}")
        if self.attention_every < 0:
            raise ConfigError("attention_every", f"must be >= 0, got {self.attention_every}")
        if self.attention_every and self.channels % self.num_heads:
            raise ConfigError(
                "num_heads", f"must divide channels ({self.channels}), got {self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.condition_res_blocks < 0:
            raise ConfigError("condition_res_blocks", f"must be >= 0, got {self.condition_res_blocks}")
        check_backend(self.kernel_backend, "kernel_backend")

    @property
    def attention_after(self) -> tuple[int, ...]:
        """Indices of the gated layers followed by an attention block."""
        n = self.attention_every
        return tuple(l for l in range(self.num_layers) if n and (l + 1) % n == 0)


@dataclass(frozen=True, kw_only=True)
class PriorLayout:
    """What one prior models and is conditioned on, as the code store dictates it."""

    num_codes: int
    """Codebook size K of the level this prior models."""
    shape: tuple[int, ...]
    """Code map (H, W)."""
    num_classes: int = 0
    """Number of class labels to condition on (0 = unconditional)."""
    condition_num_codes: int = 0
    """Codebook size of the level this prior is conditioned on (0 = none: a top prior)."""
    condition_shape: tuple[int, ...] = ()
    """(H, W) of the conditioning code map; ``shape`` must be an integer multiple of it."""
    upper_num_codes: tuple[int, ...] = ()
    """Codebook sizes of the levels above the conditioning one (top first), in a hierarchy of more
    than two levels: a prior is conditioned on every level above it."""
    upper_shapes: tuple[tuple[int, ...], ...] = ()
    """(H, W) of each of those levels' code maps."""

    def __post_init__(self) -> None:
        if self.num_codes < 2:
            raise ConfigError("num_codes", f"must be >= 2, got {self.num_codes}")
        _check_shape("shape", self.shape)
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if self.condition_num_codes < 0:
            raise ConfigError("condition_num_codes", f"must be >= 0, got {self.condition_num_codes}")
        if self.condition_num_codes == 0:
            if self.condition_shape:
                raise ConfigError("condition_shape", "set without condition_num_codes (must be [])")
            if self.upper_num_codes:
                raise ConfigError("upper_num_codes", "set without condition_num_codes (must be [])")
            return
        if self.condition_num_codes < 2:
            raise ConfigError("condition_num_codes", f"must be 0 or >= 2, got {self.condition_num_codes}")
        _check_shape("condition_shape", self.condition_shape)
        if any(s % c for s, c in zip(self.shape, self.condition_shape)):
            raise ConfigError(
                "condition_shape",
                f"shape {list(self.shape)} must be a multiple of {list(self.condition_shape)}",
            )
        if len(self.upper_num_codes) != len(self.upper_shapes):
            raise ConfigError("upper_shapes", f"must give one shape per entry of upper_num_codes "
                                              f"({len(self.upper_num_codes)}), got {len(self.upper_shapes)}")
        for i, (k, shape) in enumerate(zip(self.upper_num_codes, self.upper_shapes)):
            if k < 2:
                raise ConfigError(f"upper_num_codes[{i}]", f"must be >= 2, got {k}")
            _check_shape(f"upper_shapes[{i}]", shape)

    @property
    def conditions(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(codebook size, (H, W))`` of every conditioning map, top first (the nearest level last)."""
        if not self.condition_num_codes:
            return ()
        upper = tuple(zip(self.upper_num_codes, (tuple(s) for s in self.upper_shapes)))
        return (*upper, (self.condition_num_codes, tuple(self.condition_shape)))


def upgrade_export_config(config: dict) -> dict[str, dict]:
    """The constructor arguments of a ``model.json`` written when the layout sat in the config."""
    layout_keys = {f.name for f in fields(PriorLayout)}
    return {
        "config": {k: v for k, v in config.items() if k not in layout_keys},
        "layout": {k: v for k, v in config.items() if k in layout_keys},
    }


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError(name, f"must be two positive sizes [H, W], got {list(shape)}")


def gated_activation(pre: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``tanh(a) * sigmoid(b)`` of the two halves of ``pre`` along ``dim``."""
    a, b = pre.chunk(2, dim=dim)
    return torch.tanh(a) * torch.sigmoid(b)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return rearrange(t, "b c h w -> (b h w) c")


_MATMUL_CONV_MAX_POSITIONS = 16
"""Largest map (positions) on which :func:`padded_conv` takes the matrix-product path."""


def padded_conv(x: torch.Tensor, conv: nn.Conv2d, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """``conv(F.pad(x, padding))`` for ``x [B, C, H, W]`` (``padding``: left, right, top, bottom; negative
    crops); on small maps under CPU autocast, one matrix product over the channels-last windows.

    On a map of at most 16 positions (a 4x4 top prior's), oneDNN's bf16 convolution backward runs far
    below the matrix unit's speed, while the windows, concatenated along channels, make one
    ``[B*H*W, kh*kw*C]`` product that reaches it: a top prior's bf16 training step at 4x4 takes
    0.83x the time (NOTES.md). At 8x8 the two are even (1.02x), at 16x16 the concatenation costs more
    than it saves (1.3x), and in fp32 the convolution is faster at every size; there, and on a GPU,
    the library convolution runs. The
    result is ``[B, C_out, H', W']`` in channels-last memory, which the gated units and ``_rows`` read
    without a copy.
    """
    small = x.shape[-2] * x.shape[-1] <= _MATMUL_CONV_MAX_POSITIONS
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not small:
        return conv(F.pad(x, padding))
    out_channels, in_channels, kh, kw = conv.weight.shape
    left, right, top, bottom = padding
    rows = F.pad(x.permute(0, 2, 3, 1), (0, 0, left, right, top, bottom))  # [B, H+pads, W+pads, C]
    rows = rows.to(torch.get_autocast_dtype("cpu"))  # once, rather than after the kh*kw-fold concatenation
    height, width = rows.shape[1] - kh + 1, rows.shape[2] - kw + 1
    if kh * kw > 1:
        rows = torch.cat([rows[:, i : i + height, j : j + width] for i in range(kh) for j in range(kw)], dim=-1)
    # Weight [O, C, kh, kw] → [O, kh*kw*C], the windows' (row, column, channel) order.
    weight = conv.weight.permute(0, 2, 3, 1).reshape(out_channels, kh * kw * in_channels)
    return F.linear(rows, weight, conv.bias).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    """ELU → 3x3 conv → ELU → 1x1 conv, plus the input (the conditioning stack's unit)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConditionStack(nn.Module):
    """The code maps of the levels above ``[B, Hc, Wc]`` (top first) → features ``[B, C_cond, H, W]``
    at the prior's shape.

    Each map is embedded and upsampled (nearest) to the prior's shape; their sum goes through
    residual blocks. Not causal: the conditioning maps are known before sampling starts. With one
    map (two levels) only ``embed`` exists; the maps further up have ``upper_embeds``.
    """

    def __init__(self, config: PriorConfig, layout: PriorLayout):
        super().__init__()
        self.shape = tuple(layout.shape)
        self.embed = nn.Embedding(layout.condition_num_codes, config.condition_channels)
        self.upper_embeds = nn.ModuleList(nn.Embedding(k, config.condition_channels) for k in layout.upper_num_codes)
        blocks = [ResidualBlock(config.condition_channels) for _ in range(config.condition_res_blocks)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        x = 0
        for embed, codes in zip([*self.upper_embeds, self.embed], maps):
            x = x + F.interpolate(rearrange(embed(codes), "b h w c -> b c h w"), size=self.shape, mode="nearest")
        return self.blocks(x)


def _push_column(window: torch.Tensor, column: torch.Tensor) -> None:
    """Shift ``window [B, C, n]`` one column left and write ``column [B, C]`` last."""
    window[:, :, :-1] = window[:, :, 1:].clone()
    window[:, :, -1] = column


def _push_row(window: torch.Tensor, row: torch.Tensor, pad: int) -> None:
    """Shift ``window [B, C, n, W+2*pad]`` one row up and write ``row [B, C, 1, W]`` last."""
    window[:, :, :-1] = window[:, :, 1:].clone()
    window[:, :, -1:, pad : window.shape[-1] - pad] = row


@dataclass(eq=False)
class LayerCache:
    """One :class:`GatedLayer`'s state for sampling in raster order (``s = k//2``), updated in place."""

    vertical: torch.Tensor  # [B, C, s+1, W+2s]: the last s+1 input rows (zero columns at both sides)
    horizontal: torch.Tensor  # [B, C, s+1]: the last s+1 input columns, zeroed at the start of every row
    link: torch.Tensor  # [B, 2C, 1, W]: link features of the vertical row above the current code row
    bias_v: torch.Tensor | None  # [B, 2C, 1, W]: the current row's vertical bias, used once the row is complete
    bias_h: torch.Tensor | None  # [B, 2C, 1, W]: the current row's horizontal bias
    row_pre: torch.Tensor  # [W, B, 2C]: per column of the current row, link + horizontal bias + conv bias


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack.

    ``forward`` runs the layer on whole maps; :meth:`finish_row` and :meth:`step` run the same
    weights on one row / one position against a :class:`LayerCache` for cached sampling.
    """

    def __init__(self, config: PriorConfig, layout: PriorLayout, *, first: bool):
        super().__init__()
        c, k = config.channels, config.kernel_size
        self.half = k // 2
        self.first = first
        self.backend = config.kernel_backend
        self.vertical = nn.Conv2d(c, 2 * c, (self.half + 1, k))
        self.horizontal = nn.Conv2d(c, 2 * c, (1, self.half + 1))
        # Vertical pre-activation (down-shifted) → horizontal pre-activation.
        self.link = nn.Conv2d(2 * c, 2 * c, 1)
        self.out = nn.Linear(c, c)
        self.skip = nn.Linear(c, c)
        self.dropout = nn.Dropout(config.dropout)
        # Conditioning biases for both stacks at once: 4C = (vertical 2C, horizontal 2C).
        self.class_bias = nn.Embedding(layout.num_classes, 4 * c) if layout.num_classes else None
        self.condition_bias = (
            nn.Conv2d(config.condition_channels, 4 * c, 1) if layout.condition_num_codes else None
        )

    def biases(
        self, labels: torch.Tensor | None, features: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Conditioning biases ``(vertical, horizontal)``, each ``[B, 2C, h|1, w|1]`` or None.

        ``features`` is the conditioning stack output over any number of rows (all of them for the
        full pass, one row when sampling).
        """
        total = None
        if self.class_bias is not None:
            total = self.class_bias(labels)[:, :, None, None]
        if self.condition_bias is not None:
            projected = self.condition_bias(features)
            total = projected if total is None else total + projected
        if total is None:
            return None, None
        bias_v, bias_h = total.chunk(2, dim=1)
        return bias_v, bias_h

    def vertical_output(
        self, v_pre: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """Gate the vertical pre-activation ``[B, 2C, h, W]`` → ``[B, C, h, W]``."""
        out = gated_activation(v_pre if bias is None else v_pre + bias)
        return out if residual is None else out + residual

    def horizontal_output(
        self, pre: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``pre [M, 2C]`` → (new horizontal features ``[M, C]``, skip contribution ``[M, C]``)."""
        out, gated = gated_residual(pre, bias, self.out.weight, self.out.bias, residual, backend=self.backend)
        return out, self.skip(gated)

    def forward(
        self,
        v: torch.Tensor,
        h: torch.Tensor,
        bias_v: torch.Tensor | None,
        bias_h: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``v, h: [B, C, H, W]`` → ``(v, h [B, C, H, W], skip rows [B*H*W, C])``."""
        s = self.half
        batch, _, height, width = h.shape
        # Pad s rows above and s columns each side: output row i reads input rows i-s .. i.
        v_pre = padded_conv(self.dropout(v), self.vertical, (s, s, s, 0))  # [B, 2C, H, W]
        # Down-shift one row (pad above, crop below): the horizontal stack at row i reads row i-1.
        link = padded_conv(v_pre, self.link, (0, 0, 1, -1))
        # First layer: columns j-s-1 .. j-1 (pad s+1 left, crop 1 right); later: columns j-s .. j.
        h_pad = (s + 1, -1) if self.first else (s, 0)
        h_pre = padded_conv(self.dropout(h), self.horizontal, (*h_pad, 0, 0)) + link  # [B, 2C, H, W]

        v_out = self.vertical_output(v_pre, bias_v, None if self.first else v)
        bias_rows = None if bias_h is None else _rows(bias_h.expand_as(h_pre))
        h_rows, skip = self.horizontal_output(_rows(h_pre), bias_rows, None if self.first else _rows(h))
        h_out = rearrange(h_rows, "(b h w) c -> b c h w", b=batch, h=height, w=width)
        return v_out, h_out, skip

    def new_cache(self, batch_size: int, width: int, labels: torch.Tensor | None,
                  features: torch.Tensor | None) -> LayerCache:
        """Empty cache for ``batch_size`` maps of ``width`` columns; ``labels`` and a row of ``features``
        (as for :meth:`biases`) give the bias buffers their shapes."""
        c, s, new = self.horizontal.in_channels, self.half, self.link.weight.new_zeros
        biases = self.biases(labels, features)
        bias_v, bias_h = (None if b is None else b.expand(-1, -1, 1, width).clone() for b in biases)
        cache = LayerCache(new(batch_size, c, s + 1, width + 2 * s), new(batch_size, c, s + 1),
                           new(batch_size, 2 * c, 1, width), bias_v, bias_h, new(width, batch_size, 2 * c))
        self.reset_cache(cache)
        return cache

    def reset_cache(self, cache: LayerCache) -> None:
        cache.vertical.zero_()
        cache.horizontal.zero_()
        # Code row 0 sees only the zero padding above: the link of an all-zero vertical row.
        cache.link.copy_(self.link(torch.zeros_like(cache.link)))

    def begin_row(self, cache: LayerCache, labels: torch.Tensor | None, features: torch.Tensor | None) -> None:
        """Start a code row: its biases (``features [B, Cc, 1, W]``: its conditioning row) and an
        empty horizontal window."""
        for buffer, bias in zip((cache.bias_v, cache.bias_h), self.biases(labels, features)):
            if buffer is not None:
                buffer.copy_(bias)
        cache.horizontal.zero_()
        # Everything the row's steps add to the window's product, summed once per row rather than
        # once per position; column-major so that a step reads one contiguous [B, 2C] slice.
        added = cache.link if cache.bias_h is None else cache.link + cache.bias_h
        cache.row_pre.copy_(rearrange(added, "b c 1 w -> w b c") + self.horizontal.bias)

    def finish_row(self, cache: LayerCache, row: torch.Tensor) -> torch.Tensor:
        """Push the completed input row ``[B, C, 1, W]`` into the vertical window and compute the next
        vertical row from it (``s+1`` rows → one row): returns that row ``[B, C, 1, W]`` (the next
        layer's input row) and stores its link features, which the horizontal stack reads along the
        next code row."""
        _push_row(cache.vertical, row, self.half)
        v_pre = self.vertical(cache.vertical)
        cache.link.copy_(self.link(v_pre))
        return self.vertical_output(v_pre, cache.bias_v, None if self.first else row)

    def step(self, cache: LayerCache, h: torch.Tensor | None, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The horizontal stack at column ``col`` (int64 ``[1]``): ``h [B, C]`` is the layer's input
        there, None for the first layer (its window holds the codes to the left, see :meth:`push_code`).
        Returns ``(h [B, C], skip [B, C])``."""
        if h is not None:
            _push_column(cache.horizontal, h)
        # The (1, s+1) convolution over the window as one matrix product (a Conv2d call on a 1x(s+1)
        # input costs about twice as much on a CPU), added to the row's link and biases in the same call.
        weight = self.horizontal.weight.flatten(1)  # [2C, C*(s+1)], the window's [B, C, s+1] order
        pre = torch.addmm(cache.row_pre.index_select(0, col).squeeze(0), cache.horizontal.flatten(1), weight.t())
        return self.horizontal_output(pre, None, h)

    def push_code(self, cache: LayerCache, x: torch.Tensor) -> None:
        """First layer: the embedding ``x [B, C]`` of the code just chosen enters the horizontal window."""
        _push_column(cache.horizontal, x)


@dataclass(eq=False)
class PriorCache:
    """A :class:`GatedPixelCNN`'s sampling state (see :meth:`GatedPixelCNN.new_cache`)."""

    labels: torch.Tensor | None
    features: torch.Tensor | None  # conditioning stack output [B, Cc, H, W], computed once
    row_inputs: torch.Tensor  # [B, C, 1, W]: embeddings of the code row being generated
    layers: list[LayerCache]
    attention: dict[str, AttentionCache]

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer the sampling steps update (for checks that none of them moves)."""
        caches = [*self.layers, *self.attention.values()]
        return [self.row_inputs, *(t for c in caches for t in vars(c).values() if t is not None)]


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN prior over a code map; logits over the codebook at every position.

    Example::

        prior = GatedPixelCNN(PriorConfig(), PriorLayout(num_codes=512, shape=(32, 32)))
        logits = prior(codes)                           # [B, 512, 32, 32]
        loss = F.cross_entropy(logits.float(), codes)   # nats per code
    """

    def __init__(self, config: PriorConfig, layout: PriorLayout):
        super().__init__()
        self.config = config
        self.layout = layout
        c = config.channels
        self.embed = nn.Embedding(layout.num_codes, c)
        self.condition_stack = ConditionStack(config, layout) if layout.condition_num_codes else None
        self.layers = nn.ModuleList(GatedLayer(config, layout, first=l == 0) for l in range(config.num_layers))
        self.attention = nn.ModuleDict(
            {
                str(l): CausalAttentionBlock(
                    channels=c, num_heads=config.num_heads, shape=layout.shape, dropout=config.dropout,
                    backend=config.kernel_backend,
                )
                for l in config.attention_after
            }
        )
        # Reads skip sum + final horizontal features, channels-last.
        self.head = nn.Sequential(nn.ELU(), nn.Linear(c, c), nn.ELU(), nn.Linear(c, layout.num_codes))

    def check_inputs(
        self,
        codes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        condition: Condition | None = None,
        *,
        batch: int | None = None,
    ) -> None:
        """Raise :class:`DataError` naming the input whose shape, dtype or range does not fit."""
        cfg = self.layout
        ranges = []  # (name, tensor, upper bound): checked together, with one read back to the host
        if codes is not None:
            ranges.append(_check_indices("codes", codes, tuple(cfg.shape), cfg.num_codes))
            batch = codes.shape[0]
        if cfg.num_classes:
            if labels is None:
                raise DataError(f"labels: this prior is class-conditional ({cfg.num_classes} classes)")
            ranges.append(_check_indices("labels", labels, (), cfg.num_classes))
            if batch is not None and labels.shape[0] != batch:
                raise DataError(f"labels: batch size {labels.shape[0]}, expected {batch}")
        elif labels is not None:
            raise DataError("labels: given to an unconditional prior (num_classes = 0)")
        if cfg.condition_num_codes:
            if condition is None:
                raise DataError("condition: this prior needs the code maps of the levels above it")
            maps = condition_maps(condition)
            if len(maps) != len(cfg.conditions):
                raise DataError(f"condition: this prior is conditioned on {len(cfg.conditions)} code map(s) "
                                f"(the levels above it, top first), got {len(maps)}")
            for i, (m, (k, shape)) in enumerate(zip(maps, cfg.conditions)):
                name = "condition" if len(maps) == 1 else f"condition[{i}]"
                ranges.append(_check_indices(name, m, shape, k))
                if batch is not None and m.shape[0] != batch:
                    raise DataError(f"{name}: batch size {m.shape[0]}, expected {batch}")
        elif condition is not None:
            raise DataError("condition: given to a prior without conditioning stack")
        _check_ranges(ranges)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` int64 → input embeddings ``[B, C, H, W]``."""
        return rearrange(self.embed(codes), "b h w c -> b c h w")

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        condition: Condition | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` of ``codes [B, H, W]`` int64.

        ``labels [B]`` for a class-conditional prior, ``condition [B, Hc, Wc]`` for a prior below the
        top (or one such map per level above it, top first).
        """
        self.check_inputs(codes, labels, condition)
        return self.forward_embedded(self.embed_codes(codes), labels, condition)

    def forward_embedded(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        condition: Condition | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` from input embeddings ``x [B, C, H, W]`` (for gradient checks)."""
        batch, _, height, width = x.shape
        features = self.condition_stack(*condition_maps(condition)) if self.condition_stack is not None else None
        v, h, skip = x, x, 0
        for l, layer in enumerate(self.layers):
            bias_v, bias_h = layer.biases(labels, features)
            v, h, layer_skip = layer(v, h, bias_v, bias_h)
            skip = skip + layer_skip
            if str(l) in self.attention:
                h = self.attention[str(l)](h, x)
        logits = self.head(skip + _rows(h))  # [B*H*W, K]
        return rearrange(logits, "(b h w) k -> b k h w", b=batch, h=height, w=width)

    def new_cache(self, batch_size: int, *, labels: torch.Tensor | None = None,
                  condition: Condition | None = None) -> PriorCache:
        """Caches for sampling ``batch_size`` maps in raster order (after Ramachandran et al. 2017,
        "Fast Generation for Convolutional Autoregressive Models"): each layer keeps the inputs its
        shifted convolutions still need (:class:`LayerCache`), each attention block its keys and values
        (:class:`~vqgen.models.attention.AttentionCache`), so one step costs one position's worth of work.
        Per code row call :meth:`finish_row` (rows after the first) and :meth:`begin_row`, then per
        position :meth:`step` and :meth:`commit`. The conditioning stack and class embeddings run once,
        here; the layers' 1x1 bias projections once per row."""
        self.check_inputs(labels=labels, condition=condition, batch=batch_size)
        height, width = self.layout.shape
        features = None if self.condition_stack is None else self.condition_stack(*condition_maps(condition))
        row = None if features is None else features[:, :, :1]
        return PriorCache(
            labels, features, self.embed.weight.new_zeros(batch_size, self.config.channels, 1, width),
            [layer.new_cache(batch_size, width, labels, row) for layer in self.layers],
            {name: block.new_cache(batch_size, height * width) for name, block in self.attention.items()},
        )

    def reset_cache(self, cache: PriorCache) -> None:
        """Back to empty caches, in place (every buffer keeps its address)."""
        cache.row_inputs.zero_()
        for module, part in zip([*self.layers, *self.attention.values()], [*cache.layers, *cache.attention.values()]):
            module.reset_cache(part)

    def begin_row(self, cache: PriorCache, position: torch.Tensor) -> None:
        """Start the code row of raster ``position`` (int64 ``[1]``, its first column)."""
        row = position // self.layout.shape[1]
        features = None if cache.features is None else cache.features.index_select(2, row)  # [B, Cc, 1, W]
        for layer, layer_cache in zip(self.layers, cache.layers):
            layer.begin_row(layer_cache, cache.labels, features)

    def finish_row(self, cache: PriorCache) -> None:
        """Push the completed code row through every layer's vertical stack, all layers together."""
        row = cache.row_inputs  # layer 0's input row, then each layer's output row
        for layer, layer_cache in zip(self.layers, cache.layers):
            row = layer.finish_row(layer_cache, row)

    def step(self, cache: PriorCache, position: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` at raster ``position`` (int64 ``[1]``), as ``forward`` gives them there."""
        row, col = position // self.layout.shape[1], position % self.layout.shape[1]
        h, skip = None, 0
        for l, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            h, layer_skip = layer.step(layer_cache, h, col)
            skip = skip + layer_skip
            if str(l) in self.attention:
                h = self.attention[str(l)].step(cache.attention[str(l)], h, row, col, position)
        return self.head(skip + h)

    def commit(self, cache: PriorCache, codes: torch.Tensor, position: torch.Tensor) -> None:
        """Feed the codes ``[B]`` chosen at ``position`` (after :meth:`step` there) into the caches."""
        x = self.embed(codes)  # [B, C]
        self.layers[0].push_code(cache.layers[0], x)
        cache.row_inputs.index_copy_(3, position % self.layout.shape[1], x[:, :, None, None])
        for name, block in self.attention.items():
            block.commit(cache.attention[name], x, position)


def _check_indices(
    name: str, t: torch.Tensor, shape: tuple[int, ...], num_codes: int
) -> tuple[str, torch.Tensor, int]:
    """Dtype and shape of an index tensor; returns what :func:`_check_ranges` needs."""
    if t.dtype != torch.int64:
        raise DataError(f"{name}: expected int64, got {t.dtype}")
    if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
        expected = "".join(f", {size}" for size in shape)
        raise DataError(f"{name}: expected shape [B{expected}], got {list(t.shape)}")
    return name, t, num_codes


def _check_ranges(checks: list[tuple[str, torch.Tensor, int]]) -> None:
    """Every tensor's values in ``[0, bound)``, with a single read back to the host for all of them
    (on a GPU each read makes the CPU wait for the device; the details are read only on failure)."""
    # Under torch.compile the read would split the graph, so compiled training relies on the
    # embedding lookup's own bounds check.
    if torch.compiler.is_compiling():
        return
    checks = [(name, t, bound) for name, t, bound in checks if t.numel()]
    if not checks:
        return
    outside = [((t < 0) | (t >= bound)).any() for _, t, bound in checks]
    if not torch.stack(outside).any():
        return
    for (name, t, bound), bad in zip(checks, outside):
        if bad:
            raise DataError(f"{name}: values must lie in [0, {bound}), got [{int(t.min())}, {int(t.max())}]")
