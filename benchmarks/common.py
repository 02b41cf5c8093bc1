"""Shared pieces of the kernel benchmarks: the GPU check, timing, peak memory, and result tables.

Timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) and reports the
median with the 20th and 80th percentiles. Tables print to stdout; ``--out FILE`` appends them as
markdown under a heading naming the GPU, the date and the library versions.

``--smoke`` runs a script end to end at tiny shapes on whatever device is present (on a CPU, the
Triton kernels through Triton's interpreter and ``torch.compile`` through the ``aot_eager``
backend), each provider once, and fails if a provider disagrees with eager PyTorch. It checks the
script, not the speed: its times are single wall-clock calls and it refuses ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

QUANTILES = [0.5, 0.2, 0.8]


def require_gpu(script: str) -> None:
    """Exit with a clear message unless a CUDA GPU and Triton are available."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU, and none is visible to torch; nothing was measured "
                 "(--smoke checks the script on a CPU).")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit(f"{script}: needs Triton (pip install triton); nothing was measured.")


def parse_args(
    description: str, argv: Sequence[str] | None = None, flags: dict[str, str] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("--out", help="append the results as markdown to this file")
    parser.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode for the compiled reference (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset of the shapes, for time-limited runs")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, any device, one call per provider: checks the script, measures nothing")
    return parser.parse_args(argv)


@dataclass
class Timing:
    """Milliseconds: median, 20th and 80th percentile."""

    median: float
    p20: float
    p80: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.p20:.3f}-{self.p80:.3f})"


@dataclass
class Harness:
    """Where and how a benchmark script runs: on the GPU and timed, or as a smoke check."""

    device: str
    args: argparse.Namespace  # the parsed command line: --smoke, --quick, --compile-mode, --out, the script's flags

    @property
    def smoke(self) -> bool:
        return self.args.smoke

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def compile_mode(self) -> str:
        return self.args.compile_mode

    @property
    def out(self) -> str | None:
        return self.args.out

    @classmethod
    def start(cls, script: str, description: str, argv: Sequence[str] | None = None,
              flags: dict[str, str] | None = None) -> "Harness":
        """Parse the command line (with the script's own boolean ``flags``: name -> help); without
        ``--smoke``, exit unless a GPU and Triton are present."""
        args = parse_args(description, argv, flags)
        if not args.smoke:
            require_gpu(script)
            return cls("cuda", args)
        if args.out:
            sys.exit(f"{script}: --smoke measures nothing, so it writes no --out file.")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            # Read by Triton when a kernel launches; set before the kernels' modules are imported.
            os.environ["TRITON_INTERPRET"] = "1"
        return cls(device, args)

    def shapes(self, full: list, quick: list, smoke: list) -> list:
        """The shape list this run covers."""
        return smoke if self.smoke else quick if self.quick else full

    def title(self, text: str) -> str:
        """A table title; a smoke run's says its times measure nothing."""
        return f"{text} [smoke run on {self.device}: single calls, not measurements]" if self.smoke else text

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def bench(self, fn: Callable[[], object]) -> Timing | None:
        """Time ``fn``; None if it runs out of GPU memory. A smoke run times one call."""
        if self.smoke:
            start = time.perf_counter()
            fn()
            self.synchronize()
            ms = (time.perf_counter() - start) * 1e3
            return Timing(ms, ms, ms)
        from triton.testing import do_bench

        try:
            median, p20, p80 = do_bench(fn, quantiles=QUANTILES)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        return Timing(median, p20, p80)

    def bench_all(self, providers: dict[str, Callable[[], object]]) -> dict[str, Timing | None]:
        """Time every provider, in order."""
        return {name: self.bench(fn) for name, fn in providers.items()}

    def run_all(self, providers: dict[str, Callable[[], object]]) -> dict[str, object | None]:
        """Each provider's output (None if out of memory); also the warm-up and compile call."""
        outputs = {}
        for name, fn in providers.items():
            try:
                outputs[name] = fn()
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                outputs[name] = None
        return outputs

    def peak_memory(self, fn: Callable[[], object]) -> int | None:
        """Bytes ``fn`` allocates at its peak beyond what was allocated before; None if out of
        memory or not on a GPU."""
        if self.device != "cuda":
            return None
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

    def compile(self, fn: Callable) -> Callable:
        """``torch.compile`` of a reference, shapes static (each benchmark shape compiles once).

        A smoke run on a CPU traces with ``aot_eager``, which needs no C++ toolchain.
        """
        import torch._dynamo

        # One compiled entry per benchmark shape and dtype; past the default limit of 8, dynamo would
        # silently run the rest eagerly and the "compile" rows would measure eager PyTorch.
        torch._dynamo.config.recompile_limit = 64
        if self.smoke and self.device == "cpu":
            return torch.compile(fn, backend="aot_eager", dynamic=False)
        return torch.compile(fn, mode=self.compile_mode, dynamic=False)

    def diff_from_eager(self, what: str, outputs: dict, name: str, tolerance: float) -> float | None:
        """Provider ``name``'s largest absolute difference from eager's output (None if either ran
        out of memory), checked against ``tolerance``."""
        if outputs[name] is None or outputs["eager"] is None:
            return None
        diff = max_abs_diff(outputs[name], outputs["eager"])
        self.check(what, diff <= tolerance, f"differs from eager by {diff:.3g}")
        return diff

    def check(self, what: str, ok: bool, detail: str) -> None:
        """A provider that disagrees with eager fails a smoke run and is flagged in a timed one."""
        if ok:
            return
        message = f"{what}: {detail}"
        if self.smoke:
            raise SystemExit(f"smoke check failed: {message}")
        print(f"WARNING: {message}", flush=True)


def max_abs_diff(output: object, reference: object) -> float:
    """Largest absolute difference over a tensor or a tuple of tensors, in float32."""
    if isinstance(output, torch.Tensor):
        return (output.float() - reference.float()).abs().max().item()
    return max(max_abs_diff(o, r) for o, r in zip(output, reference))


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

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
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
