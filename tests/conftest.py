"""Shared test settings: small thread counts (CI has 2 cores) and the optional shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_pipeline import INCEPTION_NOFC, SHARED_DATA, TinyPipeline

# Tiny models run faster on one thread than on two contending ones.
torch.set_num_threads(1)
# float32 on every CPU (`run.mixed_precision = "auto"` would pick bf16 on one with AVX512-BF16):
# the tests check the pipeline's logic, which must not depend on the CI machine's CPU, and one
# process keeps one precision (Accelerate's state allows no other). Subprocesses inherit it.
os.environ.setdefault("VQGEN_CPU_BF16", "0")



def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: the cores this process may run on. pytest-xdist would count the host's cores
    (psutil), which in a container limited to 2 of 64 starts 64 workers."""
    return len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("single_thread")``): they
    run fastest on one thread; two threads spin badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def all_cores():
    """For modules of large models (Inception at 299x299): this process's share of the cores. Under
    pytest-xdist the workers split them; more threads than cores would spin against each other."""
    threads = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """The folder of real test data (Fashion-MNIST, CIFAR-10 subset, Inception weights), if present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set VQGEN_TEST_DATA)")
    return SHARED_DATA


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of tensor values back to Python (``int(t)``, ``t.item()``, ``bool(t)``): on a
    GPU each one makes the CPU wait until the GPU has caught up."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads() -> type[HostReads]:
    """``with host_reads() as reads: ...; reads.count``."""
    return HostReads


@pytest.fixture
def tiny_pipeline(tmp_path, shared_data) -> TinyPipeline:
    """``tiny_pipeline("run")`` runs the tiny pipeline in ``tmp_path`` and returns its output."""
    return TinyPipeline(tmp_path, shared_data / INCEPTION_NOFC)
