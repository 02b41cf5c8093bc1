"""Benchmark: fused nearest-code search (Triton) vs matmul + argmin (eager and torch.compile).

Codebooks of K = 512 (VQ-VAE-2's size) and K = 8192, D = 64, N up to 64*64*128 vectors (a batch
of 128 bottom-level 64x64 maps). fp32 inputs under strict fp32 and under TF32 matmuls
(``torch.set_float32_matmul_precision("high")``, which the kernel follows too), and bf16 inputs.

    python benchmarks/bench_vq_search.py [--out BENCHMARKS.md] [--quick | --smoke]

Reports time (median and 20-80th percentile, ms), TFLOP/s of the distance products (2 N K D),
the fraction of the measured matmul ceiling for the operands' units, the speed-up over eager, and
the peak extra memory of each provider (the reference holds an N x K fp32 matrix), and the share
of indices equal to eager's (below 100% only on near-ties under bf16 or TF32 rounding).
"""

from __future__ import annotations

import torch

from ceilings import measure_ceilings
from common import Harness, Table, append_markdown, fmt, fp32_matmul_precision, speedup

D = 64
SIZES = [(32 * 32 * 128, 512), (64 * 64 * 128, 512), (32 * 32 * 128, 8192), (64 * 64 * 128, 8192)]  # (N, K)
QUICK_SIZES = [(64 * 64 * 128, 512), (64 * 64 * 128, 8192)]
SMOKE_SIZES = [(333, 77)]
# (input dtype, torch fp32 matmul precision)
VARIANTS = [(torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")]


def main() -> None:
    harness = Harness.start("bench_vq_search.py", __doc__.splitlines()[0])
    from vqgen.kernels.vq_search import nearest_code_reference, nearest_code_triton

    torch.manual_seed(0)
    ceilings = measure_ceilings(harness)
    columns = ["N", "K", "dtype", "provider", "ms (p20-p80)", "TFLOP/s", "% ceiling", "vs eager", "vs compile"]
    table = Table(harness.title(f"nearest_code, D = {D}"), columns + ["peak MiB", "% idx = eager"])
    compiled = harness.compile(nearest_code_reference)
    for n, k in harness.shapes(SIZES, QUICK_SIZES, SMOKE_SIZES):
        for dtype, precision in VARIANTS:
            x = torch.randn(n, D, device=harness.device).to(dtype)
            codebook = torch.randn(k, D, device=harness.device).to(dtype)
            providers = {
                "eager": lambda: nearest_code_reference(x, codebook),
                "compile": lambda: compiled(x, codebook),
                "triton": lambda: nearest_code_triton(x, codebook),
            }
            label = str(dtype).removeprefix("torch.") + (" (tf32)" if precision == "high" else "")
            ceiling = ceilings.tflops_for(dtype, precision)
            with fp32_matmul_precision(precision):
                outputs = harness.run_all(providers)
                timings = harness.bench_all(providers)
                for name, timing in timings.items():
                    same = None
                    if outputs[name] is not None and outputs["eager"] is not None:
                        same = 100 * (outputs[name][0] == outputs["eager"][0]).double().mean().item()
                        # Strict fp32 leaves only exact ties, which both break to the lowest index;
                        # under bf16 or TF32 rounding, near-ties may go either way.
                        strict = dtype == torch.float32 and precision == "highest"
                        harness.check(f"{name}, N {n}, K {k}, {label}", same > 99.9 or not strict,
                                      f"only {same:.2f}% of indices equal eager's")
                    tflops = 2 * n * k * D / (timing.median * 1e-3) / 1e12 if timing else None
                    pct = 100 * tflops / ceiling if tflops else None
                    peak = harness.peak_memory(providers[name])
                    peak_mib = peak / 2**20 if peak is not None else None
                    row = [n, k, label, name, fmt(timing, ""), fmt(tflops), fmt(pct)]
                    row += [speedup(timings["eager"], timing), speedup(timings["compile"], timing)]
                    row += [fmt(peak_mib, ".0f") if harness.device == "cuda" else "n/a", fmt(same, ".2f")]
                    table.add(*row)
            del x, codebook, outputs
    table.print()
    notes = [
        f"ceilings: bf16 {ceilings.bf16_tflops:.0f}, tf32 {ceilings.tf32_tflops:.0f}, "
        f"fp32 (FMA) {ceilings.fp32_tflops:.0f} TFLOP/s; % ceiling uses the one for the operands",
        f"torch.compile mode: {harness.compile_mode}",
        "peak MiB: memory allocated at the peak of one call beyond the inputs",
        "% idx = eager: share of rows whose code index equals eager PyTorch's",
    ]
    for note in notes:
        print(note)
    if harness.out:
        append_markdown(harness.out, "nearest_code (bench_vq_search.py)", [table], notes)


if __name__ == "__main__":
    main()
