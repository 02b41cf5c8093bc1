"""Benchmark: fused nearest-code search (Triton) vs matmul + argmin (eager and torch.compile).

Codebooks of K = 512 (VQ-VAE-2's size) and K = 8192, D = 64, N up to 64*64*128 vectors (a batch
of 128 bottom-level 64x64 maps). fp32 inputs under strict fp32 and under TF32 matmuls
(``torch.set_float32_matmul_precision("high")``, which the kernel follows too), and bf16 inputs.

    python benchmarks/bench_vq_search.py [--out BENCHMARKS.md]

Reports time (median and 20-80th percentile, ms), TFLOP/s of the distance products (2 N K D),
the fraction of the measured matmul ceiling for the operands' units, the speed-up over eager, and
the peak extra memory of each provider (the reference holds an N x K fp32 matrix).
"""

from __future__ import annotations

import torch

from ceilings import measure_ceilings
from common import Table, append_markdown, bench_all, compile_reference, fmt, fp32_matmul_precision, parse_args
from common import peak_memory, require_gpu, speedup

D = 64
SIZES = [(32 * 32 * 128, 512), (64 * 64 * 128, 512), (32 * 32 * 128, 8192), (64 * 64 * 128, 8192)]  # (N, K)
# (input dtype, torch fp32 matmul precision)
VARIANTS = [(torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")]


def main() -> None:
    require_gpu("bench_vq_search.py")
    args = parse_args(__doc__.splitlines()[0])
    from vqgen.kernels.vq_search import nearest_code_reference, nearest_code_triton

    torch.manual_seed(0)
    ceilings = measure_ceilings()
    columns = ["N", "K", "dtype", "provider", "ms (p20-p80)", "TFLOP/s", "% ceiling", "vs eager", "vs compile"]
    table = Table(f"nearest_code, D = {D}", columns + ["peak MiB"])
    compiled = compile_reference(nearest_code_reference, args.compile_mode)
    for n, k in SIZES:
        for dtype, precision in VARIANTS:
            x = torch.randn(n, D, device="cuda").to(dtype)
            codebook = torch.randn(k, D, device="cuda").to(dtype)
            providers = {
                "eager": lambda: nearest_code_reference(x, codebook),
                "compile": lambda: compiled(x, codebook),
                "triton": lambda: nearest_code_triton(x, codebook),
            }
            label = str(dtype).removeprefix("torch.") + (" (tf32)" if precision == "high" else "")
            ceiling = ceilings.tflops_for(dtype, precision)
            with fp32_matmul_precision(precision):
                timings = bench_all(providers)
                for name, timing in timings.items():
                    tflops = 2 * n * k * D / (timing.median * 1e-3) / 1e12 if timing else None
                    pct = 100 * tflops / ceiling if tflops else None
                    peak = peak_memory(providers[name])
                    peak_mib = peak / 2**20 if peak is not None else None
                    row = [n, k, label, name, fmt(timing, ""), fmt(tflops), fmt(pct)]
                    row += [speedup(timings["eager"], timing), speedup(timings["compile"], timing)]
                    table.add(*row, fmt(peak_mib, ".0f"))
            del x, codebook
    table.print()
    notes = [
        f"ceilings: bf16 {ceilings.bf16_tflops:.0f}, tf32 {ceilings.tf32_tflops:.0f}, "
        f"fp32 (FMA) {ceilings.fp32_tflops:.0f} TFLOP/s; % ceiling uses the one for the operands",
        f"torch.compile mode: {args.compile_mode}",
        "peak MiB: memory allocated at the peak of one call beyond the inputs",
    ]
    for note in notes:
        print(note)
    if args.out:
        append_markdown(args.out, "nearest_code (bench_vq_search.py)", [table], notes)


if __name__ == "__main__":
    main()
