"""Strictly causal attention: shifted-key SDPA against the explicit-mask reference."""

import pytest
import torch

from vqgen.errors import ConfigError
from vqgen.kernels.causal_attention import (
    attend_to_cache,
    fused_attention_backend,
    new_kv_cache,
    strictly_causal_attention,
    strictly_causal_attention_reference,
)

B, HEADS, L, DIM = 2, 3, 7, 8


def _qkv(device="cpu", dtype=torch.float32, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = (rand(B, HEADS, length, DIM) for _ in range(3))
    return q, k, v, rand(HEADS, DIM), rand(HEADS, DIM)


@pytest.mark.parametrize("length", [1, L])
def test_shifted_sdpa_matches_masked_reference(length):
    args = _qkv(length=length)
    out = strictly_causal_attention(*args)
    assert out.shape == (B, HEADS, length, DIM)
    torch.testing.assert_close(out, strictly_causal_attention_reference(*args), atol=1e-5, rtol=1e-5)


def test_first_position_sees_only_the_start_value():
    q, k, v, start_k, start_v = _qkv()
    out = strictly_causal_attention(q, k, v, start_k, start_v)
    torch.testing.assert_close(out[:, :, 0], start_v.expand(B, HEADS, DIM), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", [strictly_causal_attention, strictly_causal_attention_reference])
def test_a_position_never_sees_itself_or_later(impl):
    q, k, v, start_k, start_v = _qkv()
    p = 3
    base = impl(q, k, v, start_k, start_v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p] += 5.0
    v2[:, :, p] -= 5.0
    moved = impl(q, k2, v2, start_k, start_v)
    assert torch.equal(moved[:, :, : p + 1], base[:, :, : p + 1])  # positions <= p: untouched
    assert not torch.allclose(moved[:, :, p + 1], base[:, :, p + 1])  # p + 1 sees position p


def test_gradients_match_reference():
    args = _qkv()
    grads = []
    for impl in (strictly_causal_attention, strictly_causal_attention_reference):
        leaves = [t.clone().requires_grad_(True) for t in args]
        (impl(*leaves) * torch.linspace(-1, 1, DIM)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("q", "k", "v", "start_k", "start_v"), *grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_on_a_cpu_matches_the_reference_and_keeps_its_dtype():
    """On a CPU, half-precision inputs are attended in fp32 (the CPU flash kernel is slower in bf16):
    the result, and the gradients reaching the bf16 leaves, are bf16 and match the fp32 definition."""
    args = _qkv(dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in args]
    out = strictly_causal_attention(*leaves)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), strictly_causal_attention_reference(*(t.float() for t in args)),
                               atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)


def test_cached_steps_match_full_attention():
    q, k, v, start_k, start_v = _qkv()
    k_cache, v_cache = new_kv_cache(start_k, start_v, B, L)
    steps = []
    for p in range(L):
        steps.append(attend_to_cache(q[:, :, p : p + 1], k_cache, v_cache, torch.arange(L) <= p))
        if p + 1 < L:
            k_cache[:, :, p + 1] = k[:, :, p]
            v_cache[:, :, p + 1] = v[:, :, p]
    full = strictly_causal_attention(q, k, v, start_k, start_v)
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-5, rtol=1e-5)


def test_backend_values():
    args = _qkv()
    assert torch.equal(strictly_causal_attention(*args, backend="torch"), strictly_causal_attention_reference(*args))
    torch.testing.assert_close(strictly_causal_attention(*args, backend="triton"), strictly_causal_attention(*args))
    with pytest.raises(ConfigError, match="backend"):
        strictly_causal_attention(*args, backend="flash")


def test_bad_shapes_are_named():
    q, k, v, start_k, start_v = _qkv()
    with pytest.raises(ValueError, match="start_k"):
        strictly_causal_attention(q, k, v, start_k[:, :-1], start_v)
    with pytest.raises(ValueError, match="visible"):
        attend_to_cache(q[:, :, :1], k, v, torch.ones(L + 1, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused SDPA kernels need a CUDA GPU")
def test_bf16_on_cuda_runs_a_fused_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The top prior's shape: a 32x32 map, 8 heads of 64 channels.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1024, 64, generator=g).cuda().bfloat16() for _ in range(3))
    start_k, start_v = (torch.randn(8, 64, generator=g).cuda().bfloat16() for _ in range(2))
    assert fused_attention_backend(q, k, v) in ("flash", "cudnn")
    # Under this restriction the math fallback is off: success means flash or cuDNN ran.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = strictly_causal_attention(q, k, v, start_k, start_v)
    ref = strictly_causal_attention_reference(q, k, v, start_k, start_v)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
