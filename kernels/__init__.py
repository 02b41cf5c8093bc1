"""Fused kernels for vqgen. Each module holds a Triton kernel, its PyTorch reference and a dispatch.

Dispatch convention: every public op takes ``backend: Backend = "auto"``. ``"auto"`` uses Triton for
CUDA tensors when Triton is importable and the kernel supports the inputs, and the PyTorch
reference otherwise; ``"triton"`` forces the kernel (on CPU only under ``TRITON_INTERPRET=1``),
``"torch"`` forces the reference.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from vqgen.errors import ConfigError

Backend = Literal["auto", "triton", "torch"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read at launch, like Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(backend: Backend, x: torch.Tensor, supported: bool = True) -> bool:
    """Resolve the dispatch for an op on ``x``; ``supported``: the kernel handles these inputs."""
    if backend == "torch":
        return False
    if backend == "auto":
        return triton_available() and x.is_cuda and supported
    if backend == "triton":
        if not triton_available():
            raise ConfigError("backend", "'triton' requested but Triton is not installed")
        if not (x.is_cuda or interpreting()):
            raise ConfigError("backend", "'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on a CPU)")
        return True
    raise ConfigError("backend", f"expected 'auto', 'triton' or 'torch', got {backend!r}")
