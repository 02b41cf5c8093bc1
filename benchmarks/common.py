"""Shared pieces of the kernel benchmarks: the GPU check, timing, peak memory, and result tables.

Timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) and reports the
median with the 20th and 80th percentiles. Tables print to stdout; ``--out FILE`` appends them as
markdown under a heading naming the GPU, the date and the library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

QUANTILES = [0.5, 0.2, 0.8]


def require_gpu(script: str) -> None:
    """Exit with a clear message unless a CUDA GPU and Triton are available."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU, and none is visible to torch; nothing was measured.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit(f"{script}: needs Triton (pip install triton); nothing was measured.")


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", help="append the results as markdown to this file")
    parser.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode for the compiled reference (default: %(default)s)",
    )
    return parser.parse_args()


@dataclass
class Timing:
    """Milliseconds: median, 20th and 80th percentile."""

    median: float
    p20: float
    p80: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.p20:.3f}-{self.p80:.3f})"


def bench(fn: Callable[[], object]) -> Timing | None:
    """Time ``fn`` on the GPU; None if it runs out of memory."""
    from triton.testing import do_bench

    try:
        median, p20, p80 = do_bench(fn, quantiles=QUANTILES)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return Timing(median, p20, p80)


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Bytes ``fn`` allocates at its peak beyond what was allocated before; None if out of memory."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        fn()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return torch.cuda.max_memory_allocated() - before


@contextlib.contextmanager
def fp32_matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision`` for a block: "highest" (strict fp32) or "high" (TF32).

    The Triton kernels follow the same setting, so eager, compiled and Triton compare like for like.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def compile_reference(fn: Callable, mode: str) -> Callable:
    """``torch.compile`` of a reference, shapes static (each benchmark shape compiles once)."""
    import torch._dynamo

    # One compiled entry per benchmark shape and dtype; past the default limit of 8, dynamo would
    # silently run the rest eagerly and the "compile" rows would measure eager PyTorch.
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(fn, mode=mode, dynamic=False)


def bench_all(providers: dict[str, Callable[[], object]]) -> dict[str, Timing | None]:
    """Time every provider, in order."""
    return {name: bench(fn) for name, fn in providers.items()}


def fmt(value: object | None, spec: str = ".1f", unit: str = "") -> str:
    """A table cell; None means the run did not fit in memory."""
    return "OOM" if value is None else f"{value:{spec}}{unit}"


def speedup(baseline: Timing | None, timing: Timing | None) -> str:
    """``baseline / timing`` as "1.23x"; "n/a" when either is missing."""
    if baseline is None or timing is None:
        return "n/a"
    return f"{baseline.median / timing.median:.2f}x"


class Table:
    """Rows of equal keys, printed aligned and written as a markdown table."""

    def __init__(self, title: str, columns: list[str]):
        self.title = title
        self.columns = columns
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        assert len(cells) == len(self.columns), "one cell per column"
        self.rows.append([str(c) for c in cells])

    def print(self) -> None:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        print(f"\n{self.title}")
        print("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        for row in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)), flush=True)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def environment_line() -> str:
    import triton

    gpu = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    return f"{gpu}, {today}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"


def append_markdown(path: str, heading: str, tables: list[Table], notes: list[str]) -> None:
    """Append ``tables`` to ``path`` under ``### heading`` with the GPU, date and versions."""
    parts = [f"\n### {heading}\n", f"{environment_line()}\n"]
    parts += [f"- {note}" for note in notes]
    parts.append("")
    parts += [table.markdown() for table in tables]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(parts))
    print(f"\nappended to {path}")
