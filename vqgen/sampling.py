"""Ancestral sampling from gated PixelCNN priors, in raster order.

:func:`sample` takes one of two paths that give the same logits for the same prefix: full
(``cached=False``) recomputes the whole network for every position (the reference, O((HW)^2));
cached (the default) runs an :class:`IncrementalPrior`, which steps the prior one position at a
time on the caches of :meth:`GatedPixelCNN.new_cache <vqgen.models.pixelcnn.GatedPixelCNN.new_cache>`
(each layer owns its cache and its step, beside its forward).

Those caches are allocated once, in fixed shapes, and updated in place. Per-position indices (column,
slot) are device tensors used through ``index_select`` / ``index_copy_``, and the random numbers of
the whole map are drawn before the first step, so a step (logits, draw, cache update) is the same
sequence of fixed-shape ops at every position with no host synchronisation:
:meth:`IncrementalPrior.generate` can record the row update and the position step as CUDA graphs
and replay them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from vqgen.configtools import added_field
from vqgen.errors import ConfigError
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
    precision: Literal["fp32", "bf16"] = added_field("fp32")
    """The prior's arithmetic while sampling. "bf16" runs a bf16 copy of its weights and caches (a
    cached step is bound by reading the weights, so half the bytes); the logits are drawn from in
    fp32. Not bit-exact: a draw that lands within rounding of a CDF step can take the neighbouring
    code (``benchmarks/sampling_speed.py --precision bf16`` measures the divergence)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision", f'must be "fp32" or "bf16", got {self.precision!r}')


SAMPLING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prior_for_sampling(prior: GatedPixelCNN, precision: str) -> GatedPixelCNN:
    """``prior`` itself in fp32, else a copy in ``precision`` (the caller's model is left as it is)."""
    dtype = SAMPLING_DTYPES[precision]
    if prior.embed.weight.dtype == dtype:
        return prior
    return copy.deepcopy(prior).to(dtype)


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

    def __init__(self, prior: GatedPixelCNN, batch_size: int, *, labels: torch.Tensor | None = None,
                 condition: torch.Tensor | None = None):
        if prior.training:
            raise ValueError("IncrementalPrior needs the prior in eval mode (dropout off): call prior.eval()")
        self.prior = prior
        self.height, self.width = prior.layout.shape
        with torch.no_grad():
            self.cache = prior.new_cache(batch_size, labels=labels, condition=condition)
        device = self.cache.row_inputs.device
        self.codes = torch.zeros(batch_size, self.height * self.width, dtype=torch.int64, device=device)
        self.uniforms = torch.zeros(self.height * self.width, batch_size, device=device)
        self.position = 0  # host copy, for control flow only
        self.position_t = torch.zeros(1, dtype=torch.int64, device=device)
        self._finish_row = partial(prior.finish_row, self.cache)  # push the completed row (or its graph)
        self._begin_row = partial(prior.begin_row, self.cache, self.position_t)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to position 0 with empty caches, in place (every buffer keeps its address)."""
        self.prior.reset_cache(self.cache)
        self.codes.zero_()
        self.position = 0
        self.position_t.zero_()

    @property
    def done(self) -> bool:
        return self.position >= self.height * self.width

    def _start_row(self, finish_row=None) -> None:
        """At the first position of a row: finish the previous row (``finish_row``, by default
        :meth:`_finish_row` or its graph replay), then this row's biases (tiny, once per row:
        not worth a graph of its own)."""
        if self.position > 0:
            (finish_row or self._finish_row)()
        self._begin_row()

    def _commit(self, codes: torch.Tensor) -> None:
        """Device-side part of :meth:`commit`: caches, the code map and ``position_t``."""
        self.prior.commit(self.cache, codes, self.position_t)
        self.codes.index_copy_(1, self.position_t, codes[:, None])
        self.position_t += 1

    def _draw_step(self, config: SamplerConfig) -> None:
        """Logits, draw and commit of the current position: fixed-shape tensor ops only, no host sync."""
        uniform = self.uniforms.index_select(0, self.position_t)[0]
        self._commit(choose_codes(self.prior.step(self.cache, self.position_t), config, uniform))

    @torch.no_grad()
    def step_logits(self) -> torch.Tensor:
        """Logits ``[B, K]`` of the current position, given all codes committed so far."""
        if self.done:
            raise IndexError("every position has been generated")
        if self.position % self.width == 0:
            self._start_row()
        return self.prior.step(self.cache, self.position_t)

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
        replay_row, replay_step = self._finish_row, partial(self._draw_step, config)
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
            self._begin_row()
            for _ in range(2):
                self._draw_step(config)
            self._finish_row()
        torch.cuda.current_stream().wait_stream(side)
        self.reset()  # the uniforms are not touched by the steps, so they stay as set
        row_graph, step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(row_graph):
            self._finish_row()
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
    height, width = prior.layout.shape
    config = config or SamplerConfig()
    prior = prior_for_sampling(prior, config.precision)
    with _eval_mode(prior):
        device = prior.embed.weight.device
        uniforms = draw_uniforms(height * width, n, generator, device)
        if cached:
            state = IncrementalPrior(prior, n, labels=labels, condition=condition)
            return state.generate(config, uniforms, cuda_graphs=cuda_graphs, progress=progress)
        codes = torch.zeros(n, height, width, dtype=torch.int64, device=device)
        for i in tqdm(range(height), desc="sampling (full)", disable=not progress):
            for j in range(width):
                logits = prior(codes, labels, condition)[:, :, i, j]
                codes[:, i, j] = choose_codes(logits, config, uniforms[i * width + j])
        return codes
