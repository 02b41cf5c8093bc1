"""Fréchet Inception Distance with the standard TF-ported Inception weights, and cached statistics.

The network is torchmetrics' ``NoTrainInceptionV3`` (the Inception of
``pt_inception-2015-12-05-6726825d.pth``, the one every published FID uses), fed uint8 images and
read at its 2048-d pool layer. The weights come from a path in the config
(``evaluate.inception_weights``) or the torch hub cache, downloaded there once and verified when
absent: see :mod:`vqgen.metrics.inception_weights`.

Typical use: reference statistics of the real data are computed once and cached
(:func:`cached_reference_stats`); samples are then scored against them (:func:`score_images`)
without encoding the real data again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from tqdm.auto import tqdm

from vqgen.errors import CheckpointError, ConfigError, DataError
# The weights concept lives in inception_weights; its public names stay importable from here.
from vqgen.metrics.inception_weights import (  # noqa: F401
    FEATURE_DIM,
    INCEPTION_CONFIG_KEY,
    INCEPTION_FILENAME,
    INCEPTION_SHA256_PREFIX,
    INCEPTION_TENSORS_SHA256,
    INCEPTION_URL,
    _build_inception_network,
    _check_inception_values,
    _read_inception_state_dict,
    check_inception_weights,
    default_inception_path,
    inception_tensors_sha256,
    load_inception_state_dict,
    resolve_inception_weights,
)
from vqgen.utils import atomic_write_bytes, sha256_file

STATS_FORMAT = "vqgen-fid-stats/1"

# Something that turns uint8 images [N, C, H, W] into features [N, D].
FeatureExtractor = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# The network (its weights: finding, fetching, checking: vqgen.metrics.inception_weights)


Resize = Literal["torch", "tf1"]
RESIZE_CONVENTIONS: dict[str, str] = {
    "torch": "bilinear to 299x299, PyTorch's half-pixel centres (pytorch-fid, torchmetrics)",
    "tf1": "bilinear to 299x299, TensorFlow 1's corner-aligned grid (the original TF FID code, torch-fidelity)",
}


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network for uint8 images, and its 1008 class
    logits from the same forward when the weights hold ``fc`` (:meth:`features_and_logits`).

    ``weights``: a weights file, or ``None`` for the torch hub cache (see
    :func:`resolve_inception_weights`). Input: uint8 ``[N, 3, H, W]`` or grey ``[N, 1, H, W]``
    (repeated to RGB) of any size, resized to 299x299 by the ``resize`` convention
    (:data:`RESIZE_CONVENTIONS`) and scaled to [-1, 1). Output: float32 ``[N, 2048]`` on the
    module's device. ``url``/``download``: see :func:`resolve_inception_weights`.

    The resize is PyTorch's half-pixel-centred bilinear; torch-fidelity's own extractor uses
    TensorFlow 1's (no half-pixel offset), which shifts a 32-px image by about half a source pixel
    and changes its features by ~20% per image. Same network, other convention: vqgen's features
    agree with pytorch-fid's; against torch-fidelity's ``calculate_metrics`` FID moves by ~0.5% and
    KID, precision/recall and the IS spread by more (benchmarks/metric_agreement.py measures it).
    """

    # torch-fidelity's and torchmetrics' Inception Score layer: fc without its bias, as in the
    # original TF Inception Score code.
    LOGITS_LAYER = "logits_unbiased"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
                 resize: Resize = "torch", url: str | None = None, download: bool = True):
        super().__init__()
        if resize not in RESIZE_CONVENTIONS:
            raise ConfigError("resize", f"must be one of {list(RESIZE_CONVENTIONS)}, got {resize!r}")
        self.resize: Resize = resize
        self.weights_path = resolve_inception_weights(weights, url=url, download=download)
        self.weights_sha256 = sha256_file(self.weights_path)  # part of every reference-stats key
        state = _read_inception_state_dict(self.weights_path)
        # The network's strict load first: it names a tensor of the wrong shape, where the
        # values check could only say that the weights differ.
        self.net = _build_inception_network(state, self.weights_path, resize)
        _check_inception_values(self.weights_path, state, self.weights_sha256)
        # FID-only files (no fc) are accepted; they give no logits, so no Inception Score.
        self.logits_unavailable = "" if "fc.weight" in state else (
            f"{self.weights_path} has no fc.weight/fc.bias (FID-only Inception weights), so no class "
            "logits and no Inception Score")
        if not self.logits_unavailable:  # the logits come out of the same forward as the pool
            self.net.features_list = [*self.net.features_list, self.LOGITS_LAYER]
        # channels_last: about 1.9x faster on a CPU (5.6 -> 11.7 images/s on 2 cores), features
        # equal to 1e-5; the convolutions' preferred layout on GPUs too.
        self.to(device, memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(self._prepare(images))  # [N, 2048]

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Pool features ``[N, 2048]`` and logits ``[N, 1008]`` (``None`` when the weights have no
        fc, see ``logits_unavailable``) of uint8 ``images``, from one forward."""
        # NoTrainInceptionV3.forward returns only its first output; the tuple of every requested
        # layer comes from this (torchmetrics-internal) method.
        outputs = self.net._torch_fidelity_forward(self._prepare(images))
        pool = outputs[0].reshape(images.shape[0], -1)
        return pool, (None if self.logits_unavailable else outputs[-1])

    def _prepare(self, images: Tensor) -> Tensor:
        images = _check_uint8_nchw(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images.to(self.device)


# ---------------------------------------------------------------------------------------------
# Images in, batches out


def _check_uint8_nchw(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8:
        raise DataError(f"FID expects uint8 images, got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"FID expects images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    return images


def _to_nchw(array: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C = 1 or 3) → ``[N, C, H, W]``."""
    images = torch.as_tensor(array)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return _check_uint8_nchw(images)


def as_uint8_batches(
    images: np.ndarray | Tensor | Iterable[Tensor], batch_size: int = 50
) -> Iterator[Tensor]:
    """Yield uint8 ``[B, C, H, W]`` batches from an image array (NCHW, NHWC or grey NHW) or an
    iterable of batches, re-chunked to at most ``batch_size`` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = [images] if isinstance(images, (np.ndarray, Tensor)) else images
    for block in source:
        block = _to_nchw(block)
        for start in range(0, block.shape[0], batch_size):
            yield block[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set: mean ``[D]`` and covariance ``[D, D]`` (float64),
    the number of images, and the key that says what they were computed from.

    Optionally the features themselves (float32 ``[count, D]``) and the images' class labels
    (int64 ``[count]``): KID and precision/recall need every reference feature, per-class FID the
    labels (see :mod:`vqgen.metrics.sample_metrics`). Files without them (FID only, and those
    written before they existed) load with ``None`` there.
    """

    mean: Tensor
    cov: Tensor
    count: int
    key: str = ""
    features: Tensor | None = None
    labels: Tensor | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (atomic), count and key in the metadata."""
        metadata = {"format": STATS_FORMAT, "count": str(self.count), "key": self.key}
        tensors = {"mean": self.mean.double().contiguous(), "cov": self.cov.double().contiguous()}
        if self.features is not None:
            tensors["features"] = self.features.detach().to("cpu", torch.float32).contiguous()
        if self.labels is not None:
            tensors["labels"] = self.labels.detach().to("cpu", torch.int64).contiguous()
        atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file written by :meth:`save`; a damaged or foreign file raises CheckpointError."""
        path = Path(path)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
                optional = {name: f.get_tensor(name) for name in ("features", "labels") if name in f.keys()}
        except Exception as err:  # safetensors raises several types for a bad header or body
            detail = f"{type(err).__name__}: {err}"
            raise CheckpointError(f"{path}: cannot read FID statistics: {detail}") from err
        if metadata.get("format") != STATS_FORMAT:
            found = metadata.get("format")
            raise CheckpointError(f"{path}: not a vqgen FID statistics file (format {found!r})")
        dim = mean.shape[0] if mean.dim() == 1 else -1
        if dim < 1 or tuple(cov.shape) != (dim, dim) or not metadata.get("count", "").isdigit():
            raise CheckpointError(
                f"{path}: inconsistent FID statistics (mean {tuple(mean.shape)}, cov {tuple(cov.shape)}, "
                f"count {metadata.get('count')!r})"
            )
        count = int(metadata["count"])
        features, labels = optional.get("features"), optional.get("labels")
        if features is not None and (tuple(features.shape) != (count, dim) or not features.is_floating_point()):
            raise CheckpointError(
                f"{path}: inconsistent FID statistics (features {tuple(features.shape)} {features.dtype}, "
                f"expected float ({count}, {dim}))"
            )
        if labels is not None and (tuple(labels.shape) != (count,) or labels.is_floating_point()):
            raise CheckpointError(
                f"{path}: inconsistent FID statistics (labels {tuple(labels.shape)} {labels.dtype}, "
                f"expected integer ({count},))"
            )
        return cls(mean=mean, cov=cov, count=count, key=metadata.get("key", ""), features=features, labels=labels)


class FeatureMoments:
    """Running mean and scatter matrix of features, merged batch by batch.

    Chan et al.'s pairwise update keeps the scatter centred, which stays accurate in float64 where
    the textbook ``sum(x x^T) - n mu mu^T`` loses digits to cancellation.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        """Add features ``[B, D]``."""
        x = features.detach().to("cpu", torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        self._merge(n_b, mean_b, centred.T @ centred)

    def _merge(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        n_a, total = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.scatter += scatter_b + torch.outer(delta, delta) * (n_a * n_b / total)
        self.count = total

    def to_stats(self, key: str = "") -> FeatureStats:
        """Mean and unbiased covariance (divided by ``count - 1``, as every FID implementation does)."""
        if self.count < 2:
            raise DataError(f"FID statistics need at least 2 images, got {self.count}")
        cov = self.scatter / (self.count - 1)
        return FeatureStats(mean=self.mean.clone(), cov=cov, count=self.count, key=key)


def stats_from_features(features: Tensor, key: str = "") -> FeatureStats:
    """Statistics of a feature matrix ``[N, D]``."""
    moments = FeatureMoments(features.shape[1])
    moments.update(features)
    return moments.to_stats(key)


def stats_from_images(
    images: np.ndarray | Tensor | Iterable[Tensor],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 50,
    progress: bool = False,
    key: str = "",
) -> FeatureStats:
    """Feature statistics of uint8 images (an array or an iterable of batches).

    ``extractor`` is usually an :class:`InceptionFeatures`; anything mapping uint8 ``[N, C, H, W]``
    to ``[N, D]`` works. Images are encoded ``batch_size`` at a time and never all held in memory.
    """
    moments: FeatureMoments | None = None
    total = len(images) if isinstance(images, (np.ndarray, Tensor)) else None
    with tqdm(total=total, unit="img", desc="FID features", disable=not progress) as bar:
        for batch in as_uint8_batches(images, batch_size):
            features = extractor(batch)  # [B, D]
            moments = moments or FeatureMoments(features.shape[1])
            moments.update(features)
            bar.update(batch.shape[0])
    if moments is None:
        raise DataError("FID statistics: no images given")
    return moments.to_stats(key)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians ``N(a.mean, a.cov)`` and ``N(b.mean, b.cov)``.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. The trace term is computed as
    the sum of square roots of the eigenvalues of ``R S_b R`` with ``R = S_a^(1/2)``: that matrix is
    symmetric positive semi-definite and has the eigenvalues of ``S_a S_b``, so no complex square
    root or diagonal offset is needed, even when the covariances are singular (fewer images than
    feature dimensions).
    """
    if a.mean.shape != b.mean.shape or a.cov.shape != b.cov.shape:
        sizes = f"{tuple(a.mean.shape)}/{tuple(a.cov.shape)} vs {tuple(b.mean.shape)}/{tuple(b.cov.shape)}"
        raise ValueError(f"frechet_distance: statistics of different sizes, {sizes}")
    for which, stats in (("first", a), ("second", b)):
        if not (torch.isfinite(stats.mean).all() and torch.isfinite(stats.cov).all()):
            named = f" ({stats.key})" if stats.key else ""
            raise DataError(_degenerate(f"the {which} statistics{named} hold NaN or inf values"))
    try:
        distance = _frechet_distance(a, b)
    except torch.linalg.LinAlgError as err:  # eigh does not converge on some ill-conditioned input
        raise DataError(_degenerate(f"eigen-decomposition failed: {err}")) from err
    if not math.isfinite(distance):
        raise DataError(_degenerate(f"the distance came out as {distance}"))
    return distance


def _degenerate(detail: str) -> str:
    return (f"FID statistics are degenerate ({detail}). Likely cause: Inception weights that are not "
            "the standard FID ones or are damaged, or a damaged cached statistics file; with the "
            "standard weights every uint8 image gives finite features")


def _frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    mu_a, mu_b = a.mean.double(), b.mean.double()
    cov_a, cov_b = _symmetric(a.cov.double()), _symmetric(b.cov.double())
    eigvals_a, eigvecs_a = torch.linalg.eigh(cov_a)
    root_a = (eigvecs_a * eigvals_a.clamp(min=0).sqrt()) @ eigvecs_a.T  # S_a^(1/2)
    product_eigvals = torch.linalg.eigvalsh(_symmetric(root_a @ cov_b @ root_a))
    # Eigenvalues that are zero in exact arithmetic come out as +-1e-16 * largest; their square
    # roots (1e-8) would add up to noise, so everything below the rounding level counts as zero.
    noise_floor = product_eigvals.abs().max() * product_eigvals.numel() * torch.finfo(torch.float64).eps
    trace_sqrt = torch.where(product_eigvals > noise_floor, product_eigvals, 0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return distance.item()


def _symmetric(m: Tensor) -> Tensor:
    return (m + m.T) / 2


# ---------------------------------------------------------------------------------------------
# Cached reference statistics and scoring


def reference_stats_key(dataset: str, count: int, weights_sha256: str, **extra: Any) -> str:
    """The identity of a set of reference statistics: dataset, image count, Inception weights and
    anything else that changes the features (e.g. resolution). A cache is reused only on equality."""
    fields = {"dataset": dataset, "count": count, "weights_sha256": weights_sha256, **extra}
    return json.dumps(fields, sort_keys=True)


def cached_reference_stats(
    cache_path: str | os.PathLike,
    key: str,
    make_images: Callable[[], np.ndarray | Tensor | Iterable[Tensor]],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 50,
    progress: bool = False,
) -> FeatureStats:
    """Statistics from ``cache_path`` if it was computed for ``key``; otherwise compute them from
    ``make_images()`` (called only then), write them atomically and return them.

    A cache that cannot be read is treated as absent and rewritten.
    """
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            cached = FeatureStats.load(cache_path)
        except CheckpointError:
            cached = None
        if cached is not None and cached.key == key:
            return cached
    stats = stats_from_images(make_images(), extractor, batch_size=batch_size, progress=progress, key=key)
    stats.save(cache_path)
    return stats


def score_images(
    images: np.ndarray | Tensor | Iterable[Tensor],
    reference: FeatureStats,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 50,
    progress: bool = False,
) -> float:
    """FID of uint8 ``images`` (an array or batches, e.g. generated samples) against ``reference``."""
    stats = stats_from_images(images, extractor, batch_size=batch_size, progress=progress)
    return frechet_distance(stats, reference)

