"""Measured ceilings of the current GPU, to express kernel results as a fraction of what is reachable.

- bandwidth: a large device-to-device copy (bytes read + bytes written per second);
- matmul throughput: large square matmuls in bf16, in fp32 with TF32 tensor cores, and in strict
  fp32 (the FMA units), so each kernel is compared with the units its dtype runs on.

Run alone to print them: ``python benchmarks/ceilings.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import bench, environment_line, fp32_matmul_precision, require_gpu


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


def measure_bandwidth(nbytes: int = 2**31) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timing = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (timing.median * 1e-3) / 1e9


def measure_matmul(dtype: torch.dtype, n: int = 8192, fp32_precision: str = "highest") -> float:
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    with fp32_matmul_precision(fp32_precision):
        timing = bench(lambda: a @ b)
    return 2 * n**3 / (timing.median * 1e-3) / 1e12


def measure_ceilings() -> Ceilings:
    """About ten seconds on a current GPU."""
    return Ceilings(
        bandwidth_gbs=measure_bandwidth(),
        bf16_tflops=measure_matmul(torch.bfloat16),
        tf32_tflops=measure_matmul(torch.float32, fp32_precision="high"),
        fp32_tflops=measure_matmul(torch.float32, n=4096),
    )


def main() -> None:
    require_gpu("ceilings.py")
    ceilings = measure_ceilings()
    print(environment_line())
    print(f"copy bandwidth      {ceilings.bandwidth_gbs:8.0f} GB/s")
    print(f"bf16 matmul         {ceilings.bf16_tflops:8.1f} TFLOP/s")
    print(f"tf32 matmul         {ceilings.tf32_tflops:8.1f} TFLOP/s")
    print(f"fp32 matmul (FMA)   {ceilings.fp32_tflops:8.1f} TFLOP/s")


if __name__ == "__main__":
    main()
