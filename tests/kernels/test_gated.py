"""The fused gated-unit kernel against its PyTorch reference (Triton interpreter on a CPU)."""

import pytest
import torch

from vqgen.errors import ConfigError
from vqgen.kernels import gated as gated_module
from vqgen.kernels.gated import gated_residual, gated_residual_reference, gated_residual_triton

M, C, COUT = 37, 24, 40  # odd sizes: partial tiles along every dimension
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _inputs(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "pre": rand(M, 2 * C),
        "cond": rand(M, 2 * C, scale=0.5),
        "weight": rand(COUT, C, scale=C**-0.5),
        "bias": rand(COUT, scale=0.1),
        "residual": rand(M, COUT),
    }


def _reference_fp32(pre, cond, weight, bias, residual):
    """The reference on the same values in float32: the target both dtypes are held to."""
    up = [None if t is None else t.float() for t in (pre, cond, weight, bias, residual)]
    return gated_residual_reference(*up)


@pytest.mark.parametrize(
    "dtype, optional",
    [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)],
    ids=["fp32", "bf16", "fp32-no-cond-bias-residual"],
)
def test_forward_matches_reference(triton_device, dtype, optional):
    x = _inputs(triton_device, dtype)
    if not optional:
        x["cond"] = x["bias"] = x["residual"] = None
    out, gated = gated_residual_triton(**x)
    ref_out, ref_gated = _reference_fp32(**x)
    assert out.dtype == gated.dtype == dtype
    assert out.shape == (M, COUT) and gated.shape == (M, C)
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    torch.testing.assert_close(gated.float(), ref_gated, **TOL[dtype])


def test_strided_and_broadcast_inputs(triton_device):
    x = _inputs(triton_device)
    g = torch.Generator().manual_seed(1)
    # Transposed (channel stride != 1), row-sliced (row stride 2 * COUT) and broadcast (row stride 0).
    pre = x["pre"].t().contiguous().t()
    weight = x["weight"].t().contiguous().t()
    residual = torch.randn(2 * M, COUT, generator=g).to(triton_device)[::2]
    cond = torch.randn(1, 2 * C, generator=g).to(triton_device).expand(M, 2 * C)
    assert pre.stride(1) != 1 and residual.stride(0) == 2 * COUT and cond.stride(0) == 0
    out, gated = gated_residual_triton(pre, cond, weight, x["bias"], residual)
    ref_out, ref_gated = gated_residual_reference(pre, cond, weight, x["bias"], residual)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(gated, ref_gated, **TOL[torch.float32])


def _grads(fn, tensors):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out, gated = fn(**leaves)
    g = torch.Generator().manual_seed(2)
    # Weight both outputs so the backward sees a gradient through `gated` as well (the skip path).
    w_out = torch.randn(out.shape, generator=g).to(out.device)
    w_gated = torch.randn(gated.shape, generator=g).to(out.device)
    ((out.float() * w_out).sum() + (gated.float() * w_gated).sum()).backward()
    return {k: v.grad for k, v in leaves.items()}


def test_autograd_matches_reference(triton_device):
    x = _inputs(triton_device)
    got = _grads(lambda **t: gated_residual(**t, backend="triton"), x)
    want = _grads(gated_residual_reference, x)
    for name in x:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


def test_bf16_activations_with_fp32_parameters(triton_device):
    # The autocast situation: bf16 activations, fp32 parameters. Gradients come back per input dtype.
    x = _inputs(triton_device)
    x["pre"], x["cond"], x["residual"] = (x[k].bfloat16() for k in ("pre", "cond", "residual"))
    got = _grads(lambda **t: gated_residual(**t, backend="triton"), x)
    want = _grads(_reference_fp32, x)
    for name in x:
        assert got[name].dtype == x[name].dtype, name
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=5e-2, rtol=5e-2, msg=name)


def test_auto_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, "auto" needs CUDA

    def must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for CPU tensors under backend='auto'")

    monkeypatch.setattr(gated_module, "gated_residual_triton", must_not_run)
    x = _inputs("cpu")
    out, gated = gated_residual(**x, backend="auto")
    ref_out, ref_gated = gated_residual_reference(**x)
    assert torch.equal(out, ref_out) and torch.equal(gated, ref_gated)


def test_forced_triton_on_cpu_without_interpreter_is_a_config_error(no_interpreter):
    with pytest.raises(ConfigError, match="backend"):
        gated_residual(**_inputs("cpu"), backend="triton")
    with pytest.raises(ConfigError, match="'auto', 'triton' or 'torch'"):
        gated_residual(**_inputs("cpu"), backend="cuda")


def test_shape_mismatch_names_the_tensor(triton_device):
    x = _inputs(triton_device)
    x["residual"] = x["residual"][:, :-1]
    with pytest.raises(ValueError, match="residual"):
        gated_residual_triton(**x)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiles_for_hopper(compile_for_gpu, dtype):
    pointers = ["pre_ptr", "cond_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "gated_ptr"]
    ints = ["M", "C", "COUT", "stride_pre", "stride_cond", "stride_w", "stride_res"]
    constexprs = {
        "HAS_COND": True,
        "HAS_BIAS": True,
        "HAS_RESIDUAL": True,
        "DOT_PRECISION": "ieee",
        "UPCAST_DOT": False,
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_K": 32,
    }
    signature = {p: f"*{dtype}" for p in pointers} | {i: "i32" for i in ints} | dict.fromkeys(constexprs, "constexpr")
    kernel = compile_for_gpu(gated_module._gated_residual_kernel, signature, constexprs, num_warps=4, num_stages=3)
    # bf16 operands must reach the tensor cores (Hopper's wgmma); ieee fp32 stays on FMA units.
    assert ("wgmma" in kernel.asm["ptx"]) == (dtype == "bf16")
