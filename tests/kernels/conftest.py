"""Kernel tests: the Triton kernels run on CUDA when there is a GPU, in Triton's CPU interpreter
otherwise.

The interpreter is switched on per test (``monkeypatch.setenv``), not for the whole process: the
kernels read ``TRITON_INTERPRET`` when they launch, and nothing outside Triton reads it on a CPU
(inductor only consults it for the Triton kernels it generates for GPUs), so other tests in the
same pytest run see the environment they started with.
"""

import importlib.util

import numpy as np
import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def interpreter_breaks_on_this_numpy() -> bool:
    """Triton 3.6's interpreter reads a loop bound with ``int()`` of a one-element array, which
    NumPy 2.4 turned from a deprecation into a TypeError; Triton 3.8 squeezes it first. (3.7 is
    not checked, so it counts as affected.) Compiled kernels are not concerned.
    """
    import triton

    return _version(triton.__version__) < (3, 8) and _version(np.__version__) >= (2, 4)


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Device to run Triton kernels on: "cuda", or "cpu" with the interpreter on for this test."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if interpreter_breaks_on_this_numpy():
        pytest.skip("Triton < 3.8's interpreter fails under NumPy >= 2.4; use Triton >= 3.8 or NumPy < 2.4")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture
def no_interpreter(monkeypatch) -> None:
    """Make sure the interpreter is off, whatever the caller's environment says."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def compile_for_gpu(monkeypatch, tmp_path):
    """Compile a kernel ahead of time for an sm_90 (Hopper) GPU, which needs no GPU present.

    The interpreter checks a kernel's arithmetic but not that the compiler accepts it; this checks
    the other half. Returns ``compile(fn, signature, constexprs, **options) -> CompiledKernel``.
    """
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import triton
    import triton.backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton was built without its NVIDIA backend")
    if not isinstance(triton.language.standard._sum_combine, JITFunction):
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its own helpers cannot compile here")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # no writes to the user's cache
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def compile_kernel(fn, signature: dict, constexprs: dict, **options):
        source = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    return compile_kernel
