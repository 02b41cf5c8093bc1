"""Fused kernels for vqgen. Each module holds a Triton kernel, its PyTorch reference and a dispatch.

Dispatch convention: every public op takes ``backend: Backend = "auto"``. ``"auto"`` uses Triton for
CUDA tensors when Triton is importable and the PyTorch reference otherwise; ``"triton"`` forces the
kernel (on CPU only under ``TRITON_INTERPRET=1``), ``"torch"`` forces the reference.
"""

from typing import Literal

Backend = Literal["auto", "triton", "torch"]
