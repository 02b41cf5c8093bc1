"""Fréchet Inception Distance with the standard TF-ported Inception weights, and cached statistics.

The network is torchmetrics' ``NoTrainInceptionV3`` (the Inception of
``pt_inception-2015-12-05-6726825d.pth``, the one every published FID uses), fed uint8 images and
read at its 2048-d pool layer. Weights are never downloaded: they come from a path in the config
(``evaluate.inception_weights``) or from the torch hub cache, where online tools put them.

Typical use: reference statistics of the real data are computed once and cached
(:func:`cached_reference_stats`); samples are then scored against them (:func:`score_images`)
without encoding the real data again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from tqdm.auto import tqdm

from vqgen.errors import CheckpointError, DataError
from vqgen.utils import atomic_write_bytes, sha256_file

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME
)
INCEPTION_CONFIG_KEY = "evaluate.inception_weights"
FEATURE_DIM = 2048
STATS_FORMAT = "vqgen-fid-stats/1"

# A few tensors whose shapes identify the FID Inception layout; the strict load in
# `InceptionFeatures` then checks every key.
_LAYOUT_PROBES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}
_FC_SHAPES = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}
_NUM_KEYS_WITH_FC = 566

# torch hub convention: the 8 hex digits in the standard file's name start its sha256.
INCEPTION_SHA256_PREFIX = "6726825d"
# The checksum `inception_tensors_sha256` gives for the standard FID Inception's tensors other than
# fc.weight/fc.bias (which FID never reads). Computed from pt_inception-2015-12-05-nofc.pth, a state
# dict holding exactly those 564 tensors (its file sha256 is b1d7825e...); the standard 6726825d
# file holds the same network, saved differently (legacy format, other strides).
INCEPTION_TENSORS_SHA256 = "acfa230643f38c90d8a3db66aebb4a6f868cba6fd57959b1c969640cf8d918a3"

# Something that turns uint8 images [N, C, H, W] into features [N, D].
FeatureExtractor = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Weights


def default_inception_path() -> Path:
    """Where pytorch-fid and torchmetrics users already have the weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _missing_weights_message(path: Path, explicit: bool) -> str:
    where = f"set by {INCEPTION_CONFIG_KEY}" if explicit else "the torch hub cache"
    return (
        f"FID Inception weights not found at {path} ({where}). vqgen never downloads them. "
        f"Download {INCEPTION_URL} on a machine with internet access, then either put the file at "
        f"{default_inception_path()} or set {INCEPTION_CONFIG_KEY} = '/path/to/{INCEPTION_FILENAME}'. "
        "A state dict with the same tensors but no fc.weight/fc.bias also works."
    )


def resolve_inception_weights(path: str | os.PathLike | None) -> Path:
    """The Inception weights file to use: ``path`` if given, else the torch hub cache copy.

    Raises :class:`CheckpointError` that says where to put the file (and where to get it) when it
    does not exist. Never downloads.
    """
    explicit = path is not None
    resolved = Path(path).expanduser() if explicit else default_inception_path()
    if not resolved.is_file():
        raise CheckpointError(_missing_weights_message(resolved, explicit))
    return resolved


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read and check an FID Inception state dict (``torch.load(weights_only=True)``, no pickle code).

    Files without ``fc.weight``/``fc.bias`` (only needed for logits, never for FID) are accepted.
    A truncated file, something that is not a state dict, the wrong layout, or the right layout
    with other values (see :func:`inception_tensors_sha256`) raises :class:`CheckpointError`
    naming the file.
    """
    path = Path(path)
    state = _read_inception_state_dict(path)
    _check_inception_values(path, state)
    return state


def _read_inception_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of ``path``, checked for the FID Inception's keys and a few shapes (not values)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean "unreadable"
        raise CheckpointError(
            f"{path}: cannot read FID Inception weights (truncated, or not a torch.save file): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    state = dict(state)
    _check_inception_layout(path, state)
    return state


def inception_tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """A checksum of a state dict's values that does not depend on how the file was saved
    (zip or legacy format, strides, storage sharing): sha256 over the keys not starting with
    ``fc.``, in sorted order, each as ``"{key}\\0{dtype}\\0{shape}\\0"`` (e.g.
    ``"Conv2d_1a_3x3.conv.weight\\0torch.float32\\0(32, 3, 3, 3)\\0"``, UTF-8) followed by the
    tensor's bytes (CPU, contiguous, native byte order, i.e. little-endian on every usual machine)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith("fc.")):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_inception_values(path: Path, state: dict[str, Tensor], file_sha256: str | None = None) -> None:
    """CheckpointError unless ``state`` holds the standard FID Inception's values.

    Tensors of the right shapes but other values load and run, and give FIDs that cannot be
    compared with anyone else's (or non-finite ones). The file's own sha256 prefix is accepted
    too, so the standard file passes even if one of its tensors differed from the reconstructed
    file the tensor checksum was taken from.
    """
    checksum = inception_tensors_sha256(state)
    if checksum == INCEPTION_TENSORS_SHA256:
        return
    if (file_sha256 or sha256_file(path)).startswith(INCEPTION_SHA256_PREFIX):
        return
    raise CheckpointError(
        f"{path}: not the standard FID Inception weights (tensor checksum {checksum[:16]}..., expected "
        f"{INCEPTION_TENSORS_SHA256[:16]}...; or a file whose sha256 starts with {INCEPTION_SHA256_PREFIX}); "
        "FIDs computed with other weights are not comparable with published ones"
    )


def _check_inception_layout(path: Path, state: dict[str, Tensor]) -> None:
    fc_present = [k for k in _FC_SHAPES if k in state]
    if len(fc_present) == 1:
        raise CheckpointError(f"{path}: has {fc_present[0]} but not its fc partner")
    expected_keys = _NUM_KEYS_WITH_FC - (2 if not fc_present else 0)
    probes = dict(_LAYOUT_PROBES, **({k: _FC_SHAPES[k] for k in fc_present}))
    for key, shape in probes.items():
        if key not in state:
            raise CheckpointError(f"{path}: not an FID Inception state dict (no key {key!r})")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape}"
            )
    if len(state) != expected_keys:
        raise CheckpointError(
            f"{path}: has {len(state)} tensors, expected {expected_keys} for the FID Inception"
        )


def _build_inception_network(state: dict[str, Tensor], source: Path) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 holding ``state``, returning 2048-d pool features.

    torchmetrics (through torch-fidelity) only takes weights as a file path, loads it strictly and
    would download when given none. So the checked tensors are written to a private temporary file
    first; ``fc`` is filled with NaN when absent (the 2048-d forward returns before ``fc``, so the
    NaNs are never read). That file holds only tensors we saved, so its loading runs no foreign code.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401  (NoTrainInceptionV3 is a torch-fidelity module)
    except ImportError as err:
        raise ModuleNotFoundError(
            "FID needs torch-fidelity for torchmetrics' Inception: pip install torch-fidelity "
            "(or torchmetrics[image])"
        ) from err
    full = dict(state)
    for key, shape in _FC_SHAPES.items():
        full.setdefault(key, torch.full(shape, math.nan))
    with tempfile.TemporaryDirectory(prefix="vqgen-inception-") as tmp:
        tmp_path = Path(tmp) / "inception.pth"
        torch.save(full, tmp_path)
        try:
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(FEATURE_DIM)],
                feature_extractor_weights_path=str(tmp_path),
            )
        except RuntimeError as err:  # strict load_state_dict: missing/unexpected keys, bad shapes
            detail = " ".join(str(err).split())  # torch's message spans lines; keep it on one
            raise CheckpointError(f"{source}: does not fit the FID Inception network: {detail}") from err
    return net


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network for uint8 images.

    ``weights``: a weights file, or ``None`` for the torch hub cache (see
    :func:`resolve_inception_weights`). Input: uint8 ``[N, 3, H, W]`` or grey ``[N, 1, H, W]``
    (repeated to RGB) of any size; torchmetrics resizes to 299x299 (bilinear, antialiased) and scales
    to [-1, 1). Output: float32 ``[N, 2048]`` on the module's device.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.weights_path = resolve_inception_weights(weights)
        self.weights_sha256 = sha256_file(self.weights_path)  # part of every reference-stats key
        state = _read_inception_state_dict(self.weights_path)
        # The network's strict load first: it names a tensor of the wrong shape, where the
        # values check could only say that the weights differ.
        self.net = _build_inception_network(state, self.weights_path)
        _check_inception_values(self.weights_path, state, self.weights_sha256)
        # channels_last: about 1.9x faster on a CPU (5.6 -> 11.7 images/s on 2 cores), features
        # equal to 1e-5; the convolutions' preferred layout on GPUs too.
        self.to(device, memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        images = _check_uint8_nchw(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.to(self.device))  # [N, 2048]


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
    the number of images, and the key that says what they were computed from."""

    mean: Tensor
    cov: Tensor
    count: int
    key: str = ""

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (atomic), count and key in the metadata."""
        metadata = {"format": STATS_FORMAT, "count": str(self.count), "key": self.key}
        tensors = {"mean": self.mean.double().contiguous(), "cov": self.cov.double().contiguous()}
        atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file written by :meth:`save`; a damaged or foreign file raises CheckpointError."""
        path = Path(path)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
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
        return cls(mean=mean, cov=cov, count=int(metadata["count"]), key=metadata.get("key", ""))


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

    def merge(self, other: FeatureMoments) -> None:
        """Fold in moments gathered elsewhere (another process or shard)."""
        if other.count:
            self._merge(other.count, other.mean, other.scatter)

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

