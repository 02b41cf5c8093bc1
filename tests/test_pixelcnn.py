"""Gated PixelCNN prior: config checks, causality (via input gradients), conditioning, training."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from prior_settings import split_settings, tiny_prior

from vqgen.configtools import from_dict
from vqgen.errors import ConfigError, DataError
from vqgen.kernels.causal_attention import strictly_causal_attention
from vqgen.metrics.image import bits_per_dim
import vqgen.models.pixelcnn as pixelcnn
from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout, padded_conv

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (8, 8)


def top_config(**overrides) -> dict:
    """Tiny top prior's settings (PriorConfig and PriorLayout fields): class-conditional, attention
    after layers 1 and 3."""
    base = dict(
        num_codes=16, shape=SHAPE, channels=32, num_layers=4, kernel_size=5, attention_every=2,
        num_heads=4, dropout=0.0, num_classes=3,
    )
    return {**base, **overrides}


def bottom_config(**overrides) -> dict:
    """Tiny bottom prior's settings: conditioned on a 4x4 top map through a one-block conditioning stack."""
    base = dict(
        num_codes=16, shape=SHAPE, channels=32, num_layers=4, kernel_size=5, dropout=0.0,
        condition_num_codes=8, condition_shape=(4, 4), condition_channels=16, condition_res_blocks=1,
    )
    return {**base, **overrides}


def make_inputs(cfg: PriorLayout, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.num_codes, (batch, *cfg.shape), generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    condition = (
        torch.randint(0, cfg.condition_num_codes, (batch, *cfg.condition_shape), generator=g)
        if cfg.condition_num_codes
        else None
    )
    return codes, labels, condition


def input_gradient_map(prior: GatedPixelCNN, cfg: PriorLayout, i: int, j: int) -> torch.Tensor:
    """``[H, W]`` total |d logits[:, :, i, j] / d input embedding| per input position."""
    codes, labels, condition = make_inputs(cfg, batch=1)
    x = prior.embed_codes(codes).detach().requires_grad_(True)
    logits = prior.forward_embedded(x, labels, condition)
    # A random projection of the logits so no gradient cancels by symmetry.
    weights = torch.randn(cfg.num_codes, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((logits[0, :, i, j] * weights).sum(), x)
    return grad[0].abs().sum(dim=0)


@pytest.mark.parametrize("make_config", [top_config, bottom_config], ids=["top-attention", "bottom"])
@pytest.mark.parametrize("position", [(3, 3), (4, 5), (6, 4)])
def test_logits_depend_only_on_earlier_positions(make_config, position):
    torch.manual_seed(0)
    prior = tiny_prior(make_config()).eval()
    cfg = prior.layout
    i, j = position
    grad = input_gradient_map(prior, cfg, i, j)
    width = cfg.shape[1]
    raster = torch.arange(grad.numel()).reshape(grad.shape)
    # The position itself and everything after it in raster order: exactly zero.
    assert torch.all(grad[raster >= i * width + j] == 0)
    # Left, above, above-left, above-right: seen (no blind spot).
    for di, dj in [(0, -1), (-1, 0), (-1, -1), (-1, 1)]:
        assert grad[i + di, j + dj] > 0, f"position {(i + di, j + dj)} not seen from {position}"
    # Beyond a single layer's window (3 rows up, 3 columns left): the receptive field grows.
    assert grad[i - 3, j - 3] > 0


def test_blind_spot_free_up_right_beyond_one_layer():
    """Top-right of the current position, 3 rows up and 3 columns right, reached by the 4-layer stack."""
    torch.manual_seed(0)
    prior = tiny_prior(bottom_config()).eval()
    cfg = prior.layout
    grad = input_gradient_map(prior, cfg, 5, 3)
    assert grad[2, 6] > 0
    assert grad[4, 7] > 0  # end of the previous row


def test_strictly_causal_attention_sees_only_earlier_positions():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    k.requires_grad_(True)
    v.requires_grad_(True)
    start = torch.randn(2, 3, 4)
    out = strictly_causal_attention(q, k, v, start[0], start[1])
    assert out.shape == (2, 3, 10, 4)
    (gk, gv) = torch.autograd.grad(out[:, :, 6].sum(), (k, v))
    assert torch.all(gk[:, :, 6:] == 0) and torch.all(gv[:, :, 6:] == 0)
    assert torch.all(gv[:, :, :6].abs().sum(dim=-1) > 0)
    # Position 0 sees only the start slot: its output is the start value.
    assert torch.allclose(out[:, :, 0], start[1].expand(2, 3, 4), atol=1e-6)


def test_bottom_prior_depends_on_condition_and_label():
    torch.manual_seed(0)
    prior = tiny_prior(bottom_config(num_classes=4)).eval()
    cfg = prior.layout
    codes, labels, condition = make_inputs(cfg, batch=2)
    with torch.no_grad():
        base = prior(codes, labels, condition)
        other_condition = prior(codes, labels, (condition + 1) % cfg.condition_num_codes)
        other_label = prior(codes, (labels + 1) % cfg.num_classes, condition)
    assert base.shape == (2, cfg.num_codes, *cfg.shape)
    assert (base - other_condition).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (base - other_label).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # The last top code covers bottom rows 6-7 (rows 5-7 after the 3x3 conv of the conditioning
    # stack); its bias enters the layers there, so logits of rows 0-4 cannot change.
    changed = condition.clone()
    changed[:, -1, -1] = (changed[:, -1, -1] + 1) % cfg.condition_num_codes
    with torch.no_grad():
        delta = (prior(codes, labels, changed) - base).abs().amax(dim=(0, 1))
    assert torch.all(delta[:5] == 0)
    assert delta[5:].max() > 1e-5


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    prior = tiny_prior(top_config(dropout=0.1)).train()
    cfg = prior.layout
    codes, labels, _ = make_inputs(cfg, batch=8)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(prior(codes, labels).float(), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Uniform over 16 codes is ln 16 = 2.77 nats; a fixed batch is memorised well below it.
    assert losses[0] > 2.0
    assert losses[-1] < 0.6 * losses[0]


def test_bits_per_dim():
    assert bits_per_dim(math.log(2.0)) == pytest.approx(1.0)
    assert torch.allclose(bits_per_dim(torch.tensor([math.log(16.0)])), torch.tensor([4.0]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(kernel_size=4), "kernel_size"),
        (dict(attention_every=2, channels=30, num_heads=4), "num_heads"),
        (dict(shape=(8,)), "shape"),
        (dict(dropout=1.0), "dropout"),
        (dict(condition_shape=(4, 4)), "condition_shape"),
        (dict(condition_num_codes=8, condition_shape=(4, 4), condition_res_blocks=-1), "condition_res_blocks"),
        (dict(condition_num_codes=8, condition_shape=(3, 3)), "condition_shape"),
        (dict(num_codes=1), "num_codes"),
    ],
)
def test_config_rejects_bad_values(overrides, key):
    """Each bad value is refused by the class that holds it: the architecture by PriorConfig, the
    sizes (codebook, shapes, conditioning map) by PriorLayout."""
    owner = PriorLayout if key in {f.name for f in fields(PriorLayout)} else PriorConfig
    # The same settings, split between the two classes; the one holding the bad value refuses it.
    with pytest.raises(ConfigError) as err:
        split_settings({"num_codes": 512, "shape": (32, 32), **overrides})
    assert err.value.key == key
    # And directly, the class that owns the key (with the other class's keys left out).
    own = {k: v for k, v in overrides.items() if k in {f.name for f in fields(owner)}}
    base = {"num_codes": 512, "shape": (32, 32)} if owner is PriorLayout else {}
    with pytest.raises(ConfigError) as err:
        owner(**{**base, **own})
    assert err.value.key == key


def test_config_loads_from_dict_with_dotted_key():
    layout = from_dict(PriorLayout, {"num_codes": 16, "shape": [16, 16], "condition_num_codes": 8,
                                     "condition_shape": [8, 8]})
    assert layout.shape == (16, 16) and layout.condition_shape == (8, 8)
    with pytest.raises(ConfigError, match="prior.top.kernel_size"):
        from_dict(PriorConfig, {"kernel_size": 6}, prefix="prior.top")


def test_bad_inputs_raise_data_error_naming_the_input():
    prior = tiny_prior(bottom_config(num_classes=2))
    cfg = prior.layout
    codes, labels, condition = make_inputs(cfg, batch=2)
    with pytest.raises(DataError, match="codes"):
        prior(codes[:, :4], labels, condition)
    with pytest.raises(DataError, match="codes"):
        prior(codes + cfg.num_codes, labels, condition)
    with pytest.raises(DataError, match="labels"):
        prior(codes, None, condition)
    with pytest.raises(DataError, match="condition"):
        prior(codes, labels, condition[:1])
    with pytest.raises(DataError, match="condition"):
        prior(codes, labels, None)
    # Out of range, each input named with its bound and the values found.
    with pytest.raises(DataError, match=r"codes: values must lie in \[0, %d\), got \[-1, " % cfg.num_codes):
        prior(torch.where(codes == codes[0, 0, 0], -1, codes), labels, condition)
    with pytest.raises(DataError, match=r"labels: values must lie in \[0, 2\), got \[\d+, 2\]"):
        prior(codes, torch.tensor([0, 2]), condition)
    with pytest.raises(DataError, match=r"condition: values must lie in \[0, %d\)" % cfg.condition_num_codes):
        prior(codes, labels, condition + cfg.condition_num_codes)


def test_a_training_forward_reads_back_one_value(host_reads):
    """The range checks of codes, labels and condition share one read back to the host: on a GPU
    each read makes the CPU wait for the device, once per step instead of twice per input."""
    prior = tiny_prior(bottom_config(num_classes=2)).train()
    cfg = prior.layout
    codes, labels, condition = make_inputs(cfg, batch=2)
    with host_reads() as reads:
        F.cross_entropy(prior(codes, labels, condition).float(), codes).backward()
    assert reads.count == 1


def test_kernel_backend_reaches_the_attention(monkeypatch):
    """``kernel_backend = "torch"`` selects the reference path in every kernel, attention included."""
    import vqgen.models.attention as attention_module

    seen = []
    real = attention_module.strictly_causal_attention

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("backend", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "strictly_causal_attention", spy)
    for backend in ("torch", "auto"):
        prior = tiny_prior(top_config(kernel_backend=backend)).eval()
        codes = torch.randint(0, 16, (2, *SHAPE))
        prior(codes, labels=torch.tensor([0, 1]))
        assert seen and set(seen) == {backend}
        seen.clear()


@pytest.mark.parametrize(
    "kernel, padding",
    [((2, 3), (1, 1, 1, 0)), ((1, 1), (0, 0, 1, -1)), ((1, 2), (2, -1, 0, 0)), ((3, 5), (2, 2, 2, 0))],
    ids=["vertical", "link", "horizontal-first", "vertical-k5"],
)
def test_padded_conv_as_one_matrix_product_matches_the_convolution(kernel, padding):
    """Under CPU autocast on a small map, the shifted windows times the reshaped weight give
    ``conv(F.pad(x))`` and its gradients (against fp32 on the same bf16-rounded values)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, kernel)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.bfloat16().float())
        conv.bias.copy_(conv.bias.bfloat16().float())
    x = torch.randn(3, 6, 4, 4).bfloat16().float().requires_grad_(True)
    upstream = torch.randn(3, 10, 4, 4).bfloat16().float()

    want = conv(F.pad(x, padding))
    want_grads = torch.autograd.grad((want * upstream).sum(), (x, conv.weight, conv.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = padded_conv(x, conv, padding)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()  # the matmul path
    got_grads = torch.autograd.grad((got.float() * upstream).sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    for name, g, w in zip(("x", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=5e-2, rtol=2e-2, msg=name)


def test_padded_conv_keeps_the_convolution_in_fp32_and_on_large_maps():
    conv = torch.nn.Conv2d(4, 8, (2, 3))
    small, large = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 16, 16)
    assert torch.equal(padded_conv(small, conv, (1, 1, 1, 0)), conv(F.pad(small, (1, 1, 1, 0))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = padded_conv(large, conv, (1, 1, 1, 0))
        want = conv(F.pad(large, (1, 1, 1, 0)))
    assert torch.equal(got, want)


def test_prior_under_cpu_autocast_matches_the_convolution_path(monkeypatch):
    """The whole top prior (8x8 here, the limit raised to take it) under bf16 autocast: the
    matrix-product path gives the loss and gradients of the library convolutions, to bf16 accuracy."""
    torch.manual_seed(0)
    prior = tiny_prior(top_config()).train()
    codes, labels, _ = make_inputs(prior.layout, batch=4)
    results = []
    for largest in (64, 0):  # 0: no map is small enough, every layer convolves
        monkeypatch.setattr(pixelcnn, "_MATMUL_CONV_MAX_POSITIONS", largest)
        prior.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(prior(codes, labels).float(), codes)
        loss.backward()
        results.append((loss.detach(), prior.layers[0].vertical.weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-2, rtol=1e-2)
    assert F.cosine_similarity(grad_a.flatten(), grad_b.flatten(), dim=0) > 0.99
