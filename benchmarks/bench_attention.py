"""Benchmark: strictly causal attention, shifted keys + fused SDPA vs the explicit-mask alternatives.

The top prior's attention: a 32x32 map (L = 1024), 8 heads, 512 channels (d = 64), batch 32-128,
bf16, forward. Providers:
- ``shifted-sdpa``: :func:`strictly_causal_attention` (flash or cuDNN through ``is_causal=True``);
- ``masked-sdpa``: SDPA over ``[start, k]`` with a boolean ``[L, L + 1]`` mask (what one writes without
  the shift; the mask rules out flash attention);
- ``eager`` / ``compile``: the explicit-mask reference, eager and under ``torch.compile``.

    python benchmarks/bench_attention.py [--out BENCHMARKS.md] [--quick | --smoke]

Reports time (median and 20-80th percentile, ms), TFLOP/s (4 B h L^2 d / 2: causal half of the two
matmuls), the fraction of the measured bf16 matmul ceiling, the speed-up over eager, each provider's
largest difference from eager, and which fused SDPA kernel accepts the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ceilings import measure_ceilings
from common import Harness, Table, append_markdown, fmt, speedup

HEADS, LENGTH, DIM = 8, 32 * 32, 64
BATCHES = [32, 64, 128]
QUICK_BATCHES = [64]
SMOKE_HEADS, SMOKE_LENGTH, SMOKE_DIM, SMOKE_BATCHES = 2, 5 * 5, 16, [2]
TOLERANCE = 0.05  # bf16 outputs of softmax-weighted averages of unit-scale values


def _masked_sdpa(q, k, v, start_k, start_v):
    """Strict causality by an explicit mask over ``[start, k_0 .. k_{L-1}]``."""
    batch, heads, length, _ = q.shape
    keys = torch.cat([start_k.expand(batch, heads, 1, -1), k], dim=2)
    values = torch.cat([start_v.expand(batch, heads, 1, -1), v], dim=2)
    # Query p may see key slot j iff j <= p (slot 0 is the start, slot i + 1 is position i).
    allowed = torch.ones(length, length + 1, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)


def main() -> None:
    harness = Harness.start("bench_attention.py", __doc__.splitlines()[0])
    from vqgen.kernels.causal_attention import (
        fused_attention_backend,
        strictly_causal_attention,
        strictly_causal_attention_reference,
    )

    heads, length, dim = (SMOKE_HEADS, SMOKE_LENGTH, SMOKE_DIM) if harness.smoke else (HEADS, LENGTH, DIM)
    torch.manual_seed(0)
    ceilings = measure_ceilings(harness)
    columns = ["B", "provider", "ms (p20-p80)", "TFLOP/s", "% bf16 ceiling", "vs eager", "vs compile", "max |diff|"]
    table = Table(harness.title(f"strictly causal attention, bf16, heads {heads}, L {length}, d {dim}"), columns)
    compiled = harness.compile(strictly_causal_attention_reference)
    fused = None
    for batch in harness.shapes(BATCHES, QUICK_BATCHES, SMOKE_BATCHES):
        shape = (batch, heads, length, dim)
        q, k, v = (torch.randn(shape, device=harness.device, dtype=torch.bfloat16) for _ in range(3))
        start_k, start_v = (torch.randn(heads, dim, device=harness.device, dtype=torch.bfloat16) for _ in range(2))
        fused = fused_attention_backend(q, k, v) if harness.device == "cuda" else None
        providers = {
            "eager": lambda: strictly_causal_attention_reference(q, k, v, start_k, start_v),
            "compile": lambda: compiled(q, k, v, start_k, start_v),
            "masked-sdpa": lambda: _masked_sdpa(q, k, v, start_k[None, :, None], start_v[None, :, None]),
            "shifted-sdpa": lambda: strictly_causal_attention(q, k, v, start_k, start_v),
        }
        outputs = harness.run_all(providers)
        timings = harness.bench_all(providers)
        flops = 4 * batch * heads * length * length * dim / 2
        for name, timing in timings.items():
            diff = harness.diff_from_eager(f"{name}, B {batch}", outputs, name, TOLERANCE)
            tflops = flops / (timing.median * 1e-3) / 1e12 if timing else None
            pct = 100 * tflops / ceilings.bf16_tflops if tflops else None
            row = [batch, name, fmt(timing, ""), fmt(tflops), fmt(pct)]
            table.add(*row, speedup(timings["eager"], timing), speedup(timings["compile"], timing), fmt(diff, ".2g"))
        del q, k, v, outputs
    table.print()
    notes = [
        f"fused SDPA kernel accepting these inputs: {fused or 'none (math fallback)'}",
        f"ceiling: bf16 matmul {ceilings.bf16_tflops:.0f} TFLOP/s; torch.compile mode: {harness.compile_mode}",
        "max |diff|: largest difference from the eager reference's output on the same inputs",
    ]
    for note in notes:
        print(note)
    if harness.out:
        append_markdown(harness.out, "strictly causal attention (bench_attention.py)", [table], notes)


if __name__ == "__main__":
    main()
