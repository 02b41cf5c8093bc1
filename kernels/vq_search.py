"""Nearest-code search for vector quantisation.

Reference: ``argmin_k ||x_n - e_k||^2`` through one ``N x K`` distance matrix (matmul + argmin).

The fused kernel never materialises that matrix. Each program holds ``BLOCK_N`` rows of ``x`` and
walks the codebook in tiles of ``BLOCK_K`` codes, computing ``||e||^2 - 2 x.e`` for the tile with
``tl.dot`` and folding it into a running (min, argmin) per row. Memory traffic: the reference writes
and re-reads ``N * K`` fp32 distances (17 GB at N = 64*64*128, K = 8192), the kernel reads ``x``
once, the codebook once per program (from L2), and writes 12 bytes per row; peak extra memory is
``K`` floats of code norms instead of ``N * K``.
"""

from __future__ import annotations

import torch

from vqgen.errors import ConfigError
from vqgen.kernels import Backend, build_triton_kernels, dot_precision, interpreting, use_triton

try:  # Triton is optional: without it every call takes the PyTorch reference.
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The whole vector dimension lives in one register tile; larger D takes the reference.
MAX_DIM = 256
_INTERPRETER_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 32}


# Only Triton builtins in the kernel body (tl.full, tl.exp, tl.reduce, ...), no tl.sum / tl.min /
# tl.sigmoid / tl.cdiv / tl.zeros: those are Triton's own @jit helpers, decorated once when triton
# is first imported, in the mode TRITON_INTERPRET selected at that moment. torchmetrics and
# torch._dynamo import triton early, so a test process that turns the interpreter on later would
# hand the interpreter compiled-mode helpers, which refuse to run. Reductions pass Triton's combine
# functions to tl.reduce directly: the interpreter recognises them by identity and the compiler
# generates the same code as tl.sum / tl.min.
def _nearest_code_kernel(
    x_ptr,  # [N, D], unit stride along D
    code_ptr,  # [K, D], unit stride along D
    code_sq_ptr,  # [K] fp32, ||e_k||^2
    idx_ptr,  # [N] int64 out
    dist_ptr,  # [N] fp32 out
    N,
    K,
    D,
    stride_x,  # row strides
    stride_code,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands; ignored for bf16/fp16
    UPCAST_DOT: tl.constexpr,  # True under the interpreter, whose tl.dot cannot multiply bf16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D (and >= 16, tl.dot's minimum)
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < N
    dim_ok = dims < D

    # The x tile stays in registers for the whole codebook walk. Padded dims are 0, so they add
    # nothing to the dot products or the norms.
    x_ptrs = x_ptr + rows[:, None] * stride_x + dims[None, :]
    x = tl.load(x_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if UPCAST_DOT:
        x = x.to(tl.float32)
    x32 = x.to(tl.float32)
    x_sq = tl.reduce(x32 * x32, 1, tl.standard._sum_combine)  # [BLOCK_N], i.e. tl.sum

    # Running best per (row, lane): lane j of the tile sees codes j, j + BLOCK_K, ... The update is
    # elementwise; the cross-lane reduction happens once, after the loop, not once per tile, which
    # keeps the non-tensor-core work per distance to a compare and two selects.
    best = tl.full([BLOCK_N, BLOCK_K], float("inf"), dtype=tl.float32)
    best_code = tl.full([BLOCK_N, BLOCK_K], 0, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        code_ok = codes < K
        # Codebook tile transposed by the pointer arithmetic: element (d, k) is E[k, d].
        e_ptrs = code_ptr + codes[None, :] * stride_code + dims[:, None]
        e = tl.load(e_ptrs, mask=dim_ok[:, None] & code_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_K]
        if UPCAST_DOT:
            e = e.to(tl.float32)
        xe = tl.dot(x, e, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_K] fp32
        # Padded codes get ||e||^2 = +inf, so their distance is +inf and never wins.
        e_sq = tl.load(code_sq_ptr + codes, mask=code_ok, other=float("inf"))
        dist = e_sq[None, :] - 2.0 * xe  # ||x - e||^2 - ||x||^2: same argmin
        # Strictly smaller only: on a tie the lane keeps its earlier (lower) code.
        better = dist < best
        best = tl.where(better, dist, best)
        best_code = tl.where(better, codes[None, :], best_code)

    # Across lanes: the minimum, then the lowest code index among the lanes that reach it. With
    # the per-lane rule above this is torch.argmin's rule, the first minimal index. (This is
    # tl.min spelled out with Triton's combine function; see the note above the kernel.)
    row_min = tl.reduce(best, 1, tl.standard._elementwise_min)  # [BLOCK_N]
    candidates = tl.where(best == row_min[:, None], best_code, K)  # K: larger than any index
    row_code = tl.reduce(candidates, 1, tl.standard._elementwise_min)  # [BLOCK_N]

    tl.store(idx_ptr + rows, row_code.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, tl.maximum(row_min + x_sq, 0.0), mask=row_ok)


def _autotune_configs() -> list:
    # The running (min, code) pair costs two [BLOCK_N, BLOCK_K] register tiles besides the
    # dot's accumulator, so tiles stay smaller than a plain matmul's.
    configs = []
    # All compile without register spills for D = 64 on sm_90 in fp32 and bf16.
    for block_n, block_k, warps, stages in [
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),  # spills a little in fp32, not in bf16
    ]:
        meta = {"BLOCK_N": block_n, "BLOCK_K": block_k}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return configs


# N changes with the batch; the best tile depends on the codebook shape.
_KERNELS = (
    build_triton_kernels(_nearest_code_kernel, configs=_autotune_configs(), key=["K", "D"])
    if triton is not None
    else {}
)


def _check_inputs(x: torch.Tensor, codebook: torch.Tensor) -> None:
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code: expected x [N, D] and codebook [K, D], got {tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("nearest_code: the codebook is empty")
    if x.shape[1] > MAX_DIM:
        raise ValueError(f"nearest_code: the Triton kernel supports D <= {MAX_DIM}, got D = {x.shape[1]}")
    if x.dtype not in _IO_DTYPES or codebook.dtype != x.dtype:
        raise ValueError(
            f"nearest_code: x and codebook must share a float32/bfloat16/float16 dtype, "
            f"got {x.dtype} and {codebook.dtype}"
        )
    if x.device != codebook.device:
        raise ValueError(f"nearest_code: x is on {x.device}, the codebook on {codebook.device}")
    if not (x.is_cuda or interpreting()):
        raise ValueError("nearest_code: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")


def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton search. Same contract as :func:`nearest_code_reference`.

    ``x`` and ``codebook`` must share a dtype (float32, bfloat16 or float16) and a device; products
    are accumulated in float32. Rows may have any stride.

    Ties resolve to the lowest index, as in ``torch.argmin``, when the tied distances round to the
    same float. Distances are summed in a different order than a cuBLAS matmul, so two codes within
    a rounding error of each other may resolve differently from the reference.
    """
    if triton is None:
        raise ConfigError("backend", "'triton' requested but Triton is not installed")
    _check_inputs(x, codebook)
    x = x if x.stride(1) == 1 else x.contiguous()
    codebook = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    n, d = x.shape
    k = codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    sq_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return indices, sq_dist
    code_sq = codebook.float().pow(2).sum(1)  # [K]; tiny next to the search

    interpret = interpreting()
    meta = dict(_INTERPRETER_BLOCKS) if interpret else {}  # autotuned on the GPU

    def grid(args):
        return (triton.cdiv(n, args["BLOCK_N"]),)

    _KERNELS[interpret][grid](
        x,
        codebook,
        code_sq,
        indices,
        sq_dist,
        n,
        k,
        d,
        x.stride(0),
        codebook.stride(0),
        DOT_PRECISION=dot_precision(x.dtype),
        UPCAST_DOT=interpret,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        **meta,
    )
    return indices, sq_dist


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for each row of ``x``, and its squared distance.

    Args:
        x: ``[N, D]`` vectors. codebook: ``[K, D]`` codes. Computed in float32 whatever the inputs.
    Returns:
        ``(indices [N] int64, squared_distance [N] float32)``.
    """
    x = x.float()
    codebook = codebook.float()
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2. ||x||^2 is constant per row, so the argmin runs over
    # ||e||^2 - 2 x.e (one fused addmm, one N x K matrix) and ||x||^2 is added to the minimum only.
    partial = torch.addmm(codebook.pow(2).sum(1)[None, :], x, codebook.t(), alpha=-2)  # [N, K]
    min_partial, indices = partial.min(dim=1)
    return indices, (min_partial + x.pow(2).sum(1)).clamp_min(0)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: Triton on CUDA (when available), the reference elsewhere. See the reference's doc.

    On the Triton path, inputs of two different dtypes are both searched in float32, as the
    reference does. Not differentiable (the quantizer detaches its inputs).
    """
    if not use_triton(backend, x, supported=x.dtype in _IO_DTYPES and x.shape[-1] <= MAX_DIM):
        return nearest_code_reference(x, codebook)
    if codebook.dtype != x.dtype:
        x, codebook = x.float(), codebook.float()
    return nearest_code_triton(x, codebook)
