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
``index_copy_``, and the random numbers of the whole map are drawn before the first step, so a step
(logits, draw, cache update) is the same sequence of fixed-shape ops at every position with no host
synchronisation: :meth:`IncrementalPrior.generate` can record the row update and the position step
as CUDA graphs and replay them.
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
from vqgen.kernels.causal_attention import attend_to_cache, new_kv_cache, reset_kv_cache
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


def draw_uniforms(positions: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The random numbers of a whole code map, ``[positions, n]`` in [0, 1), drawn up front.

    They come from ``generator`` on its own device and are then moved, so a seed gives the same
    draws on a CPU and a GPU, and a sampling step needs no random number generator of its own
    (which keeps it a fixed sequence of tensor ops: it can be replayed as a CUDA graph).
    """
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(positions, n, generator=generator, device=source).to(device)


def choose_codes(logits: torch.Tensor, config: SamplerConfig, uniform: torch.Tensor) -> torch.Tensor:
    """One code per row of ``logits [N, K]`` → ``[N]`` int64, by inverting each row's CDF at ``uniform [N]``.

    Shared by both sampling paths. A code outside the top-k / top-p set has probability zero, so
    its CDF step is empty and no draw can land on it.
    """
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, top_k=config.top_k, top_p=config.top_p)
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniform.to(cdf)[:, None] * cdf[:, -1:]
    codes = torch.searchsorted(cdf, target, right=True)[:, 0]
    # Rounding can put the target on the last step; fall back to the last code that may be drawn.
    last_allowed = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(codes, last_allowed)


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

    The prior must be in eval mode. Either drive it one position at a time (what the equality
    tests do)::

        inc = IncrementalPrior(prior, n, labels=labels, condition=top_codes)
        for _ in range(height * width):
            logits = inc.step_logits()      # [n, K], equal to prior(codes)[:, :, i, j]
            inc.commit(chosen_codes)        # [n] int64, the codes at this position

    or let :meth:`generate` draw a whole map, optionally replaying each step as a CUDA graph.
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
        device = weight.device
        new = partial(torch.zeros, device=device, dtype=weight.dtype)
        b, c, s, w = batch_size, cfg.channels, self.pad, self.width
        num_slots = self.height * self.width + 1
        with torch.no_grad():
            self.features = None if prior.condition_stack is None else prior.condition_stack(condition)
            self.vertical_windows = [new(b, c, s + 1, w + 2 * s) for _ in prior.layers]
            self.horizontal_windows = [new(b, c, s + 1) for _ in prior.layers]
            self.links = [new(b, 2 * c, 1, w) for _ in prior.layers]
            self.row_inputs = new(b, c, 1, w)  # embeddings of the code row being generated
            self.keys: dict[str, torch.Tensor] = {}
            self.values: dict[str, torch.Tensor] = {}
            self.normed = {name: new(b, c) for name in prior.attention}
            for name, block in prior.attention.items():
                self.keys[name], self.values[name] = new_kv_cache(block.start[0], block.start[1], b, num_slots)
        # Conditioning biases of the current row, [B, 2C, 1, W|1] per layer, filled in place per row.
        self.bias_v: list[torch.Tensor | None] = [None] * len(prior.layers)
        self.bias_h: list[torch.Tensor | None] = [None] * len(prior.layers)
        self.slots = torch.arange(num_slots, device=device)
        self.codes = torch.zeros(b, self.height * self.width, dtype=torch.int64, device=device)
        self.uniforms = torch.zeros(self.height * self.width, b, device=device)
        self.position = 0  # host copy, for control flow only
        self.position_t = torch.zeros(1, dtype=torch.int64, device=device)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to position 0 with empty caches, in place (every buffer keeps its address)."""
        for buffer in (*self.vertical_windows, *self.horizontal_windows, self.row_inputs, *self.normed.values()):
            buffer.zero_()
        # Code row 0 sees only the zero padding above: the link of an all-zero vertical row.
        for link, layer in zip(self.links, self.prior.layers):
            link.copy_(layer.link(torch.zeros_like(link)))
        for name, block in self.prior.attention.items():
            reset_kv_cache(self.keys[name], self.values[name], *block.start)
        self.codes.zero_()
        self.position = 0
        self.position_t.zero_()

    @property
    def done(self) -> bool:
        return self.position >= self.height * self.width

    def _advance_rows(self) -> None:
        """Push the completed code row through every layer's vertical stack (rows after the first)."""
        new_row = self.row_inputs  # [B, C, 1, W]: layer 0's input row, then each layer's output
        for l, layer in enumerate(self.prior.layers):
            window = self.vertical_windows[l]
            _push_row(window, new_row, self.pad)
            residual = None if layer.first else new_row
            new_row, link = layer.vertical_row(window, self.bias_v[l], residual)
            self.links[l].copy_(link)

    def _row_biases(self) -> None:
        """Conditioning biases of the row at ``position_t``; empty horizontal windows."""
        row = self.position_t // self.width
        features = None if self.features is None else self.features.index_select(2, row)  # [B, Cc, 1, W]
        for l, layer in enumerate(self.prior.layers):
            # The vertical bias of this row is used when the next row starts.
            for buffers, bias in zip((self.bias_v, self.bias_h), layer.biases(self.labels, features)):
                if bias is None:
                    continue
                if buffers[l] is None:
                    buffers[l] = bias.clone()
                else:
                    buffers[l].copy_(bias)
        for window in self.horizontal_windows:
            window.zero_()

    def _start_row(self, advance_rows=None) -> None:
        """At the first position of a row: finish the previous row (``advance_rows``, by default
        :meth:`_advance_rows` or its graph replay), then this row's biases (tiny, once per row:
        not worth a graph of its own)."""
        if self.position > 0:
            (advance_rows or self._advance_rows)()
        self._row_biases()

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

    def _logits(self) -> torch.Tensor:
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

    def _commit(self, codes: torch.Tensor) -> None:
        """Device-side part of :meth:`commit`: caches, the code map and ``position_t``."""
        x = self.prior.embed(codes)  # [B, C]
        _push_column(self.horizontal_windows[0], x)
        col = self.position_t % self.width
        self.row_inputs.index_copy_(3, col, x[:, :, None, None])
        self.codes.index_copy_(1, self.position_t, codes[:, None])
        slot = self.position_t + 1
        for name, block in self.prior.attention.items():
            k, v = block.keys_values(self.normed[name][:, None], x[:, None])  # [B, heads, 1, d]
            self.keys[name].index_copy_(2, slot, k)
            self.values[name].index_copy_(2, slot, v)
        self.position_t += 1

    def _draw_step(self, config: SamplerConfig) -> None:
        """Logits, draw and commit of the current position: fixed-shape tensor ops only, no host sync."""
        uniform = self.uniforms.index_select(0, self.position_t)[0]
        self._commit(choose_codes(self._logits(), config, uniform))

    @torch.no_grad()
    def step_logits(self) -> torch.Tensor:
        """Logits ``[B, K]`` of the current position, given all codes committed so far."""
        if self.done:
            raise IndexError("every position has been generated")
        if self.position % self.width == 0:
            self._start_row()
        return self._logits()

    @torch.no_grad()
    def commit(self, codes: torch.Tensor) -> None:
        """Feed the codes ``[B]`` chosen at the current position and move to the next one."""
        self._commit(codes)
        self.position += 1

    @torch.no_grad()
    def generate(
        self, config: SamplerConfig, uniforms: torch.Tensor, *, cuda_graphs: bool = False, progress: bool = False
    ) -> torch.Tensor:
        """Draw a whole code map from position 0 with ``uniforms [H*W, B]``; returns ``[B, H, W]``.

        ``cuda_graphs`` (CUDA only) records the row update and the position step once each and
        replays them, so a step costs one graph launch instead of one launch per kernel: at small
        batch the step is otherwise bound by launch overhead, not by the GPU.
        """
        self.reset()
        self.uniforms.copy_(uniforms)
        replay_row, replay_step = self._advance_rows, partial(self._draw_step, config)
        if cuda_graphs and self.codes.is_cuda:
            replay_row, replay_step = self._capture(config)
        positions = tqdm(range(self.height * self.width), desc="sampling (cached)", disable=not progress)
        for _ in positions:
            if self.position % self.width == 0:
                self._start_row(replay_row)
            replay_step()
            self.position += 1
        return self.codes.view(-1, self.height, self.width).clone()

    def _capture(self, config: SamplerConfig):
        """Record the row update and the position step as CUDA graphs; returns their replays.

        Warm-up runs on a side stream first (as capture requires; it also compiles any Triton
        kernel), then :meth:`reset` restores the state it touched. The graphs read and write this
        object's buffers, which never move, so replaying them continues from the current state.
        """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._row_biases()
            for _ in range(2):
                self._draw_step(config)
            self._advance_rows()
        torch.cuda.current_stream().wait_stream(side)
        self.reset()  # the uniforms are not touched by the steps, so they stay as set
        row_graph, step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(row_graph):
            self._advance_rows()
        with torch.cuda.graph(step_graph):
            self._draw_step(config)
        return row_graph.replay, step_graph.replay


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


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
    """Reference sampler: run the whole prior once per position. Returns codes ``[n, H, W]``.

    It draws with the same uniforms, in the same order, as :func:`sample_cached`.
    """
    height, width = prior.config.shape
    config = config or SamplerConfig()
    with _eval_mode(prior):
        codes = torch.zeros(n, height, width, dtype=torch.int64, device=prior.embed.weight.device)
        uniforms = draw_uniforms(height * width, n, generator, codes.device)
        for i in tqdm(range(height), desc="sampling (full)", disable=not progress):
            for j in range(width):
                logits = prior(codes, labels, condition)[:, :, i, j]
                codes[:, i, j] = choose_codes(logits, config, uniforms[i * width + j])
        return codes


def sample_cached(
    prior: GatedPixelCNN,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """Fast sampler through :class:`IncrementalPrior`. Returns codes ``[n, H, W]``."""
    with _eval_mode(prior):
        state = IncrementalPrior(prior, n, labels=labels, condition=condition)
        height, width = prior.config.shape
        uniforms = draw_uniforms(height * width, n, generator, state.codes.device)
        return state.generate(config or SamplerConfig(), uniforms, cuda_graphs=cuda_graphs, progress=progress)


def sample(
    prior: GatedPixelCNN,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    cached: bool = True,
    cuda_graphs: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``n`` code maps ``[n, H, W]`` from ``prior`` in raster order.

    Args:
        labels: ``[n]`` class labels for a class-conditional prior.
        condition: ``[n, Hc, Wc]`` top-level codes for a bottom prior.
        config: temperature / top-k / top-p (defaults: plain sampling at temperature 1).
        generator: makes the draws reproducible; the cached and full paths consume it identically.
        cached: use the incremental path (fast) instead of full recomputation (reference).
        cuda_graphs: replay the cached path's steps as CUDA graphs (CUDA tensors only).
    """
    if not cached:
        return sample_full(prior, n, labels=labels, condition=condition, config=config, generator=generator,
                           progress=progress)
    return sample_cached(prior, n, labels=labels, condition=condition, config=config, generator=generator,
                         progress=progress, cuda_graphs=cuda_graphs)
