"""Benchmark: fused gated-unit epilogue (Triton) vs eager PyTorch vs torch.compile of the reference.

Shapes are PixelCNN layers: channels 128-512, maps 8x8 to 64x64, batches 32-512, with the
conditioning bias, projection bias and residual all present (the prior's common case). Forward only:
the backward is PyTorch on every path.

    python benchmarks/bench_gated.py [--out BENCHMARKS.md] [--quick | --smoke]

Reports time (median and 20-80th percentile, ms), effective bandwidth (the bytes the fused kernel
must move, divided by time, for every provider), TFLOP/s of the projection, the fraction of the
measured copy-bandwidth ceiling, the speed-up of Triton over eager and over compile, and each
provider's largest difference from eager on the same inputs.
"""

from __future__ import annotations

import torch

from ceilings import measure_ceilings
from common import Harness, Table, append_markdown, fmt, fp32_matmul_precision, speedup

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
QUICK_SHAPES = [(32, 64, 128), (128, 32, 256), (512, 8, 512)]  # one per channel width
SMOKE_SHAPES = [(2, 3, 24)]  # odd sizes: partial tiles
DTYPES = [torch.bfloat16, torch.float32]
# Largest difference from eager accepted: bf16 rounds the gated product and the projection's inputs.
TOLERANCE = {torch.bfloat16: 0.1, torch.float32: 1e-3}


def _inputs(m: int, c: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

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
    harness = Harness.start("bench_gated.py", __doc__.splitlines()[0])
    from vqgen.kernels.gated import gated_residual_reference, gated_residual_triton

    torch.manual_seed(0)
    ceilings = measure_ceilings(harness)
    columns = ["B", "map", "C", "dtype", "provider", "ms (p20-p80)", "GB/s", "TFLOP/s", "% BW ceiling"]
    table = Table(harness.title("gated_residual forward"), columns + ["vs eager", "vs compile", "max |diff|"])
    compiled = harness.compile(gated_residual_reference)
    with fp32_matmul_precision("highest"):
        for batch, side, c in harness.shapes(SHAPES, QUICK_SHAPES, SMOKE_SHAPES):
            m = batch * side * side
            for dtype in DTYPES:
                x = _inputs(m, c, dtype, harness.device)
                providers = {
                    "eager": lambda: gated_residual_reference(**x),
                    "compile": lambda: compiled(**x),
                    "triton": lambda: gated_residual_triton(**x),
                }
                outputs = harness.run_all(providers)
                timings = harness.bench_all(providers)
                label = str(dtype).removeprefix("torch.")
                for name, timing in timings.items():
                    what = f"{name}, B {batch}, {side}x{side}, C {c}, {label}"
                    diff = harness.diff_from_eager(what, outputs, name, TOLERANCE[dtype])
                    seconds = timing.median * 1e-3 if timing else None
                    gbs = _fused_bytes(m, c, dtype) / seconds / 1e9 if seconds else None
                    tflops = 2 * m * c * c / seconds / 1e12 if seconds else None
                    pct = 100 * gbs / ceilings.bandwidth_gbs if gbs else None
                    row = [batch, f"{side}x{side}", c, label, name, fmt(timing, "")]
                    row += [fmt(gbs, ".0f"), fmt(tflops), fmt(pct)]
                    row += [speedup(timings["eager"], timing), speedup(timings["compile"], timing), fmt(diff, ".2g")]
                    table.add(*row)
                del x, outputs
    table.print()
    notes = [
        f"ceilings: copy {ceilings.bandwidth_gbs:.0f} GB/s, bf16 matmul {ceilings.bf16_tflops:.0f} TFLOP/s",
        f"torch.compile mode: {harness.compile_mode}; fp32 matmul precision: highest (no TF32)",
        "GB/s counts the bytes the fused kernel must move (pre, cond, residual, weight in; out, gated out)",
        "max |diff|: largest difference from eager PyTorch's output on the same inputs",
    ]
    for note in notes:
        print(note)
    if harness.out:
        append_markdown(harness.out, "gated_residual (bench_gated.py)", [table], notes)


if __name__ == "__main__":
    main()
