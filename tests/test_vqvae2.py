"""Hierarchical VQ-VAE-2 (two levels by default, any depth by config): shapes, top-to-bottom conditioning, encode/decode round trip, training, errors."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from vqgen.configtools import from_dict, to_dict
from vqgen.errors import ConfigError, DataError
from vqgen.models.quantize import QuantizerConfig
from vqgen.models.vqvae2 import VQVAE2, LevelConfig, VQVAEConfig

TINY = dict(hidden_channels=16, res_channels=8, num_res_blocks=1)
TINY_QUANTIZER = dict(num_codes=32, code_dim=8)
QUANTIZER_FIELDS = frozenset(f.name for f in fields(QuantizerConfig))


def tiny_config(**overrides) -> VQVAEConfig:
    """TINY with ``overrides``; the quantizer's settings among them go to the nested quantizer."""
    quantizer = {**TINY_QUANTIZER, **{k: v for k, v in overrides.items() if k in QUANTIZER_FIELDS}}
    rest = {k: v for k, v in overrides.items() if k not in QUANTIZER_FIELDS}
    return VQVAEConfig(**{**TINY, **rest}, quantizer=QuantizerConfig(**quantizer))


def _model(seed: int = 0, **overrides) -> VQVAE2:
    torch.manual_seed(seed)
    return VQVAE2(tiny_config(**overrides))


def _images(batch: int, size: int, channels: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=gen) * 2 - 1


@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes(size):
    model = _model()
    x = _images(2, size)
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.codes["top"].shape == (2, size // 8, size // 8) and out.codes["top"].dtype == torch.int64
    assert out.codes["bottom"].shape == (2, size // 4, size // 4)
    assert model.latent_shapes(size) == ((size // 8, size // 8), (size // 4, size // 4))
    for scalar in (out.loss, out.recon_loss, out.commitment_loss, out.perplexity["top"], out.usage["bottom"]):
        assert scalar.dim() == 0 and torch.isfinite(scalar)
    expected = out.recon_loss + model.config.latent_loss_weight * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)


def test_grayscale_input():
    model = _model(in_channels=1)
    assert model(_images(2, 16, channels=1)).recon.shape == (2, 1, 16, 16)


def test_bottom_codes_depend_on_top_path():
    model = _model().eval()
    x = _images(4, 32)
    top, bottom = model.encode(x)
    # Same images, same bottom encoder; only the top codebook changes.
    with torch.no_grad():
        model.quantizer_top.codebook.mul_(-3.0)
    top2, bottom2 = model.encode(x)
    assert not torch.equal(bottom, bottom2)


def test_decode_codes_matches_forward_in_eval():
    model = _model().eval()
    x = _images(3, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
    codes_top, codes_bottom = model.encode(x)
    assert torch.equal(codes_top, out.codes["top"]) and torch.equal(codes_bottom, out.codes["bottom"])
    torch.testing.assert_close(model.decode_codes(codes_top, codes_bottom), out.recon, atol=1e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_encode_never_updates_codebooks_in_training_mode():
    model = _model().train()
    before = model.quantizer_bottom.codebook.clone()
    model.encode(_images(2, 32))
    assert torch.equal(model.quantizer_bottom.codebook, before)
    assert int(model.quantizer_bottom.step) == 0
    model(_images(2, 32))
    assert int(model.quantizer_bottom.step) == 1 and int(model.quantizer_top.step) == 1


def test_training_steps_read_nothing_back_from_the_device(host_reads):
    """Forward and backward of the whole model, between codebook restarts, never wait for the device."""
    model = _model().train()
    x = _images(2, 32)
    model(x).loss.backward()  # the first step initialises the codebooks from this batch
    with host_reads() as reads:
        for _ in range(3):
            model(x).loss.backward()
    assert reads.count == 0


def test_adam_steps_reduce_loss():
    # The random initial codebook gives a fixed, high starting loss to measure the optimiser against
    # (the first-batch codebook initialisation has its own test).
    model = _model(data_init=False)
    # Smooth images (bilinear upsampling of 4x4 noise): learnable in a few steps, unlike pixel noise.
    coarse = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # Better than the best constant (per-channel mean) image: the codes carry information.
    mean_baseline = (x - x.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean().item()
    assert out.recon_loss.item() < 0.95 * mean_baseline


def test_bf16_autocast_and_channels_last():
    model = _model().to(memory_format=torch.channels_last)
    x = _images(2, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.recon.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert model.quantizer_top.codebook.dtype == torch.float32
    out.loss.backward()
    grad = model.encoder_bottom[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_construction_is_deterministic():
    a, b = _model(seed=5).state_dict(), _model(seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _model(seed=6).state_dict()
    assert not torch.equal(a["quantizer_top.codebook"], c["quantizer_top.codebook"])


def test_bad_image_size_is_a_clear_error():
    model = _model()
    with pytest.raises(DataError, match="30x30 is not divisible by 8"):
        model(_images(1, 30))
    with pytest.raises(DataError, match="expected images of shape"):
        model(_images(1, 32, channels=1))
    with pytest.raises(ConfigError, match="^image_size:"):
        model.latent_shapes(36)
    with pytest.raises(DataError, match="codes must lie in"):
        model.decode_codes(torch.full((1, 4, 4), 32), torch.zeros(1, 8, 8, dtype=torch.long))


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="^hidden_channels:"):
        VQVAEConfig(hidden_channels=15)
    with pytest.raises(ConfigError, match="^decay:"):
        QuantizerConfig(decay=1.5)
    with pytest.raises(TypeError):
        VQVAEConfig(decay=0.9)  # the quantizer's settings are in its own section now
    with pytest.raises(ConfigError, match="vqvae.quantizer.decay"):
        from_dict(VQVAEConfig, {"quantizer": {"decay": 1.5}}, prefix="vqvae")
    with pytest.raises(ConfigError, match="vqvae.quantizer.num_codes"):
        from_dict(VQVAEConfig, {"quantizer": {"num_codes": 0}}, prefix="vqvae")
    with pytest.raises(ConfigError, match="vqvae.num_codes: has moved: it is now vqvae.quantizer.num_codes"):
        from_dict(VQVAEConfig, {"num_codes": 0}, prefix="vqvae")
    cfg = tiny_config(kernel_backend="torch")
    assert from_dict(VQVAEConfig, to_dict(cfg)) == cfg
    assert cfg.code_dim == 8
    assert cfg.quantizer_config("top").num_codes == 32 and cfg.quantizer_config("top").kernel_backend == "torch"
    assert cfg.quantizer_config("bottom").num_codes == 32
    with pytest.raises(ConfigError, match="bottom_num_codes"):
        VQVAEConfig(bottom_num_codes=-1)


def test_levels_can_have_different_codebook_sizes():
    model = VQVAE2(tiny_config(bottom_num_codes=8)).eval()
    assert model.quantizer_top.num_codes == 32 and model.quantizer_bottom.num_codes == 8
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        top, bottom = model.encode(images)
        assert int(bottom.max()) < 8
        model.decode_codes(top, bottom)
        with pytest.raises(DataError, match=r"bottom codes must lie in \[0, 8\)"):
            model.decode_codes(top, torch.full_like(bottom, 8))
        model.decode_codes(torch.full_like(top, 31), bottom)  # 31 is a valid top code


THREE_LEVELS = (LevelConfig(name="top", downsample=16, num_codes=16), LevelConfig(name="middle", downsample=8),
                LevelConfig(name="bottom", downsample=4, num_codes=8))


def test_the_default_two_levels_are_one_case_of_the_list():
    """Levels spelled out as the defaults give the same model: same weight names, same initial
    weights for a seed, so two-level checkpoints load into either."""
    default = _model()
    explicit = _model(levels=(LevelConfig(name="top", downsample=8), LevelConfig(name="bottom", downsample=4)))
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [name for name, _ in default.named_children()][:3] == ["encoder_bottom", "encoder_top", "pre_quant_top"]
    assert tiny_config().hierarchy == (LevelConfig(name="top", downsample=8, num_codes=32),
                                       LevelConfig(name="bottom", downsample=4, num_codes=32))


def test_three_levels_encode_decode_and_train():
    model = _model(levels=THREE_LEVELS)
    x = _images(2, 64)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.codes.items()} == {"top": (2, 4, 4), "middle": (2, 8, 8), "bottom": (2, 16, 16)}
    assert int(out.codes["top"].max()) < 16 and int(out.codes["bottom"].max()) < 8
    assert model.latent_shapes(64) == ((4, 4), (8, 8), (16, 16))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        codes = model.encode(x)
        torch.testing.assert_close(model.decode_codes(*codes), model(x).recon, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="takes 3 code maps"):
        model.decode_codes(*codes[1:])
    with pytest.raises(DataError, match="needs middle"):
        model.decode_codes(codes[0], codes[0], codes[2])


def _bottom_quantizer_input(model: VQVAE2, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.quantizer_bottom.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.encode(x)
    handle.remove()
    return seen[0]


def test_each_level_is_quantized_given_every_level_above():
    """What the bottom quantizer sees changes when either level above changes its codebook."""
    model = _model(levels=THREE_LEVELS).eval()
    x = _images(4, 64)
    bottom = _bottom_quantizer_input(model, x)
    for level in ("top", "middle"):
        changed = _model(levels=THREE_LEVELS).eval()
        with torch.no_grad():
            getattr(changed, f"quantizer_{level}").codebook.mul_(-3.0)
        assert not torch.allclose(_bottom_quantizer_input(changed, x), bottom), level


@pytest.mark.parametrize("levels, match", [
    ([{"name": "top", "downsample": 4}, {"name": "bottom", "downsample": 8}], "must decrease"),
    ([{"name": "top", "downsample": 6}], r"levels\[0\].downsample: must be a power of two"),
    ([{"name": "a", "downsample": 8}, {"name": "a", "downsample": 4}], "duplicate names"),
    ([{"name": "label", "downsample": 8}], "identifier other than 'label'"),
    ([{"name": "top", "downsample": 8, "codes": 3}], r"levels\[0\].codes: unknown key"),
])
def test_bad_levels_name_the_key(levels, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(VQVAEConfig, {"levels": levels}, prefix="vqvae.model")


def test_a_three_level_config_round_trips_and_refuses_bottom_num_codes():
    cfg = tiny_config(levels=THREE_LEVELS)
    assert from_dict(VQVAEConfig, to_dict(cfg)) == cfg
    assert cfg.downsample == 16 and cfg.level_num_codes("middle") == 32
    with pytest.raises(ConfigError, match="^bottom_num_codes: is for the default two levels"):
        tiny_config(levels=THREE_LEVELS, bottom_num_codes=4)
