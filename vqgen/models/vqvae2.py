"""Two-level VQ-VAE-2 (Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2").

Data flow for an image ``x [B, C, H, W]`` in [-1, 1] (H and W divisible by 8)::

    x ─encoder_bottom─▶ enc_b [hidden, H/4] ─encoder_top─▶ enc_t [hidden, H/8]
    enc_t ─pre_quant_top─▶ quantizer_top ─▶ q_t [D, H/8] ─decoder_top─▶ dec_t [D, H/4]
    cat(dec_t, enc_b) ─pre_quant_bottom─▶ quantizer_bottom ─▶ q_b [D, H/4]
    cat(upsample_top(q_t), q_b) ─decoder─▶ recon [C, H]

The top level holds global structure; the bottom level is quantized *given* the top (its encoder
features are concatenated with the decoded top codes), so it only has to encode the residual detail.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.errors import ConfigError, DataError
from vqgen.models.quantize import EMAQuantizer, QuantizerConfig, QuantizerOutput

DOWNSAMPLE = 8
"""Ratio of the image side to the top code map's side (the bottom map is at 1/4)."""


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
    """Both levels' EMA quantizers (codebook size K of the top level, code dimension D of both)."""
    bottom_num_codes: int = 0
    """Codebook size of the bottom level; 0: the same as ``quantizer.num_codes``. A smaller bottom
    codebook pushes more of the image's information into the top codes, whose prior is cheaper to
    train."""
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

    @property
    def code_dim(self) -> int:
        return self.quantizer.code_dim

    def level_num_codes(self, level: str) -> int:
        """Codebook size of ``level`` ("top" or "bottom")."""
        if level == "bottom" and self.bottom_num_codes:
            return self.bottom_num_codes
        return self.quantizer.num_codes

    def quantizer_config(self, level: str) -> QuantizerConfig:
        """The config of one level's quantizer (the levels differ only in codebook size)."""
        return replace(self.quantizer, num_codes=self.level_num_codes(level))


def upgrade_export_config(config: dict) -> dict[str, dict]:
    """The constructor arguments of a ``model.json`` written before the quantizer had its own section."""
    moved = {key: config[key] for key in VQVAEConfig.MOVED_KEYS if key in config}
    rest = {key: value for key, value in config.items() if key not in moved}
    return {"config": {**rest, "quantizer": {**rest.get("quantizer", {}), **moved}} if moved else rest}


@dataclass
class VQVAEOutput:
    """What :meth:`VQVAE2.forward` returns. Scalars are 0-dim tensors."""

    recon: torch.Tensor
    """``[B, C, H, W]`` reconstruction (in the autocast dtype when autocast is on)."""
    loss: torch.Tensor
    """``recon_loss + latent_loss_weight * commitment_loss``: what to backpropagate."""
    recon_loss: torch.Tensor
    """Mean squared error between ``recon`` and the input, in fp32."""
    commitment_loss: torch.Tensor
    """Sum of the top and bottom commitment losses."""
    codes_top: torch.Tensor
    """``[B, H/8, W/8]`` int64."""
    codes_bottom: torch.Tensor
    """``[B, H/4, W/4]`` int64."""
    perplexity_top: torch.Tensor
    perplexity_bottom: torch.Tensor
    usage_top: torch.Tensor
    """Fraction of the top codebook used in this batch."""
    usage_bottom: torch.Tensor


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


def _encoder_x4(cfg: VQVAEConfig) -> nn.Sequential:
    """Image ``[C, H]`` → features ``[hidden, H/4]``: two stride-2 4x4 convs, a 3x3 conv, residuals."""
    half = cfg.hidden_channels // 2
    return nn.Sequential(
        nn.Conv2d(cfg.in_channels, half, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(half, cfg.hidden_channels, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(cfg.hidden_channels, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
    )


def _encoder_x2(cfg: VQVAEConfig) -> nn.Sequential:
    """Bottom features ``[hidden, H/4]`` → top features ``[hidden, H/8]``."""
    half = cfg.hidden_channels // 2
    return nn.Sequential(
        nn.Conv2d(cfg.hidden_channels, half, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(half, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
    )


def _decoder_x2(cfg: VQVAEConfig) -> nn.Sequential:
    """Top codes ``[D, H/8]`` → ``[D, H/4]``, the features that condition the bottom quantizer."""
    return nn.Sequential(
        nn.Conv2d(cfg.code_dim, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
        nn.ConvTranspose2d(cfg.hidden_channels, cfg.code_dim, 4, stride=2, padding=1),
    )


def _decoder_x4(cfg: VQVAEConfig) -> nn.Sequential:
    """Both levels ``[2D, H/4]`` → image ``[C, H]``."""
    half = cfg.hidden_channels // 2
    return nn.Sequential(
        nn.Conv2d(2 * cfg.code_dim, cfg.hidden_channels, 3, padding=1),
        *_res_stack(cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks),
        nn.ConvTranspose2d(cfg.hidden_channels, half, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(half, cfg.in_channels, 4, stride=2, padding=1),
    )


class VQVAE2(nn.Module):
    """Hierarchical VQ-VAE with a top code map at 1/8 and a bottom code map at 1/4 of the image side.

    The codebooks are EMA buffers updated in ``forward`` while ``self.training``; the rest is trained
    by backpropagating ``forward(x).loss``.

    Example:
        >>> model = VQVAE2(VQVAEConfig(hidden_channels=32, num_codes=64, code_dim=16))
        >>> out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
        >>> out.codes_top.shape, out.codes_bottom.shape
        (torch.Size([2, 4, 4]), torch.Size([2, 8, 8]))
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder_bottom = _encoder_x4(config)
        self.encoder_top = _encoder_x2(config)
        self.pre_quant_top = nn.Conv2d(config.hidden_channels, config.code_dim, 1)
        self.quantizer_top = EMAQuantizer(config.quantizer_config("top"))
        self.decoder_top = _decoder_x2(config)
        self.pre_quant_bottom = nn.Conv2d(config.code_dim + config.hidden_channels, config.code_dim, 1)
        self.quantizer_bottom = EMAQuantizer(config.quantizer_config("bottom"))
        self.upsample_top = nn.ConvTranspose2d(config.code_dim, config.code_dim, 4, stride=2, padding=1)
        self.decoder = _decoder_x4(config)

    @staticmethod
    def latent_shapes(image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Code map sizes ``((H_top, W_top), (H_bottom, W_bottom))`` for a square ``image_size``."""
        if image_size < DOWNSAMPLE or image_size % DOWNSAMPLE:
            raise ConfigError("image_size", f"must be a positive multiple of {DOWNSAMPLE}, got {image_size}")
        top, bottom = image_size // DOWNSAMPLE, image_size // (DOWNSAMPLE // 2)
        return (top, top), (bottom, bottom)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise DataError(
                f"expected images of shape [B, {self.config.in_channels}, H, W], got {list(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % DOWNSAMPLE or w % DOWNSAMPLE:
            raise DataError(
                f"image size {h}x{w} is not divisible by {DOWNSAMPLE}: VQ-VAE-2 downsamples by "
                f"{DOWNSAMPLE}; resize or crop the images (e.g. to {h // DOWNSAMPLE * DOWNSAMPLE or 8}x"
                f"{w // DOWNSAMPLE * DOWNSAMPLE or 8})"
            )

    def _quantize_levels(self, x: torch.Tensor, update: bool) -> tuple[QuantizerOutput, QuantizerOutput]:
        """Encode and quantize both levels; the bottom quantizer is conditioned on the top codes."""
        self._check_images(x)
        enc_b = self.encoder_bottom(x)  # [B, hidden, H/4, W/4]
        enc_t = self.encoder_top(enc_b)  # [B, hidden, H/8, W/8]
        top = self.quantizer_top(self.pre_quant_top(enc_t), update=update)  # q_t [B, D, H/8, W/8]
        dec_t = self.decoder_top(top.quantized)  # [B, D, H/4, W/4]
        z_b = self.pre_quant_bottom(torch.cat([dec_t, enc_b], dim=1))  # [B, D, H/4, W/4]
        bottom = self.quantizer_bottom(z_b, update=update)
        return top, bottom

    def _decode(self, q_top: torch.Tensor, q_bottom: torch.Tensor) -> torch.Tensor:
        """Quantized maps ``[B, D, H/8]`` and ``[B, D, H/4]`` → images ``[B, C, H]``."""
        up_t = self.upsample_top(q_top)  # [B, D, H/4, W/4]
        # Under autocast up_t is bf16 and q_bottom fp32: cat promotes, the next conv casts back.
        return self.decoder(torch.cat([up_t, q_bottom], dim=1))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Reconstruct ``x [B, C, H, W]`` (in [-1, 1]); updates the codebooks when training."""
        top, bottom = self._quantize_levels(x, update=self.training)
        recon = self._decode(top.quantized, bottom.quantized)
        recon_loss = F.mse_loss(recon.float(), x.float())
        commitment = top.commitment_loss + bottom.commitment_loss
        return VQVAEOutput(
            recon=recon,
            loss=recon_loss + self.config.latent_loss_weight * commitment,
            recon_loss=recon_loss,
            commitment_loss=commitment,
            codes_top=top.codes,
            codes_bottom=bottom.codes,
            perplexity_top=top.perplexity,
            perplexity_bottom=bottom.perplexity,
            usage_top=top.usage,
            usage_bottom=bottom.usage,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code maps ``(top [B, H/8, W/8], bottom [B, H/4, W/4])`` int64; never updates the codebooks."""
        top, bottom = self._quantize_levels(x, update=False)
        return top.codes, bottom.codes

    @torch.no_grad()
    def decode_codes(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` from code maps ``[B, H/8, W/8]`` and ``[B, H/4, W/4]``."""
        th, tw = codes_top.shape[-2:]
        bh, bw = codes_bottom.shape[-2:]
        if codes_top.shape[0] != codes_bottom.shape[0] or (bh, bw) != (2 * th, 2 * tw):
            raise DataError(
                f"code maps do not match: top {list(codes_top.shape)} needs bottom "
                f"[{codes_top.shape[0]}, {2 * th}, {2 * tw}], got {list(codes_bottom.shape)}"
            )
        for name, codes in (("top", codes_top), ("bottom", codes_bottom)):
            k = self.config.level_num_codes(name)
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
                raise DataError(f"{name} codes must lie in [0, {k}), got [{int(codes.min())}, {int(codes.max())}]")
        return self._decode(self.quantizer_top.lookup(codes_top), self.quantizer_bottom.lookup(codes_bottom))
