"""The fused nearest-code search against the matmul + argmin reference (Triton interpreter on a CPU)."""

import pytest
import torch

from vqgen.errors import ConfigError
from vqgen.kernels import vq_search as vq_module
from vqgen.kernels.vq_search import nearest_code, nearest_code_reference, nearest_code_triton

N, K, D = 333, 77, 24  # odd sizes: partial row, code and dimension tiles


def _data(device, dtype=torch.float32, seed=0, n=N, k=K, d=D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    codebook = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)
    return x, codebook


def test_reference_is_the_true_nearest_code():
    x, codebook = _data("cpu", n=50)
    brute = (x[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)  # [N, K], the definition
    idx, dist = nearest_code_reference(x, codebook)
    assert torch.equal(idx, brute.argmin(1))
    torch.testing.assert_close(dist, brute.min(1).values, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(triton_device, dtype):
    # Random continuous data: exact ties are improbable, so indices must agree exactly.
    x, codebook = _data(triton_device, dtype)
    idx, dist = nearest_code_triton(x, codebook)
    ref_idx, ref_dist = nearest_code_reference(x, codebook)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32 and idx.shape == dist.shape == (N,)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-5)


def test_strided_inputs(triton_device):
    x, codebook = _data(triton_device)
    x_t = x.t().contiguous().t()  # unit row stride, not channel stride
    wide = torch.cat([codebook, torch.ones_like(codebook)], dim=1)
    codebook_view = wide[:, :D]  # row stride 2 * D
    assert x_t.stride(1) != 1 and codebook_view.stride(0) == 2 * D
    idx, dist = nearest_code_triton(x_t, codebook_view)
    ref_idx, ref_dist = nearest_code_reference(x, codebook)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_ties_resolve_to_lowest_index(triton_device, dtype):
    # Small integers: every distance is exact, so ties are real. The codebook repeats 16 codes five
    # times; with the interpreter's 32-code tiles a tie falls in the same tile on another lane, on
    # the same lane in a later tile, and on another lane in a later tile.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (61, 16), generator=g).to(dtype)
    codebook = torch.randint(-2, 3, (16, 16), generator=g).to(dtype).repeat(5, 1)
    x, codebook = x.to(triton_device), codebook.to(triton_device)
    idx, dist = nearest_code_triton(x, codebook)
    brute = (x.float()[:, None] - codebook.float()[None]).pow(2).sum(-1)
    assert torch.equal(idx, brute.argmin(1))  # torch.argmin returns the first minimum
    assert (idx < 16).all()
    assert torch.equal(dist, brute.min(1).values)


def test_auto_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, "auto" needs CUDA

    def must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for CPU tensors under backend='auto'")

    monkeypatch.setattr(vq_module, "nearest_code_triton", must_not_run)
    x, codebook = _data("cpu")
    idx, dist = nearest_code(x, codebook, backend="auto")
    ref_idx, ref_dist = nearest_code_reference(x, codebook)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


def test_forced_triton_on_cpu_without_interpreter_is_a_config_error(no_interpreter):
    x, codebook = _data("cpu")
    with pytest.raises(ConfigError, match="backend"):
        nearest_code(x, codebook, backend="triton")


def test_bad_inputs_are_named(triton_device):
    x, codebook = _data(triton_device)
    with pytest.raises(ValueError, match="codebook"):
        nearest_code_triton(x, codebook[:, :-1])
    with pytest.raises(ValueError, match="D <= 256"):
        nearest_code_triton(*_data(triton_device, n=4, k=4, d=300))
    with pytest.raises(ValueError, match="dtype"):
        nearest_code_triton(x.double(), codebook.double())


@pytest.mark.parametrize("dtype, precision", [("fp32", "tf32"), ("bf16", "ieee")])
def test_compiles_for_hopper(compile_for_gpu, dtype, precision):
    signature = {
        "x_ptr": f"*{dtype}",
        "code_ptr": f"*{dtype}",
        "code_sq_ptr": "*fp32",
        "idx_ptr": "*i64",
        "dist_ptr": "*fp32",
        **dict.fromkeys(["N", "K", "D", "stride_x", "stride_code"], "i32"),
    }
    constexprs = {"DOT_PRECISION": precision, "UPCAST_DOT": False, "BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_D": 64}
    signature |= dict.fromkeys(constexprs, "constexpr")
    kernel = compile_for_gpu(vq_module._nearest_code_kernel, signature, constexprs, num_warps=8, num_stages=3)
    assert "wgmma" in kernel.asm["ptx"]  # tf32 and bf16 products both run on the tensor cores
