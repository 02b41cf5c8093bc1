"""Benchmark: fused gated-unit epilogue (Triton) vs eager PyTorch vs torch.compile of the reference.

Shapes are PixelCNN layers: channels 128-512, maps 8x8 to 64x64, batches 32-512, with the
conditioning bias, projection bias and residual all present (the prior's common case). Forward only:
the backward is PyTorch on every path.

    python benchmarks/bench_gated.py [--out BENCHMARKS.md]

Reports time (median and 20-80th percentile, ms), effective bandwidth (the bytes the fused kernel
must move, divided by time, for every provider), TFLOP/s of the projection, the fraction of the
measured copy-bandwidth ceiling, and the speed-up of Triton over eager and over compile.
"""

from __future__ import annotations

import torch

from ceilings import measure_ceilings
from common import Table, append_markdown, bench_all, compile_reference, fmt, fp32_matmul_precision, parse_args
from common import require_gpu, speedup

# (batch, map side, channels): top-prior-like small maps with wide layers, bottom-prior-like large maps.
SHAPES = [
    (32, 64, 128),
    (128, 64, 128),
    (128, 32, 256),
    (64, 64, 256),
    (256, 16, 512),
    (512, 8, 512),
    (128, 32, 512),
]
DTYPES = [torch.bfloat16, torch.float32]


def _inputs(m: int, c: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dtype)

    return {
        "pre": rand(m, 2 * c),
        "cond": rand(m, 2 * c),
        "weight": rand(c, c, scale=c**-0.5),
        "bias": rand(c),
        "residual": rand(m, c),
    }


def _fused_bytes(m: int, c: int, dtype: torch.dtype) -> int:
    # Read pre and cond (2 * 2C), residual (C) and the weight; write gated (C) and out (C).
    return (m * (2 * 2 * c + 3 * c) + c * c + c) * dtype.itemsize


def main() -> None:
    require_gpu("bench_gated.py")
    args = parse_args(__doc__.splitlines()[0])
    from vqgen.kernels.gated import gated_residual_reference, gated_residual_triton

    torch.manual_seed(0)
    ceilings = measure_ceilings()
    columns = ["B", "map", "C", "dtype", "provider", "ms (p20-p80)", "GB/s", "TFLOP/s", "% BW ceiling"]
    table = Table("gated_residual forward", columns + ["vs eager", "vs compile"])
    compiled = compile_reference(gated_residual_reference, args.compile_mode)
    with fp32_matmul_precision("highest"):
        for batch, side, c in SHAPES:
            m = batch * side * side
            for dtype in DTYPES:
                x = _inputs(m, c, dtype)
                timings = bench_all(
                    {
                        "eager": lambda: gated_residual_reference(**x),
                        "compile": lambda: compiled(**x),
                        "triton": lambda: gated_residual_triton(**x),
                    }
                )
                for name, timing in timings.items():
                    seconds = timing.median * 1e-3 if timing else None
                    gbs = _fused_bytes(m, c, dtype) / seconds / 1e9 if seconds else None
                    tflops = 2 * m * c * c / seconds / 1e12 if seconds else None
                    pct = 100 * gbs / ceilings.bandwidth_gbs if gbs else None
                    row = [batch, f"{side}x{side}", c, str(dtype).removeprefix("torch."), name, fmt(timing, "")]
                    row += [fmt(gbs, ".0f"), fmt(tflops), fmt(pct)]
                    table.add(*row, speedup(timings["eager"], timing), speedup(timings["compile"], timing))
                del x
    table.print()
    notes = [
        f"ceilings: copy {ceilings.bandwidth_gbs:.0f} GB/s, bf16 matmul {ceilings.bf16_tflops:.0f} TFLOP/s",
        f"torch.compile mode: {args.compile_mode}; fp32 matmul precision: highest (no TF32)",
        "GB/s counts the bytes the fused kernel must move (pre, cond, residual, weight in; out, gated out)",
    ]
    for note in notes:
        print(note)
    if args.out:
        append_markdown(args.out, "gated_residual (bench_gated.py)", [table], notes)


if __name__ == "__main__":
    main()
