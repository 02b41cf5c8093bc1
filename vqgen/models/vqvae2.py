"""Hierarchical VQ-VAE-2 (Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2").

Levels run from the top (coarsest code map) to the bottom (finest); ``vqvae.model.levels`` lists
them with each one's downsampling factor (image side / code map side). The default is the paper's
two levels, top at 1/8 and bottom at 1/4. Data flow for an image ``x [B, C, H, W]`` in [-1, 1]::

    x ─encoder_bottom─▶ enc_bottom [hidden, H/f_bottom] ─encoder_<above>─▶ ... ─encoder_top─▶ enc_top
    enc_top ─pre_quant_top─▶ quantizer_top ─▶ q_top ─decoder_top─▶ cond [D, H/f_next]
    cat(cond, enc_next) ─pre_quant_next─▶ quantizer_next ─▶ q_next ─decoder_next(cat(q_next, cond))─▶ ...
    cat(upsample_top(q_top), ..., q_bottom) ─decoder─▶ recon [C, H]

Each level below the top is quantized *given* every level above it (its encoder features are
concatenated with the decoded codes above), so it only has to encode the detail they miss. With
two levels this is exactly the paper's model (``cond`` is the decoded top codes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.configtools import added_field
from vqgen.errors import ConfigError, DataError
from vqgen.models.quantize import EMAQuantizer, QuantizerConfig, QuantizerOutput


@dataclass(kw_only=True)
class LevelConfig:
    """One level of the hierarchy (``[[vqvae.model.levels]]``)."""

    name: str
    """The level's name: its code store field, ``prior.<name>`` section and ``train-prior-<name>``
    stage (a Python identifier)."""
    downsample: int
    """Image side / code map side: a power of two, larger than the next level's."""
    num_codes: int = 0
    """Codebook size; 0: ``quantizer.num_codes``."""

    def __post_init__(self):
        if not self.name.isidentifier() or self.name == "label":
            raise ConfigError("name", f"must be an identifier other than 'label', got {self.name!r}")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ConfigError("downsample", f"must be a power of two >= 2, got {self.downsample}")
        if self.num_codes < 0:
            raise ConfigError("num_codes", f"must be >= 0, got {self.num_codes}")


@dataclass(kw_only=True)
class VQVAEConfig:
    """Architecture of :class:`VQVAE2`. Defaults are the paper's 256x256 sizes."""

    in_channels: int = 3
    """Image channels (3 for RGB, 1 for grayscale)."""
    hidden_channels: int = 128
    """Width of the encoders and decoders (even: the outer stride-2 layers use half of it)."""
    res_channels: int = 32
    """Bottleneck width inside each residual block."""
    num_res_blocks: int = 2
    """Residual blocks per encoder and decoder."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """Every level's EMA quantizer (codebook size K, unless a level sets its own, and code dimension D)."""
    bottom_num_codes: int = 0
    """Codebook size of the bottom level of the default two; 0: the same as ``quantizer.num_codes``.
    A smaller bottom codebook pushes more of the image's information into the top codes, whose
    prior is cheaper to train. With ``levels``, each level sets its own ``num_codes`` instead."""
    levels: tuple[LevelConfig, ...] = added_field(())
    """The hierarchy, top level first: ``{name, downsample, num_codes}`` each (e.g. the paper's
    FFHQ-1024 model: top 32, middle 16, bottom 8). Empty: the paper's two levels, ``top`` at 1/8 and
    ``bottom`` at 1/4 of the image side."""
    latent_loss_weight: float = 1.0
    """Weight of the summed commitment losses in the total loss."""

    # The quantizer's settings sat at this level before they became their own section.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        name: f"quantizer.{name}"
        for name in ("num_codes", "code_dim", "decay", "eps", "commitment_cost", "dead_code_threshold",
                     "restart_every", "data_init", "kernel_backend")
    }

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ConfigError("in_channels", f"must be >= 1, got {self.in_channels}")
        if self.hidden_channels < 2 or self.hidden_channels % 2:
            raise ConfigError("hidden_channels", f"must be an even number >= 2, got {self.hidden_channels}")
        if self.res_channels < 1:
            raise ConfigError("res_channels", f"must be >= 1, got {self.res_channels}")
        if self.num_res_blocks < 0:
            raise ConfigError("num_res_blocks", f"must be >= 0, got {self.num_res_blocks}")
        if self.latent_loss_weight < 0:
            raise ConfigError("latent_loss_weight", f"must be >= 0, got {self.latent_loss_weight}")
        if self.bottom_num_codes < 0:
            raise ConfigError("bottom_num_codes", f"must be >= 0, got {self.bottom_num_codes}")
        if self.levels and self.bottom_num_codes:
            raise ConfigError("bottom_num_codes", "is for the default two levels: with levels, set the "
                                                  "bottom level's num_codes")
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise ConfigError("levels", f"has duplicate names: {names}")
        factors = [level.downsample for level in self.levels]
        if any(above <= below for above, below in zip(factors, factors[1:])):
            raise ConfigError("levels", f"downsampling factors must decrease from the top level down, got {factors}")

    @property
    def code_dim(self) -> int:
        return self.quantizer.code_dim

    @property
    def hierarchy(self) -> tuple[LevelConfig, ...]:
        """The levels, top first, each with its codebook size resolved."""
        levels = self.levels or (LevelConfig(name="top", downsample=8),
                                 LevelConfig(name="bottom", downsample=4, num_codes=self.bottom_num_codes))
        return tuple(replace(level, num_codes=level.num_codes or self.quantizer.num_codes) for level in levels)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.hierarchy)

    def level(self, name: str) -> LevelConfig:
        for level in self.hierarchy:
            if level.name == name:
                return level
        raise ConfigError("levels", f"no level named {name!r} (levels: {', '.join(self.level_names)})")

    def level_num_codes(self, name: str) -> int:
        """Codebook size of level ``name``."""
        return self.level(name).num_codes

    def quantizer_config(self, name: str) -> QuantizerConfig:
        """The config of one level's quantizer (the levels differ only in codebook size)."""
        return replace(self.quantizer, num_codes=self.level_num_codes(name))

    @property
    def downsample(self) -> int:
        """The image side must be a multiple of this: the top level's factor."""
        return self.hierarchy[0].downsample


def upgrade_export_config(config: dict) -> dict[str, dict]:
    """The constructor arguments of a ``model.json`` written before the quantizer had its own section."""
    moved = {key: config[key] for key in VQVAEConfig.MOVED_KEYS if key in config}
    rest = {key: value for key, value in config.items() if key not in moved}
    return {"config": {**rest, "quantizer": {**rest.get("quantizer", {}), **moved}} if moved else rest}


@dataclass
class VQVAEOutput:
    """What :meth:`VQVAE2.forward` returns. Scalars are 0-dim tensors; per-level dicts are keyed by
    level name, top first."""

    recon: torch.Tensor
    """``[B, C, H, W]`` reconstruction (in the autocast dtype when autocast is on)."""
    loss: torch.Tensor
    """``recon_loss + latent_loss_weight * commitment_loss``: what to backpropagate."""
    recon_loss: torch.Tensor
    """Mean squared error between ``recon`` and the input, in fp32."""
    commitment_loss: torch.Tensor
    """Sum of every level's commitment loss."""
    codes: dict[str, torch.Tensor]
    """``[B, H/f, W/f]`` int64 per level."""
    perplexity: dict[str, torch.Tensor]
    usage: dict[str, torch.Tensor]
    """Fraction of each level's codebook used in this batch."""


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` with a ``res_channels`` bottleneck."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(res_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: x is still needed for the skip.
        return x + self.conv_out(F.relu(self.conv_in(F.relu(x))))


def _res_stack(channels: int, res_channels: int, num_blocks: int) -> list[nn.Module]:
    """Residual blocks followed by the ReLU that closes every stack in the paper's design."""
    return [*(ResBlock(channels, res_channels) for _ in range(num_blocks)), nn.ReLU()]


def _halvings(factor: int) -> int:
    """How many stride-2 steps make a downsampling ``factor`` (a power of two)."""
    return factor.bit_length() - 1


def _image_encoder(cfg: VQVAEConfig, steps: int) -> nn.Sequential:
    """Image ``[C, H]`` → features ``[hidden, H/2^steps]``: stride-2 4x4 convs (the last one to
    ``hidden``, the others to ``hidden/2``), a 3x3 conv, residual blocks."""
    half, widths = cfg.hidden_channels // 2, [cfg.in_channels]
    widths += [half] * (steps - 1) + [cfg.hidden_channels]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(
        *layers,
        nn.Conv2d(cfg.hidden_channels, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
    )


def _feature_encoder(cfg: VQVAEConfig, steps: int) -> nn.Sequential:
    """The level below's features ``[hidden, h]`` → this level's ``[hidden, h/2^steps]``."""
    half = cfg.hidden_channels // 2
    layers: list[nn.Module] = []
    for i in range(steps):
        layers += [nn.Conv2d(cfg.hidden_channels if i == 0 else half, half, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(
        *layers,
        nn.Conv2d(half, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
    )


def _transposed_steps(c_in: int, c_mid: int, c_out: int, steps: int) -> list[nn.Module]:
    """``steps`` stride-2 4x4 transposed convs, ``c_in`` → ``c_mid`` ... → ``c_out``, ReLU between."""
    widths = [c_in] + [c_mid] * (steps - 1) + [c_out]
    layers: list[nn.Module] = []
    for c_a, c_b in zip(widths, widths[1:]):
        layers += [nn.ConvTranspose2d(c_a, c_b, 4, stride=2, padding=1), nn.ReLU()]
    return layers[:-1]


def _condition_decoder(cfg: VQVAEConfig, in_channels: int, steps: int) -> nn.Sequential:
    """A level's codes (with the conditioning from above) ``[in, h]`` → ``[D, h*2^steps]``: what
    conditions the next level's quantizer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
        *_transposed_steps(cfg.hidden_channels, cfg.hidden_channels, cfg.code_dim, steps),
    )


def _upsampler(cfg: VQVAEConfig, steps: int) -> nn.Module:
    """A level's quantized map ``[D, h]`` → ``[D, h*2^steps]``, the bottom level's resolution."""
    layers = _transposed_steps(cfg.code_dim, cfg.code_dim, cfg.code_dim, steps)
    return layers[0] if steps == 1 else nn.Sequential(*layers)


def _image_decoder(cfg: VQVAEConfig, num_levels: int, steps: int) -> nn.Sequential:
    """Every level at the bottom's resolution ``[L*D, h]`` → image ``[C, h*2^steps]``."""
    return nn.Sequential(
        nn.Conv2d(num_levels * cfg.code_dim, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
        *_transposed_steps(cfg.hidden_channels, cfg.hidden_channels // 2, cfg.in_channels, steps),
    )


class VQVAE2(nn.Module):
    """Hierarchical VQ-VAE with one code map per level of ``config.hierarchy`` (top first).

    The codebooks are EMA buffers updated in ``forward`` while ``self.training``; the rest is trained
    by backpropagating ``forward(x).loss``. Each level's modules are attributes named after it
    (``encoder_top``, ``quantizer_bottom``, ...), so the two-level model's weights keep the names
    they have always had.

    Example:
        >>> model = VQVAE2(VQVAEConfig(hidden_channels=32, quantizer=QuantizerConfig(num_codes=64, code_dim=16)))
        >>> out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
        >>> out.codes["top"].shape, out.codes["bottom"].shape
        (torch.Size([2, 4, 4]), torch.Size([2, 8, 8]))
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        levels = config.hierarchy
        self.level_names = tuple(level.name for level in levels)
        bottom = levels[-1]
        # Built in the order the two-level model always was (encoders bottom up, then each level's
        # quantization top down, then the decoding side): the same seed gives the same initial
        # weights, and optimizer states saved by older versions still match their parameters.
        self.add_module(f"encoder_{bottom.name}", _image_encoder(config, _halvings(bottom.downsample)))
        for level, below in reversed(list(zip(levels, levels[1:]))):
            steps = _halvings(level.downsample // below.downsample)
            self.add_module(f"encoder_{level.name}", _feature_encoder(config, steps))
        for i, level in enumerate(levels):
            extra = config.code_dim if i > 0 else 0  # the decoded codes above, concatenated
            self.add_module(f"pre_quant_{level.name}", nn.Conv2d(config.hidden_channels + extra, config.code_dim, 1))
            self.add_module(f"quantizer_{level.name}", EMAQuantizer(config.quantizer_config(level.name)))
            if level is not bottom:
                steps = _halvings(level.downsample // levels[i + 1].downsample)
                self.add_module(f"decoder_{level.name}", _condition_decoder(config, config.code_dim + extra, steps))
        for level in levels[:-1]:
            self.add_module(f"upsample_{level.name}", _upsampler(config, _halvings(level.downsample // bottom.downsample)))
        self.decoder = _image_decoder(config, len(levels), _halvings(bottom.downsample))

    def _part(self, kind: str, level: str) -> nn.Module:
        return getattr(self, f"{kind}_{level}")

    def latent_shapes(self, image_size: int) -> tuple[tuple[int, int], ...]:
        """Code map sizes ``(H, W)`` of every level, top first, for a square ``image_size``."""
        factor = self.config.downsample
        if image_size < factor or image_size % factor:
            raise ConfigError("image_size", f"must be a positive multiple of {factor}, got {image_size}")
        return tuple((image_size // level.downsample,) * 2 for level in self.config.hierarchy)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise DataError(
                f"expected images of shape [B, {self.config.in_channels}, H, W], got {list(x.shape)}"
            )
        h, w = x.shape[-2:]
        factor = self.config.downsample
        if h % factor or w % factor:
            raise DataError(
                f"image size {h}x{w} is not divisible by {factor}: this VQ-VAE downsamples by "
                f"{factor}; resize or crop the images (e.g. to {h // factor * factor or factor}x"
                f"{w // factor * factor or factor})"
            )

    def _quantize_levels(self, x: torch.Tensor, update: bool) -> list[QuantizerOutput]:
        """Encode and quantize every level, top first; each below the top is conditioned on those above."""
        self._check_images(x)
        features = [self._part("encoder", self.level_names[-1])(x)]
        for name in reversed(self.level_names[:-1]):
            features.append(self._part("encoder", name)(features[-1]))
        features.reverse()  # top first
        outputs, condition = [], None
        for name, feats in zip(self.level_names, features):
            z = self._part("pre_quant", name)(feats if condition is None else torch.cat([condition, feats], dim=1))
            out = self._part("quantizer", name)(z, update=update)
            outputs.append(out)
            if name != self.level_names[-1]:
                codes = out.quantized if condition is None else torch.cat([out.quantized, condition], dim=1)
                condition = self._part("decoder", name)(codes)
        return outputs

    def _decode(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        """Quantized maps ``[B, D, H/f]``, top first → images ``[B, C, H]``."""
        maps = [self._part("upsample", name)(q) for name, q in zip(self.level_names[:-1], quantized[:-1])]
        # Under autocast the upsampled maps are bf16 and the bottom one fp32: cat promotes, the
        # next conv casts back.
        return self.decoder(torch.cat([*maps, quantized[-1]], dim=1))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Reconstruct ``x [B, C, H, W]`` (in [-1, 1]); updates the codebooks when training."""
        outputs = self._quantize_levels(x, update=self.training)
        recon = self._decode([out.quantized for out in outputs])
        recon_loss = F.mse_loss(recon.float(), x.float())
        commitment = sum(out.commitment_loss for out in outputs)
        return VQVAEOutput(
            recon=recon,
            loss=recon_loss + self.config.latent_loss_weight * commitment,
            recon_loss=recon_loss,
            commitment_loss=commitment,
            codes={name: out.codes for name, out in zip(self.level_names, outputs)},
            perplexity={name: out.perplexity for name, out in zip(self.level_names, outputs)},
            usage={name: out.usage for name, out in zip(self.level_names, outputs)},
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Code maps ``[B, H/f, W/f]`` int64 of every level, top first; never updates the codebooks."""
        return tuple(out.codes for out in self._quantize_levels(x, update=False))

    @torch.no_grad()
    def decode_codes(self, *codes: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` from every level's code map ``[B, H/f, W/f]``, top first."""
        levels = self.config.hierarchy
        if len(codes) != len(levels):
            raise DataError(f"decode_codes takes {len(levels)} code maps ({', '.join(self.level_names)}), "
                            f"got {len(codes)}")
        top = codes[0]
        for level, level_codes in zip(levels, codes):
            ratio = levels[0].downsample // level.downsample
            expected = [top.shape[0], top.shape[-2] * ratio, top.shape[-1] * ratio]
            if list(level_codes.shape) != expected:
                raise DataError(f"code maps do not match: top {list(top.shape)} needs {level.name} "
                                f"{expected}, got {list(level_codes.shape)}")
            k = level.num_codes
            if level_codes.numel() and (int(level_codes.min()) < 0 or int(level_codes.max()) >= k):
                raise DataError(f"{level.name} codes must lie in [0, {k}), got "
                                f"[{int(level_codes.min())}, {int(level_codes.max())}]")
        return self._decode([self._part("quantizer", name).lookup(c) for name, c in zip(self.level_names, codes)])
