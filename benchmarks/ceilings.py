"""Measured ceilings of the current GPU, to express kernel results as a fraction of what is reachable.

- bandwidth: a large device-to-device copy (bytes read + bytes written per second);
- matmul throughput: large square matmuls in bf16, in fp32 with TF32 tensor cores, and in strict
  fp32 (the FMA units), so each kernel is compared with the units its dtype runs on.

Run alone to print them: ``python benchmarks/ceilings.py`` (``--json`` for one machine-readable line).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from common import Harness, Table, append_markdown, environment_line, fp32_matmul_precision


@dataclass
class Ceilings:
    bandwidth_gbs: float  # GB/s, 1 GB = 1e9 bytes
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float

    def tflops_for(self, dtype: torch.dtype, fp32_precision: str = "highest") -> float:
        """The matmul ceiling for operands of ``dtype`` under a ``torch.set_float32_matmul_precision``."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_tflops
        return self.fp32_tflops if fp32_precision == "highest" else self.tf32_tflops


def measure_bandwidth(harness: Harness, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=harness.device)
    dst = torch.empty_like(src)
    timing = harness.bench(lambda: dst.copy_(src))
    return 2 * nbytes / (timing.median * 1e-3) / 1e9


def measure_matmul(harness: Harness, dtype: torch.dtype, n: int, fp32_precision: str = "highest") -> float:
    a = torch.randn(n, n, device=harness.device).to(dtype)
    b = torch.randn(n, n, device=harness.device).to(dtype)
    with fp32_matmul_precision(fp32_precision):
        timing = harness.bench(lambda: a @ b)
    return 2 * n**3 / (timing.median * 1e-3) / 1e12


def measure_ceilings(harness: Harness) -> Ceilings:
    """About ten seconds on a current GPU: a 2 GiB copy, 8192^2 bf16 / TF32 and 4096^2 fp32 matmuls."""
    scale = 16 if harness.smoke else 1
    return Ceilings(
        bandwidth_gbs=measure_bandwidth(harness, 2**31 // scale**2),
        bf16_tflops=measure_matmul(harness, torch.bfloat16, 8192 // scale),
        tf32_tflops=measure_matmul(harness, torch.float32, 8192 // scale, fp32_precision="high"),
        fp32_tflops=measure_matmul(harness, torch.float32, 4096 // scale),
    )


def main() -> None:
    harness = Harness.start("ceilings.py", __doc__.splitlines()[0], flags={"--json": "print one JSON line"})
    ceilings = measure_ceilings(harness)
    if harness.args.json:
        print(json.dumps(dataclasses.asdict(ceilings)))
    table = Table(harness.title("measured ceilings"), ["quantity", "value"])
    table.add("copy bandwidth (read + write)", f"{ceilings.bandwidth_gbs:.0f} GB/s")
    table.add("bf16 matmul", f"{ceilings.bf16_tflops:.1f} TFLOP/s")
    table.add("tf32 matmul", f"{ceilings.tf32_tflops:.1f} TFLOP/s")
    table.add("fp32 matmul (FMA)", f"{ceilings.fp32_tflops:.1f} TFLOP/s")
    if not harness.args.json:
        print(environment_line())
        table.print()
    if harness.out:
        notes = ["copy: 2 GiB device to device; matmuls: 8192^2 (bf16, TF32) and 4096^2 (fp32), median of do_bench"]
        append_markdown(harness.out, "ceilings (ceilings.py)", [table], notes)


if __name__ == "__main__":
    main()
