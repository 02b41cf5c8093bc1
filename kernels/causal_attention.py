"""Strictly causal multi-head attention for the PixelCNN priors.

Position ``p`` attends to positions ``< p`` (never to itself) plus a learned start key/value, so the
first position has something to attend to. Rather than a custom mask, which rules out the fused
SDPA kernels, the keys and values are shifted one step along the sequence (start prepended, last
dropped): shifted slot ``p`` holds the key of position ``p - 1``, so "slots <= p" is exactly
"start, then positions < p", and ``F.scaled_dot_product_attention(is_causal=True)`` runs it with
flash or cuDNN attention. The shift costs one copy of ``k`` and ``v``; an explicit ``[L, L]`` mask
costs the fused kernels themselves (SDPA falls back to the memory-efficient or math kernel).

Cached sampling (one query at a time) keeps the shifted keys in a cache: slot 0 is the start
key/value, slot ``i + 1`` the key/value of position ``i``; see :func:`new_kv_cache`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import repeat

from vqgen.kernels import Backend, check_backend


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_k: torch.Tensor, start_v: torch.Tensor):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "strictly_causal_attention: q, k must be [B, heads, L, d] and v [B, heads, L, d_v], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads = q.shape[1]
    if start_k.shape != (heads, q.shape[3]) or start_v.shape != (heads, v.shape[3]):
        raise ValueError(
            f"strictly_causal_attention: start_k/start_v must be [heads, d], got {tuple(start_k.shape)} "
            f"and {tuple(start_v.shape)} for {heads} heads"
        )


def _shift_in(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``[B, h, L, d]`` -> the same shape with ``start`` in slot 0 and ``x[:, :, :-1]`` after it."""
    first = repeat(start.to(x.dtype), "h d -> b h 1 d", b=x.shape[0])
    return torch.cat([first, x[:, :, :-1]], dim=2)




def strictly_causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_k: torch.Tensor,
    start_v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch strictly causal attention with an explicit mask (the definition, for tests).

    Same contract as :func:`strictly_causal_attention`. Scores and softmax in float32.
    """
    _check_qkv(q, k, v, start_k, start_v)
    length = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q32, k32, v32 = q.float(), k.float(), v.float()
    # Scores against every position, masked to strictly earlier ones: allowed iff key < query.
    scores = torch.einsum("bhpd,bhjd->bhpj", q32, k32) * scale  # [B, h, L, L]
    earlier = torch.ones(length, length, dtype=torch.bool, device=q.device).tril(-1)
    scores = scores.masked_fill(~earlier, float("-inf"))
    # The start key is visible from every position.
    start_scores = torch.einsum("bhpd,hd->bhp", q32, start_k.float()) * scale  # [B, h, L]
    weights = torch.cat([start_scores[..., None], scores], dim=-1).softmax(dim=-1)  # [B, h, L, 1 + L]
    weights = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = weights[..., :1] * start_v.float()[None, :, None, :] + weights[..., 1:] @ v32
    return out.to(q.dtype)


def strictly_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_k: torch.Tensor,
    start_v: torch.Tensor,
    backend: Backend = "auto",
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention where position ``p`` sees positions ``< p`` and a learned start token.

    Args:
        q, k: ``[B, heads, L, d]``; v: ``[B, heads, L, d_v]`` (positions in raster order).
        start_k: ``[heads, d]``, start_v: ``[heads, d_v]``: the key/value every position can see.
        backend: ``"auto"`` and ``"triton"`` use the shifted fused-SDPA path (flash / cuDNN on CUDA;
            there is no separate Triton kernel), ``"torch"`` the explicit-mask reference.
        scale: score scale, default ``d ** -0.5``. dropout_p: dropout on the attention weights
            (pass 0 in eval).
    Returns:
        ``[B, heads, L, d_v]`` in ``q``'s dtype.
    """
    if check_backend(backend) == "torch":
        return strictly_causal_attention_reference(q, k, v, start_k, start_v, scale=scale, dropout_p=dropout_p)
    _check_qkv(q, k, v, start_k, start_v)
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        # The CPU flash kernel is 2-3x slower in bf16 than in fp32 (forward and backward at L = 16 to
        # 256, 4 heads of 16): its half-precision path does not use the matrix unit.
        q, k, v, start_k, start_v = (t.float() for t in (q, k, v, start_k, start_v))
    k_shifted, v_shifted = _shift_in(k, start_k), _shift_in(v, start_v)
    out = F.scaled_dot_product_attention(q, k_shifted, v_shifted, is_causal=True, scale=scale, dropout_p=dropout_p)
    return out.to(dtype)


def new_kv_cache(
    start_k: torch.Tensor, start_v: torch.Tensor, batch_size: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty key/value caches for sampling a sequence of ``length`` positions one at a time.

    Returns ``(k_cache [B, heads, length, d], v_cache [B, heads, length, d_v])`` with slot 0 holding
    the start key/value. To generate position ``p``: ``attend_to_cache(q_p, k_cache, v_cache, slots <= p)``,
    then, if ``p + 1 < length``, store position ``p``'s key/value in slot ``p + 1`` (the last
    position's key is never attended to).
    """
    k_cache = start_k.new_empty(batch_size, start_k.shape[0], length, start_k.shape[1])
    v_cache = start_v.new_empty(batch_size, start_v.shape[0], length, start_v.shape[1])
    reset_kv_cache(k_cache, v_cache, start_k, start_v)
    return k_cache, v_cache


def reset_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, start_k: torch.Tensor, start_v: torch.Tensor) -> None:
    """Empty the caches of :func:`new_kv_cache` in place: zeros, and the start key/value in slot 0."""
    for cache, start in ((k_cache, start_k), (v_cache, start_v)):
        cache.zero_()
        cache[:, :, 0] = start


def attend_to_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One query step of cached sampling: ``q [B, heads, 1, d]`` attends to the visible cache slots.

    The cache layout is :func:`new_kv_cache`'s (shifted keys); for position ``p`` the visible slots
    are ``0 .. p`` (``visible = arange(S) <= p``). A boolean mask of fixed shape, rather than a
    slice that grows each step, keeps every step the same fixed-shape ops (capturable in a CUDA
    graph). Returns ``[B, heads, 1, d_v]``.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"attend_to_cache: q must be [B, heads, 1, d], got {tuple(q.shape)}")
    if visible.shape != (k_cache.shape[2],) or visible.dtype != torch.bool:
        raise ValueError(f"attend_to_cache: visible must be a bool mask of shape [{k_cache.shape[2]}], "
                         f"got {visible.dtype} {tuple(visible.shape)}")
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible[None, None, None, :], scale=scale)


def fused_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Which fused SDPA kernel accepts these inputs with ``is_causal=True``: "flash", "cudnn" or None.

    Runs the attention once under each single-backend restriction; a call that succeeds under
    ``sdpa_kernel([FLASH_ATTENTION])`` (or ``[CUDNN_ATTENTION]``) did not need the math fallback.
    Meant for tests and benchmarks, not the training path.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, sdp_backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with warnings.catch_warnings(), sdpa_kernel([sdp_backend]):
                warnings.simplefilter("ignore")  # "kernel not used because ..." for the rejected ones
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return name
        except RuntimeError:
            continue
    return None

