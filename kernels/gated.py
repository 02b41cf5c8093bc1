"""The gated-unit epilogue of a gated PixelCNN layer.

``out = residual + W @ (tanh(a + bias_a) * sigmoid(b + bias_b)) + w_bias`` where ``a, b`` are the two
channel halves of the layer's pre-activation and ``bias`` is the conditioning bias (class and/or
conditioning-stack features). Layout is channels-last rows: ``[M, C]`` with M = batch*height*width.

Memory traffic, in elements per row (``2C`` pre-activation channels, ``Cout`` outputs).
Unfused, eager PyTorch makes every intermediate a round trip through DRAM: ``pre + cond`` (read 4C,
write 2C), ``tanh`` and ``sigmoid`` (read 2C, write 2C), the product (read 2C, write C), the
projection (read C, write Cout), the residual add (read 2 Cout, write Cout): about ``14C + 4Cout``
elements. The fused kernel reads ``pre`` and ``cond`` once (4C), the residual once (Cout), writes
``gated`` (C, needed by the skip path and by backward) and ``out`` (Cout): ``5C + 2Cout`` elements,
roughly 2.5x less at ``Cout = C``. The gate lives only in registers between the activation and the
``tl.dot`` that consumes it. (When ``Cout`` spans several output tiles, each tile's program re-reads
its rows of ``pre``; programs sharing rows are scheduled together so those re-reads hit L2.)
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
# Block sizes under the interpreter: the smallest tiles tl.dot accepts, so tests stay fast and
# still cover several programs and loop iterations.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}


# Only Triton builtins in the kernel body (tl.full, tl.exp, tl.reduce, ...), no tl.sum / tl.min /
# tl.sigmoid / tl.cdiv / tl.zeros: those are Triton's own @jit helpers, decorated once when triton
# is first imported, in the mode TRITON_INTERPRET selected at that moment. torchmetrics and
# torch._dynamo import triton early, so a test process that turns the interpreter on later would
# hand the interpreter compiled-mode helpers, which refuse to run. Reductions pass Triton's combine
# functions to tl.reduce directly (see vq_search.py).
def _gated_residual_kernel(
    pre_ptr,  # [M, 2C], unit stride along channels
    cond_ptr,  # [M, 2C] or a dummy pointer when HAS_COND is False
    w_ptr,  # [COUT, C]
    bias_ptr,  # [COUT] or dummy
    res_ptr,  # [M, COUT] or dummy
    out_ptr,  # [M, COUT], contiguous
    gated_ptr,  # [M, C], contiguous
    M,
    C,
    COUT,
    stride_pre,  # row strides; a row stride of 0 broadcasts one row over M
    stride_cond,
    stride_w,
    stride_res,
    HAS_COND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands; ignored for bf16/fp16
    UPCAST_DOT: tl.constexpr,  # True under the interpreter, whose tl.dot cannot multiply bf16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program owns a [BLOCK_M, BLOCK_N] tile of `out`. Programs are numbered so that the ones
    # sharing the same rows (same pid_m, consecutive pid_n) run together and re-read `pre` from L2.
    pid = tl.program_id(0)
    num_n = (COUT + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    # int64 row offsets: M * 2C overflows int32 for the largest maps.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N], output channels
    row_ok = rows < M
    col_ok = cols < COUT

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K], gated channels
        k_ok = ks < C
        tile_ok = row_ok[:, None] & k_ok[None, :]  # [BLOCK_M, BLOCK_K]
        # The tanh half is channels [0, C) of the row, the gate half [C, 2C): same pointers + C.
        a_ptrs = pre_ptr + rows[:, None] * stride_pre + ks[None, :]
        a = tl.load(a_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        b = tl.load(a_ptrs + C, mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_COND:
            c_ptrs = cond_ptr + rows[:, None] * stride_cond + ks[None, :]
            a += tl.load(c_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            b += tl.load(c_ptrs + C, mask=tile_ok, other=0.0).to(tl.float32)
        # tanh(a) = 2 sigmoid(2a) - 1 (Triton's core language has no tanh); masked lanes give 0.
        # exp(-x) overflows to inf for very negative x, and 1 / (1 + inf) = 0 is the right limit.
        sig_2a = 1.0 / (1.0 + tl.exp(-2.0 * a))
        sig_b = 1.0 / (1.0 + tl.exp(-b))
        gate = (2.0 * sig_2a - 1.0) * sig_b  # [BLOCK_M, BLOCK_K] fp32
        gate = gate.to(gated_ptr.dtype.element_ty)
        # Only the first column of programs writes `gated`; the others recompute it in registers.
        g_ptrs = gated_ptr + rows[:, None] * C + ks[None, :]
        tl.store(g_ptrs, gate, mask=tile_ok & (pid_n == 0))

        # W^T tile [BLOCK_K, BLOCK_N]: element (k, n) is W[n, k] at w_ptr + n * stride_w + k.
        w_ptrs = w_ptr + cols[None, :] * stride_w + ks[:, None]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(gate.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(gate, w, acc, input_precision=DOT_PRECISION)

    # Epilogue in fp32: projection bias and residual, then one rounding to the output dtype.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + rows[:, None] * stride_res + cols[None, :]
        acc += tl.load(r_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + rows[:, None] * COUT + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


def _autotune_configs() -> list:
    # Small K tiles: the gate is computed in the dot operand's register layout, so a [BLOCK_M,
    # BLOCK_K] tile of pre/cond costs several registers per element. These compile for sm_90
    # without spills in bf16 (the wide-N ones spill a little; they cut re-reads of `pre` at
    # Cout >= 256).
    configs = []
    for block_m, block_n, block_k, warps, stages in [
        (64, 64, 16, 4, 2),
        (64, 64, 16, 4, 3),
        (128, 64, 16, 8, 3),
        (64, 64, 32, 8, 3),
        (64, 128, 32, 8, 3),
        (128, 128, 16, 8, 3),
        (64, 256, 32, 16, 2),
    ]:
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return configs


# M (batch * map size) changes every call; the best tile depends on the channel counts.
_KERNELS = (
    build_triton_kernels(_gated_residual_kernel, configs=_autotune_configs(), key=["C", "COUT"])
    if triton is not None
    else {}
)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view with unit stride along channels; the row stride may be anything."""
    return t if t.stride(1) == 1 else t.contiguous()


def _check_inputs(pre, cond, weight, bias, residual) -> None:
    if pre.dim() != 2 or pre.shape[1] % 2:
        raise ValueError(f"gated_residual: pre must be [M, 2C], got {tuple(pre.shape)}")
    m, c = pre.shape[0], pre.shape[1] // 2
    if weight.dim() != 2 or weight.shape[1] != c:
        raise ValueError(f"gated_residual: weight must be [C_out, {c}], got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    expected = {"cond": (m, 2 * c), "bias": (c_out,), "residual": (m, c_out)}
    for name, t in (("cond", cond), ("bias", bias), ("residual", residual)):
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"gated_residual: {name} must be {expected[name]}, got {tuple(t.shape)}")
    for name, t in (("pre", pre), ("cond", cond), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != pre.dtype or t.device != pre.device:
            raise ValueError(
                f"gated_residual: {name} is {t.dtype} on {t.device}, expected {pre.dtype} on {pre.device}"
            )
    if pre.dtype not in _IO_DTYPES:
        raise ValueError(f"gated_residual: unsupported dtype {pre.dtype}; use float32, bfloat16 or float16")
    if not (pre.is_cuda or interpreting()):
        raise ValueError("gated_residual: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")


def gated_residual_triton(
    pre: torch.Tensor,
    cond: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton kernel (forward only). Same contract as :func:`gated_residual_reference`.

    All tensors must share one dtype (float32, bfloat16 or float16) and one device; accumulation is
    in float32. Rows may have any stride; channels are made contiguous if they are not.
    """
    if triton is None:
        raise ConfigError("backend", "'triton' requested but Triton is not installed")
    _check_inputs(pre, cond, weight, bias, residual)
    m, c, c_out = pre.shape[0], pre.shape[1] // 2, weight.shape[0]
    pre, weight = _rows(pre), _rows(weight)
    cond = _rows(cond) if cond is not None else None
    residual = _rows(residual) if residual is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(m, c_out, dtype=pre.dtype, device=pre.device)
    gated = torch.empty(m, c, dtype=pre.dtype, device=pre.device)
    if m == 0:
        return out, gated

    interpret = interpreting()
    meta = dict(_INTERPRETER_BLOCKS) if interpret else {}  # autotuned on the GPU

    def grid(args):
        return (triton.cdiv(m, args["BLOCK_M"]) * triton.cdiv(c_out, args["BLOCK_N"]),)

    _KERNELS[interpret][grid](
        pre,
        cond if cond is not None else pre,  # dummies are never read: HAS_* is False
        weight,
        bias if bias is not None else weight,
        residual if residual is not None else out,
        out,
        gated,
        m,
        c,
        c_out,
        pre.stride(0),
        cond.stride(0) if cond is not None else 0,
        weight.stride(0),
        residual.stride(0) if residual is not None else 0,
        HAS_COND=cond is not None,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        DOT_PRECISION=dot_precision(pre.dtype),
        UPCAST_DOT=interpret,
        **meta,
    )
    return out, gated


def gated_residual_reference(
    pre: torch.Tensor,
    cond: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated unit, 1x1 projection and residual add.

    Args:
        pre: ``[M, 2C]`` pre-activation; the first C channels are the tanh half, the last C the gate.
        cond: ``[M, 2C]`` conditioning bias added to ``pre`` (or None).
        weight: ``[C_out, C]`` 1x1 projection. bias: ``[C_out]`` or None.
        residual: ``[M, C_out]`` added to the projection (or None).
    Returns:
        ``(out [M, C_out], gated [M, C])``: the layer output and the gated activation (the skip path
        reads it).
    """
    if cond is not None:
        pre = pre + cond
    a, b = pre.chunk(2, dim=-1)
    gated = torch.tanh(a) * torch.sigmoid(b)
    out = torch.nn.functional.linear(gated, weight, bias)
    if residual is not None:
        out = out + residual
    return out, gated


class _GatedResidualFunction(torch.autograd.Function):
    """Forward through the fused kernel, backward through the reference's math in PyTorch.

    Backward recomputes tanh and sigmoid from ``pre`` (+ ``cond``) rather than saving them: only
    ``gated``, an output anyway, is kept besides the inputs.
    """

    @staticmethod
    def forward(ctx, pre, cond, weight, bias, residual):
        out, gated = gated_residual_triton(pre, cond, weight, bias, residual)
        ctx.save_for_backward(pre, cond, weight, gated)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out, gated

    @staticmethod
    def backward(ctx, grad_out, grad_gated):
        pre, cond, weight, gated = ctx.saved_tensors
        need_pre, need_cond, need_w, need_bias, need_res = ctx.needs_input_grad
        grad_out32 = grad_out.float()  # [M, Cout]

        grad_pre = grad_cond = grad_w = grad_bias = grad_res = None
        if need_pre or need_cond:
            s = pre.float() if cond is None else pre.float() + cond.float()
            a, b = s.chunk(2, dim=-1)  # [M, C] each
            tanh_a, sig_b = torch.tanh(a), torch.sigmoid(b)
            # d loss / d gated: through the projection, plus the skip path's own use of `gated`.
            d_gated = grad_out32 @ weight.float() + grad_gated.float()  # [M, C]
            d_a = d_gated * sig_b * (1 - tanh_a * tanh_a)
            d_b = d_gated * tanh_a * sig_b * (1 - sig_b)
            d_s = torch.cat([d_a, d_b], dim=-1)  # [M, 2C]
            grad_pre = d_s.to(pre.dtype) if need_pre else None
            grad_cond = d_s.to(cond.dtype) if need_cond else None
        if need_w:
            grad_w = (grad_out32.t() @ gated.float()).to(weight.dtype)  # [Cout, C]
        if need_bias and ctx.bias_dtype is not None:
            grad_bias = grad_out32.sum(0).to(ctx.bias_dtype)
        if need_res:
            grad_res = grad_out
        return grad_pre, grad_cond, grad_w, grad_bias, grad_res


def gated_residual(
    pre: torch.Tensor,
    cond: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: fused Triton kernel on CUDA (when available), the reference elsewhere.

    Same contract as :func:`gated_residual_reference`; differentiable on both paths. On the Triton
    path every input is first cast to ``pre``'s dtype (as autocast would cast the projection), so
    fp32 parameters work with bf16 activations.
    """
    if not use_triton(backend, pre, supported=pre.dtype in _IO_DTYPES):
        return gated_residual_reference(pre, cond, weight, bias, residual)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(pre.dtype)  # differentiable; a no-op when equal

    return _GatedResidualFunction.apply(pre, cast(cond), cast(weight), cast(bias), cast(residual))
