"""Benchmark: strictly causal attention, shifted keys + fused SDPA vs the explicit-mask alternatives.

The top prior's attention: a 32x32 map (L = 1024), 8 heads, 512 channels (d = 64), batch 32-128,
bf16, forward. Providers:
- ``shifted-sdpa``: :func:`strictly_causal_attention` (flash or cuDNN through ``is_causal=True``);
- ``masked-sdpa``: SDPA over ``[start, k]`` with a boolean ``[L, L + 1]`` mask (what one writes without
  the shift; the mask rules out flash attention);
- ``eager`` / ``compile``: the explicit-mask reference, eager and under ``torch.compile``.

    python benchmarks/bench_attention.py [--out BENCHMARKS.md]

Reports time (median and 20-80th percentile, ms), TFLOP/s (4 B h L^2 d / 2: causal half of the two
matmuls), the fraction of the measured bf16 matmul ceiling, the speed-up over eager, and which fused
SDPA kernel accepts the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ceilings import measure_ceilings
from common import Table, append_markdown, bench_all, compile_reference, fmt, parse_args, require_gpu, speedup

HEADS, LENGTH, DIM = 8, 32 * 32, 64
BATCHES = [32, 64, 128]


def _masked_sdpa(q, k, v, start_k, start_v):
    """Strict causality by an explicit mask over ``[start, k_0 .. k_{L-1}]``."""
    batch, heads, length, _ = q.shape
    keys = torch.cat([start_k.expand(batch, heads, 1, -1), k], dim=2)
    values = torch.cat([start_v.expand(batch, heads, 1, -1), v], dim=2)
    # Query p may see key slot j iff j <= p (slot 0 is the start, slot i + 1 is position i).
    allowed = torch.ones(length, length + 1, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)


def main() -> None:
    require_gpu("bench_attention.py")
    args = parse_args(__doc__.splitlines()[0])
    from vqgen.kernels.causal_attention import (
        fused_attention_backend,
        strictly_causal_attention,
        strictly_causal_attention_reference,
    )

    torch.manual_seed(0)
    ceilings = measure_ceilings()
    columns = ["B", "provider", "ms (p20-p80)", "TFLOP/s", "% bf16 ceiling", "vs eager", "vs compile"]
    table = Table(f"strictly causal attention, bf16, heads {HEADS}, L {LENGTH}, d {DIM}", columns)
    compiled = compile_reference(strictly_causal_attention_reference, args.compile_mode)
    fused = None
    for batch in BATCHES:
        q, k, v = (torch.randn(batch, HEADS, LENGTH, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        start_k, start_v = (torch.randn(HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        fused = fused_attention_backend(q, k, v)
        timings = bench_all(
            {
                "eager": lambda: strictly_causal_attention_reference(q, k, v, start_k, start_v),
                "compile": lambda: compiled(q, k, v, start_k, start_v),
                "masked-sdpa": lambda: _masked_sdpa(q, k, v, start_k[None, :, None], start_v[None, :, None]),
                "shifted-sdpa": lambda: strictly_causal_attention(q, k, v, start_k, start_v),
            }
        )
        flops = 4 * batch * HEADS * LENGTH * LENGTH * DIM / 2
        for name, timing in timings.items():
            tflops = flops / (timing.median * 1e-3) / 1e12 if timing else None
            pct = 100 * tflops / ceilings.bf16_tflops if tflops else None
            row = [batch, name, fmt(timing, ""), fmt(tflops), fmt(pct)]
            table.add(*row, speedup(timings["eager"], timing), speedup(timings["compile"], timing))
        del q, k, v
    table.print()
    notes = [
        f"fused SDPA kernel accepting these inputs: {fused or 'none (math fallback)'}",
        f"ceiling: bf16 matmul {ceilings.bf16_tflops:.0f} TFLOP/s; torch.compile mode: {args.compile_mode}",
    ]
    for note in notes:
        print(note)
    if args.out:
        append_markdown(args.out, "strictly causal attention (bench_attention.py)", [table], notes)


if __name__ == "__main__":
    main()
