"""Ancestral sampling from gated PixelCNN priors, in raster order.

Two paths that give the same logits for the same prefix:

- :func:`sample_full` recomputes the whole network for every position (the reference, O((HW)^2)).
- :func:`sample_cached` runs an :class:`IncrementalPrior` (after Ramachandran et al. 2017, "Fast
  Generation for Convolutional Autoregressive Models"): each layer keeps the inputs its shifted
  convolutions still need and each attention block its keys and values, so one step costs one
  position's worth of work.

Cache design. Everything is allocated once, in fixed shapes, and updated in place:

- vertical stack, per layer: a window ``[B, C, s+1, W+2s]`` of the last ``s+1`` input rows
  (``s = k//2``; zero columns at both sides). Once a code row is complete it is pushed in, and all
  layers compute their next vertical row together (``s+1`` rows → one row). That row's link features
  ``[B, 2C, 1, W]`` are what the horizontal stack reads along the following code row.
- horizontal stack, per layer: a window ``[B, C, s+1]`` of the last ``s+1`` input columns, zeroed at
  the start of every row; one column is pushed per step.
- attention, per block: key and value caches ``[B, heads, HW+1, d]`` in the shifted layout of
  :func:`~vqgen.kernels.causal_attention.strictly_causal_attention` (slot 0 = learned start, slot ``q+1`` =
  position ``q``), read by one query through a fixed-shape visibility mask.
- the conditioning stack and class embeddings run once; their per-layer 1x1 projections run once
  per row.

Per-position indices (column, slot) are device tensors used through ``index_select`` /
``index_copy_``, so a step is the same sequence of fixed-shape ops at every position: the row update
and the position step can each be captured as a CUDA graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from vqgen.errors import ConfigError
from vqgen.kernels.causal_attention import attend_to_cache, new_kv_cache
from vqgen.models.pixelcnn import GatedPixelCNN


@dataclass(kw_only=True)
class SamplerConfig:
    """How codes are drawn from the prior's logits."""

    temperature: float = 1.0
    """Divides the logits before sampling; 0 takes the most likely code (argmax)."""
    top_k: int = 0
    """Sample among the k most likely codes only (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of codes holding this probability mass (1.0 = off)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k / top-p set to ``-inf``; ``logits [N, K]`` → ``[N, K]``.

    The most likely code always survives.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a code when the codes ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_codes(
    logits: torch.Tensor, config: SamplerConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one code per row of ``logits [N, K]`` → ``[N]`` int64 (shared by both sampling paths)."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, top_k=config.top_k, top_p=config.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _push_column(window: torch.Tensor, column: torch.Tensor) -> None:
    """Shift ``window [B, C, n]`` one column left and write ``column [B, C]`` last."""
    window[:, :, :-1] = window[:, :, 1:].clone()
    window[:, :, -1] = column


def _push_row(window: torch.Tensor, row: torch.Tensor, pad: int) -> None:
    """Shift ``window [B, C, n, W+2*pad]`` one row up and write ``row [B, C, 1, W]`` last."""
    window[:, :, :-1] = window[:, :, 1:].clone()
    window[:, :, -1:, pad : window.shape[-1] - pad] = row


class IncrementalPrior:
    """Cached, position-by-position evaluation of a :class:`GatedPixelCNN` in raster order.

    The prior must be in eval mode. Per position, call :meth:`step_logits` then :meth:`commit`::

        inc = IncrementalPrior(prior, n, labels=labels, condition=top_codes)
        for _ in range(height * width):
            logits = inc.step_logits()      # [n, K], equal to prior(codes)[:, :, i, j]
            inc.commit(chosen_codes)        # [n] int64, the codes at this position
    """

    def __init__(
        self,
        prior: GatedPixelCNN,
        batch_size: int,
        *,
        labels: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ):
        if prior.training:
            raise ValueError("IncrementalPrior needs the prior in eval mode (dropout off): call prior.eval()")
        prior.check_inputs(labels=labels, condition=condition, batch=batch_size)
        cfg = prior.config
        self.prior = prior
        self.height, self.width = cfg.shape
        self.pad = cfg.kernel_size // 2
        self.labels = labels
        weight = prior.embed.weight
        new = partial(torch.zeros, device=weight.device, dtype=weight.dtype)
        b, c, s, w = batch_size, cfg.channels, self.pad, self.width
        with torch.no_grad():
            self.features = None if prior.condition_stack is None else prior.condition_stack(condition)
            self.vertical_windows = [new(b, c, s + 1, w + 2 * s) for _ in prior.layers]
            self.horizontal_windows = [new(b, c, s + 1) for _ in prior.layers]
            # Code row 0 sees only the zero padding above: link of an all-zero vertical row.
            self.links = [layer.link(new(b, 2 * c, 1, w)) for layer in prior.layers]
            self.row_inputs = new(b, c, 1, w)  # embeddings of the code row being generated
            self.keys: dict[str, torch.Tensor] = {}
            self.values: dict[str, torch.Tensor] = {}
            self.normed: dict[str, torch.Tensor] = {}
            num_slots = self.height * self.width + 1
            for name, block in prior.attention.items():
                self.keys[name], self.values[name] = new_kv_cache(block.start[0], block.start[1], b, num_slots)
                self.normed[name] = new(b, c)
        self.bias_v: list[torch.Tensor | None] = [None] * len(prior.layers)
        self.bias_h: list[torch.Tensor | None] = [None] * len(prior.layers)
        self.slots = torch.arange(num_slots, device=weight.device)
        self.position = 0  # host copy, for control flow only
        self.position_t = torch.zeros(1, dtype=torch.int64, device=weight.device)

    @property
    def done(self) -> bool:
        return self.position >= self.height * self.width

    def _start_row(self) -> None:
        """Vertical rows of every layer from the completed code row; conditioning biases of this row."""
        if self.position > 0:
            new_row = self.row_inputs  # [B, C, 1, W]: layer 0's input row, then each layer's output
            for l, layer in enumerate(self.prior.layers):
                window = self.vertical_windows[l]
                _push_row(window, new_row, self.pad)
                residual = None if layer.first else new_row
                new_row, link = layer.vertical_row(window, self.bias_v[l], residual)
                self.links[l].copy_(link)
        row = self.position_t // self.width
        features = None if self.features is None else self.features.index_select(2, row)  # [B, Cc, 1, W]
        for l, layer in enumerate(self.prior.layers):
            # The vertical bias of this row is used when the next row starts.
            self.bias_v[l], self.bias_h[l] = layer.biases(self.labels, features)
        for window in self.horizontal_windows:
            window.zero_()

    @staticmethod
    def _bias_at(bias: torch.Tensor | None, col: torch.Tensor) -> torch.Tensor | None:
        """``[B, 2C, 1, W|1]`` → ``[B, 2C]`` at column ``col`` (class-only biases are per image)."""
        if bias is None:
            return None
        if bias.shape[-1] != 1:
            bias = bias.index_select(3, col)
        return bias.flatten(1)

    def _attend(self, name: str, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """One query of attention block ``name`` against its cache: ``h [B, C]`` → ``[B, C]``."""
        block = self.prior.attention[name]
        a = h + block.position_embedding(row, col)
        normed = block.norm(a)
        self.normed[name].copy_(normed)  # the keys/values of this position are written by commit()
        q = block.split_heads(block.query(normed)[:, None])  # [B, heads, 1, d]
        visible = self.slots <= self.position_t
        attended = attend_to_cache(q, self.keys[name], self.values[name], visible)
        return block.finish(a[:, None], attended)[:, 0]

    @torch.no_grad()
    def step_logits(self) -> torch.Tensor:
        """Logits ``[B, K]`` of the current position, given all codes committed so far."""
        if self.done:
            raise IndexError("every position has been generated")
        if self.position % self.width == 0:
            self._start_row()
        row, col = self.position_t // self.width, self.position_t % self.width
        h, skip = None, 0
        for l, layer in enumerate(self.prior.layers):
            window = self.horizontal_windows[l]
            if not layer.first:
                _push_column(window, h)
            link = self.links[l].index_select(3, col).flatten(1)  # [B, 2C]
            bias = self._bias_at(self.bias_h[l], col)
            h, layer_skip = layer.horizontal_step(window, link, bias, None if layer.first else h)
            skip = skip + layer_skip
            if str(l) in self.prior.attention:
                h = self._attend(str(l), h, row, col)
        return self.prior.head(skip + h)

    @torch.no_grad()
    def commit(self, codes: torch.Tensor) -> None:
        """Feed the codes ``[B]`` chosen at the current position and move to the next one."""
        x = self.prior.embed(codes)  # [B, C]
        _push_column(self.horizontal_windows[0], x)
        col = self.position_t % self.width
        self.row_inputs.index_copy_(3, col, x[:, :, None, None])
        slot = self.position_t + 1
        for name, block in self.prior.attention.items():
            k, v = block.keys_values(self.normed[name][:, None], x[:, None])  # [B, heads, 1, d]
            self.keys[name].index_copy_(2, slot, k)
            self.values[name].index_copy_(2, slot, v)
        self.position += 1
        self.position_t += 1


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _new_codes(prior: GatedPixelCNN, n: int) -> torch.Tensor:
    return torch.zeros(n, *prior.config.shape, dtype=torch.int64, device=prior.embed.weight.device)


def _raster_sample(prior, n, config, generator, progress, desc, next_logits, commit=None) -> torch.Tensor:
    """The loop both samplers share: for each position in raster order, draw from ``next_logits``."""
    codes = _new_codes(prior, n)
    height, width = prior.config.shape
    config = config or SamplerConfig()
    for i in tqdm(range(height), desc=desc, disable=not progress):
        for j in range(width):
            chosen = choose_codes(next_logits(codes, i, j), config, generator)
            codes[:, i, j] = chosen
            if commit is not None:
                commit(chosen)
    return codes


def sample_full(
    prior: GatedPixelCNN,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Reference sampler: run the whole prior once per position. Returns codes ``[n, H, W]``."""
    with _eval_mode(prior):
        return _raster_sample(prior, n, config, generator, progress, "sampling (full)",
                              lambda codes, i, j: prior(codes, labels, condition)[:, :, i, j])


def sample_cached(
    prior: GatedPixelCNN,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Fast sampler through :class:`IncrementalPrior`. Returns codes ``[n, H, W]``."""
    with _eval_mode(prior):
        state = IncrementalPrior(prior, n, labels=labels, condition=condition)
        return _raster_sample(prior, n, config, generator, progress, "sampling (cached)",
                              lambda codes, i, j: state.step_logits(), state.commit)


def sample(
    prior: GatedPixelCNN,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    cached: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``n`` code maps ``[n, H, W]`` from ``prior`` in raster order.

    Args:
        labels: ``[n]`` class labels for a class-conditional prior.
        condition: ``[n, Hc, Wc]`` top-level codes for a bottom prior.
        config: temperature / top-k / top-p (defaults: plain sampling at temperature 1).
        generator: makes the draws reproducible; the cached and full paths consume it identically.
        cached: use the incremental path (fast) instead of full recomputation (reference).
    """
    sampler = sample_cached if cached else sample_full
    return sampler(
        prior, n, labels=labels, condition=condition, config=config, generator=generator, progress=progress
    )
