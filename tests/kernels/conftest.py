"""Kernel tests: the Triton kernels run on CUDA when there is a GPU, in Triton's CPU interpreter
otherwise.

The interpreter is switched on per test (``monkeypatch.setenv``), not for the whole process: the
kernels read ``TRITON_INTERPRET`` when they launch, and nothing outside Triton reads it on a CPU
(inductor only consults it for the Triton kernels it generates for GPUs), so other tests in the
same pytest run see the environment they started with.
"""

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Device to run Triton kernels on: "cuda", or "cpu" with the interpreter on for this test."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
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
