"""A small ResNet image classifier: the scorer of classifier-based rejection sampling (Razavi et al.
2019, section 4), trained on the pipeline's labelled images by the train-classifier stage.

Data flow for an image ``x [B, C, S, S]`` in [-1, 1] (C = 1 or 3)::

    x ─stem (3x3 conv)─▶ [width, S] ─stage 0─▶ [width, S/2] ─stage 1─▶ [2 width, S/4] ... ─▶
      ─norm, ReLU, mean over the map─▶ [channels] ─dropout, linear─▶ logits [B, num_classes]

Each stage halves the resolution in its first residual block (a stride-2 convolution) and doubles
the width from the second stage on. The blocks are pre-activation residual blocks (He et al. 2016)
with GroupNorm rather than BatchNorm: no running statistics, so a batch's logits do not depend on
the other images in it, on the number of processes that trained it, or on train/eval batch sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.errors import ConfigError

NORM_GROUPS = 8
"""GroupNorm groups (fewer where a layer's width is not a multiple of 8)."""


@dataclass(kw_only=True)
class ClassifierConfig:
    """Architecture of :class:`ResNetClassifier` (``[classifier.model]``)."""

    width: int = 32
    """Channels of the stem and the first stage; each later stage doubles them."""
    blocks: int = 2
    """Residual blocks per stage."""
    stages: int = 3
    """Stages; each halves the resolution (32x32 images with 3 stages end at 4x4)."""
    dropout: float = 0.0
    """Dropout before the final linear layer."""

    def __post_init__(self) -> None:
        for name in ("width", "blocks", "stages"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")

    def stage_width(self, stage: int) -> int:
        return self.width * 2**stage


@dataclass(kw_only=True)
class ClassifierLayout:
    """What the classifier reads and predicts, as the data gives it (not a user setting)."""

    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ConfigError("in_channels", f"must be 1 or 3, got {self.in_channels}")
        if self.image_size < 1:
            raise ConfigError("image_size", f"must be >= 1, got {self.image_size}")
        if self.num_classes < 2:
            raise ConfigError("num_classes", f"a classifier needs at least 2 classes, got {self.num_classes}")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: ``skip(x) + conv(relu(norm(conv(relu(norm(x))))))``; the
    skip is a strided 1x1 convolution where the block changes the width or the resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.norm_in = _norm(in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm_out = _norm(out_channels)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                     if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.relu(self.norm_in(x)))
        return self.skip(x) + self.conv_out(F.relu(self.norm_out(h)))


class ResNetClassifier(nn.Module):
    """Images in [-1, 1] ``[B, C, S, S]`` → class logits ``[B, num_classes]``.

    ``config`` and ``layout`` are kept as attributes of those names: the model export writes them
    (:mod:`vqgen.models.export`).
    """

    def __init__(self, config: ClassifierConfig, layout: ClassifierLayout):
        super().__init__()
        if layout.image_size < 2**config.stages:
            raise ConfigError("stages", f"{config.stages} halvings of {layout.image_size}-pixel images leave "
                                        "less than one pixel")
        self.config, self.layout = config, layout
        self.stem = nn.Conv2d(layout.in_channels, config.width, 3, padding=1, bias=False)
        blocks, channels = [], config.width
        for stage in range(config.stages):
            width = config.stage_width(stage)
            for block in range(config.blocks):
                blocks.append(ResBlock(channels, width, stride=2 if block == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm(channels)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(channels, layout.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.blocks(self.stem(images))))
        return self.head(self.dropout(h.mean(dim=(2, 3))))
