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
BACKENDS: tuple[Backend, ...] = ("auto", "triton", "torch")


def check_backend(backend: str, key: str = "backend") -> Backend:
    """``backend`` if it is one of :data:`BACKENDS`; else a ConfigError naming ``key``."""
    if backend not in BACKENDS:
        raise ConfigError(key, f"must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read at launch, like Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@torch.compiler.assume_constant_result
def _fp32_matmuls_use_tf32() -> bool:
    # torch.compile cannot trace this getter (it returns a str), so it reads it once while tracing;
    # the compiled code stays right because dynamo re-traces when the TF32 switch changes (it is
    # part of the global state every compiled graph is guarded on).
    return torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: fp32 follows torch's fp32 matmul
    setting (``torch.set_float32_matmul_precision``), so a kernel rounds like its PyTorch
    reference's matmul; other dtypes ignore it."""
    return "tf32" if dtype == torch.float32 and _fp32_matmuls_use_tf32() else "ieee"


def use_triton(backend: Backend, x: torch.Tensor, supported: bool = True) -> bool:
    """Resolve the dispatch for an op on ``x``; ``supported``: the kernel handles these inputs."""
    check_backend(backend)
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


def build_triton_kernels(fn, *, configs: list, key: list[str]) -> dict[bool, object]:
    """``{False: compiled, True: interpreted}`` Triton kernel objects for the kernel function ``fn``;
    the compiled one autotuned over ``configs``, re-tuned when the arguments named in ``key`` change.

    Both are built once, at import, from Triton's own classes rather than by ``triton.jit``: that
    decorator picks one of the two by ``TRITON_INTERPRET`` when it runs, so decorating at import
    would freeze the environment of the first import, and decorating at the first launch puts the
    decorator inside code that torch.compile traces, where it reads the switch through a C function
    and splits the graph at every kernel call.
    """
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return {False: triton.autotune(configs=configs, key=key)(JITFunction(fn)), True: InterpretedFunction(fn)}
