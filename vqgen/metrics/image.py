"""Cheap per-image and per-code metrics: reconstruction PSNR, bits per dimension, codebook usage."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vqgen.errors import DataError


def psnr(x: Tensor, y: Tensor, data_range: float) -> tuple[Tensor, float]:
    """Peak signal-to-noise ratio of each image pair, and its mean over the batch.

    ``x`` and ``y`` are ``[N, ...]`` images of the same shape: floats in [-1, 1] take
    ``data_range=2``, uint8 images take ``data_range=255``. Returns ``(per_image [N] float64,
    mean)``. The mean is over per-image PSNRs (the usual reconstruction metric), not the PSNR of the
    pooled MSE. A pair of identical images has infinite PSNR.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"psnr: expected a batch [N, ...], got shape {tuple(x.shape)}")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    # float64 so that uint8 differences don't wrap and tiny errors keep their precision.
    diff = x.detach().double() - y.detach().double()
    mse = diff.flatten(1).square().mean(dim=1)  # [N]
    per_image = 10.0 * torch.log10(data_range**2 / mse)
    return per_image, per_image.mean().item()


def bits_per_dim(nll_nats: float | Tensor, num_dims: int = 1) -> float | Tensor:
    """Convert a negative log-likelihood in nats to bits per dimension.

    ``nll_nats`` is the NLL of ``num_dims`` dimensions together; pass the mean cross-entropy per
    position (what a prior's loss is) with ``num_dims=1``. A tensor stays a tensor on its device
    (a training step logs it without waiting for the GPU); a number gives a float.
    """
    if num_dims < 1:
        raise ValueError(f"bits_per_dim: num_dims must be >= 1, got {num_dims}")
    return nll_nats / (num_dims * math.log(2.0))


def codebook_usage(codes: Tensor, num_codes: int) -> tuple[float, float]:
    """Fraction of the codebook that occurs in ``codes``, and the perplexity of the code histogram.

    ``codes`` holds integer code indices of any shape. Perplexity is ``exp(entropy)`` of the
    empirical code distribution: ``num_codes`` when every code is equally used, 1 when one code is.
    """
    if num_codes < 1:
        raise ValueError(f"codebook_usage: num_codes must be >= 1, got {num_codes}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise DataError(f"codebook_usage: codes must be integers, got dtype {codes.dtype}")
    flat = codes.detach().flatten().long().cpu()
    if flat.numel() == 0:
        raise DataError("codebook_usage: no codes given")
    low, high = flat.min().item(), flat.max().item()
    if low < 0 or high >= num_codes:
        raise DataError(f"codebook_usage: code {low if low < 0 else high} is outside [0, {num_codes})")
    return usage_from_counts(torch.bincount(flat, minlength=num_codes))


def perplexity(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of a code histogram ``counts [K]``: the number of equally used codes with the
    same entropy. A 0-dim tensor in ``counts``' dtype, on its device: no read back to the host and no
    data-dependent shape, so a compiled training step can compute it every step."""
    probs = counts / counts.sum().clamp_min(1)
    return (-(probs * probs.clamp_min(1e-30).log()).sum()).exp()


def usage_from_counts(counts: Tensor) -> tuple[float, float]:
    """Fraction of codes used and perplexity of a code histogram ``counts [K]``."""
    counts = counts.double()
    return (counts > 0).double().mean().item(), perplexity(counts).item()
