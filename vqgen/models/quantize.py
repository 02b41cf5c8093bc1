"""EMA vector quantizer (van den Oord et al. 2017, appendix; Razavi et al. 2019).

The codebook is not learned by gradient descent: it tracks, per code, an exponential moving average
of how many encoder outputs were assigned to it (the cluster size) and of their sum, and each code is
the ratio of the two. All of it lives in buffers, so no optimizer touches it.

Under data parallelism the per-batch counts and sums are all-reduced (summed) before the EMA step,
so every process computes the same codebook from the same global statistics. Dead-code restarts are
decided on rank 0 and broadcast, so they stay identical too. DDP must therefore be built with
``broadcast_buffers=False``: the buffers are already in sync and broadcasting them is wasted traffic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqgen.errors import ConfigError
from vqgen.kernels import Backend, check_backend
from vqgen.kernels.vq_search import nearest_code
from vqgen.metrics.image import perplexity


@dataclass(kw_only=True)
class QuantizerConfig:
    """Settings of one EMA vector quantizer."""

    num_codes: int = 512
    """Number of codebook vectors K."""
    code_dim: int = 64
    """Dimension D of each code (the channel count of the quantized map)."""
    decay: float = 0.99
    """EMA decay of cluster sizes and embedding sums; in (0, 1)."""
    eps: float = 1e-5
    """Laplace smoothing added to each cluster size so no code divides by zero."""
    commitment_cost: float = 0.25
    """Weight beta of the commitment loss ||z - sg(q)||^2."""
    dead_code_threshold: float = 1.0
    """EMA cluster size below which a code counts as dead and is restarted; 0 disables restarts."""
    restart_every: int = 100
    """Training steps between dead-code checks."""
    data_init: bool = True
    """At the first training step, place every code on an encoder output of that batch. A random
    codebook far from the encoder's outputs sends them all to one code, and a level that starts
    collapsed tends to stay collapsed (the decoder learns to ignore it)."""
    kernel_backend: Backend = "auto"
    """Nearest-code search implementation: "auto", "triton" or "torch"."""

    def __post_init__(self) -> None:
        if self.num_codes < 1:
            raise ConfigError("num_codes", f"must be >= 1, got {self.num_codes}")
        if self.code_dim < 1:
            raise ConfigError("code_dim", f"must be >= 1, got {self.code_dim}")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError("decay", f"must be in (0, 1), got {self.decay}")
        if not self.eps > 0.0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")
        if self.commitment_cost < 0.0:
            raise ConfigError("commitment_cost", f"must be >= 0, got {self.commitment_cost}")
        if self.dead_code_threshold < 0.0:
            raise ConfigError("dead_code_threshold", f"must be >= 0, got {self.dead_code_threshold}")
        if self.restart_every < 1:
            raise ConfigError("restart_every", f"must be >= 1, got {self.restart_every}")
        check_backend(self.kernel_backend, "kernel_backend")


@dataclass
class QuantizerOutput:
    """What :meth:`EMAQuantizer.forward` returns."""

    quantized: torch.Tensor
    """``[B, D, H, W]`` fp32 codes, with a straight-through gradient to the input."""
    codes: torch.Tensor
    """``[B, H, W]`` int64 code indices."""
    commitment_loss: torch.Tensor
    """Scalar: ``commitment_cost * mse(z, sg(q))``; its gradient reaches only the encoder."""
    perplexity: torch.Tensor
    """Scalar: ``exp(entropy)`` of the code histogram of this batch (1 = one code, K = uniform)."""
    usage: torch.Tensor
    """Scalar: fraction of the K codes used at least once in this batch."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place across processes; a no-op in a single process."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def laplace_smoothed(sizes: torch.Tensor, eps: float) -> torch.Tensor:
    """Cluster sizes with add-eps smoothing, rescaled to keep their total: ``(n_k+eps)/(n+K*eps)*n``."""
    total = sizes.sum()
    return (sizes + eps) / (total + sizes.numel() * eps) * total


def _pick_rows(flat: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` rows of ``flat [N, D]``: distinct ones when ``N >= count``, else with repeats."""
    gen = torch.Generator(device=flat.device).manual_seed(seed)
    n = flat.shape[0]
    if n >= count:
        rows = torch.randperm(n, generator=gen, device=flat.device)[:count]
    else:
        rows = torch.randint(0, n, (count,), generator=gen, device=flat.device)
    return flat[rows]


class EMAQuantizer(nn.Module):
    """Vector quantizer with an exponential-moving-average codebook and dead-code restarts.

    Buffers (all in the state dict, all fp32 except the step counter):
        ``codebook [K, D]``, ``ema_cluster_size [K]``, ``ema_embed_sum [K, D]``, ``step []`` (int64,
        number of EMA updates so far; it schedules restarts, so they resume exactly). ``step`` is
        mirrored on the host for those decisions: set it through ``load_state_dict``.

    Example:
        >>> vq = EMAQuantizer(QuantizerConfig(num_codes=16, code_dim=4))
        >>> out = vq(torch.randn(2, 4, 8, 8))
        >>> out.quantized.shape, out.codes.shape
        (torch.Size([2, 4, 8, 8]), torch.Size([2, 8, 8]))
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        codebook = torch.randn(config.num_codes, config.code_dim)
        self.register_buffer("codebook", codebook)
        # Start every cluster at size 1 holding its own code, so the first EMA steps move unused
        # codes by at most a factor of ~1 (starting from size 0 would divide them by eps).
        self.register_buffer("ema_cluster_size", torch.ones(config.num_codes))
        self.register_buffer("ema_embed_sum", codebook.clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # Host copy of ``step`` for the init and restart decisions, so that a training step never
        # waits for the device to report its step count. None: read the buffer at the next use
        # (after construction, or after a state-dict load replaced the buffer).
        self._host_step: int | None = None

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None

    # The two decisions below read and advance a Python int. Under torch.compile they run
    # eagerly (a graph break) rather than being traced, where every new step value would
    # specialise the graph and force a recompile.
    @torch.compiler.disable
    def _steps_done(self) -> int:
        if self._host_step is None:
            self._host_step = int(self.step)
        return self._host_step

    @torch.compiler.disable
    def _count_step(self) -> bool:
        """Record one more EMA update; True when a dead-code restart is due after it."""
        self._host_step = self._steps_done() + 1
        return self.config.dead_code_threshold > 0 and self._host_step % self.config.restart_every == 0

    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantize ``z [B, D, H, W]`` to its nearest codes.

        Args:
            z: encoder output, any float dtype and memory format.
            update: whether to run the EMA step (and a due dead-code restart). Defaults to
                ``self.training``; pass ``False`` to quantize a training-mode model read-only.

        With ``update`` on and ``torch.distributed`` initialised this is a collective (all-reduce,
        and a broadcast at restart steps): every rank must call it, in the same order. Without
        ``update`` it communicates nothing, so rank-0-only evaluation is safe.
        """
        if z.dim() != 4 or z.shape[1] != self.config.code_dim:
            raise ValueError(f"expected z of shape [B, {self.config.code_dim}, H, W], got {list(z.shape)}")
        update = self.training if update is None else update
        # The codebook statistics are sums of thousands of vectors: keep them out of bf16/fp16.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z.float(), update)

    def _quantize(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        b, _, h, w = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")  # [N, D]
        if update and self.config.data_init and self._steps_done() == 0:
            self._init_from_data(flat.detach())
        idx, _ = nearest_code(flat.detach(), self.codebook, backend=self.config.kernel_backend)  # [N]
        # A fixed-size scatter rather than bincount, whose output size depends on the data (a graph
        # break under torch.compile). Exact in float32 up to 2^24 vectors per code.
        ones = torch.ones(idx.shape, device=idx.device)
        counts = torch.zeros(self.num_codes, device=idx.device).index_add_(0, idx, ones)  # [K], this process only

        # Look up before the EMA step: the vectors returned are the ones the search compared against.
        q = rearrange(F.embedding(idx, self.codebook), "(b h w) d -> b d h w", b=b, h=h, w=w)
        if update:
            self._ema_update(flat.detach(), idx, counts)

        commitment = self.config.commitment_cost * F.mse_loss(z, q.detach())
        quantized = z + (q - z).detach()  # straight-through: d quantized / d z = identity

        usage = (counts > 0).float().mean()
        return QuantizerOutput(
            quantized=quantized,
            codes=idx.view(b, h, w),
            commitment_loss=commitment,
            perplexity=perplexity(counts),
            usage=usage,
        )

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """One EMA step from this batch's assignments; statistics summed over all processes."""
        cfg = self.config
        # Per-code sums of assigned vectors without an [N, K] one-hot matrix.
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)  # [K, D]
        # One collective for both statistics: [K, D + 1].
        stats = _all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
        counts, sums = stats[:, 0], stats[:, 1:]

        self.ema_cluster_size.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        self.ema_embed_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        sizes = laplace_smoothed(self.ema_cluster_size, cfg.eps)
        self.codebook.copy_(self.ema_embed_sum / sizes[:, None])
        restart_due = self._count_step()
        self.step += 1
        if restart_due:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        """Every code becomes a distinct (where possible) row of ``flat``, with cluster size 1."""
        picks = _pick_rows(flat, self.num_codes, seed=0)
        self.codebook.copy_(picks)
        self.ema_embed_sum.copy_(picks)
        self.ema_cluster_size.fill_(1.0)
        self._broadcast_from_rank0()

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Move codes whose EMA cluster size fell below the threshold onto random encoder outputs.

        Every process calls this at the same step. Rank 0's choice wins: it is broadcast with the
        whole codebook state, which also keeps the ranks bit-identical.
        """
        cfg = self.config
        dead = self.ema_cluster_size < cfg.dead_code_threshold  # [K]
        num_dead = int(dead.sum())
        if num_dead > 0:
            # Seeded from the step count so a resumed run restarts the same way.
            picks = _pick_rows(flat, num_dead, seed=self._steps_done())  # [num_dead, D]
            # A fresh code starts at the threshold size, holding just the picked vector.
            self.codebook[dead] = picks
            self.ema_cluster_size[dead] = cfg.dead_code_threshold
            self.ema_embed_sum[dead] = picks * cfg.dead_code_threshold
        self._broadcast_from_rank0()

    def _broadcast_from_rank0(self) -> None:
        if _distributed():
            for buffer in (self.codebook, self.ema_cluster_size, self.ema_embed_sum):
                dist.broadcast(buffer, src=0)

    @torch.no_grad()
    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for ``codes [B, H, W]`` (int) as ``[B, D, H, W]`` fp32."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes of shape [B, H, W], got {list(codes.shape)}")
        return rearrange(F.embedding(codes.long(), self.codebook), "b h w d -> b d h w")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.config).items())
