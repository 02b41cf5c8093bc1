"""Sample metrics from one pass of Inception features: FID, KID, Inception Score, precision/recall
and per-class FID.

Each image is encoded once (:func:`extract_feature_set`: 2048-d pool features and, when the weights
hold ``fc``, the 1008 class logits of the same forward). The statistics and distances are
torch-fidelity's own functions on those features (``kid_features_to_metric``,
``isc_features_to_metric``, ``prc_features_to_metric``), with its defaults; FID is vqgen's
:func:`~vqgen.metrics.fid.frechet_distance`, which also takes cached reference statistics. What
vqgen adds is the single feature pass and the reference cache (:func:`cached_reference_features`:
the features and labels, so KID and precision/recall need no second pass over the real data).

Conventions follow torch-fidelity: "fake" is its ``input1`` (generated), "real" its ``input2``;
the seed (2020, torch-fidelity's ``rng_seed``) fixes the KID subsets and the IS split shuffle.
A metric that cannot be computed (no logits, no labels, too few images) is reported in
:attr:`SampleMetrics.unavailable` with the reason, never as a number.

Precision/recall are taken on the same Inception pool features as everything else (one pass);
Kynkäänniemi et al. and torch-fidelity's default use VGG-16 features instead, so the numbers are
comparable with ``calculate_metrics(..., feature_extractor="inception-v3-compat")``, not with its
default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vqgen.errors import CheckpointError, DataError
from vqgen.metrics.fid import FeatureStats, _to_nchw, frechet_distance, stats_from_features

DEFAULT_SEED = 2020  # torch-fidelity's rng_seed default, so its calculate_metrics gives the same draws

# uint8 images: an array ([N, C, H, W], NHWC or grey NHW), or an iterable of batches, each a tensor
# or an (images, labels) pair.
ImageSource = np.ndarray | Tensor | Iterable[Tensor | tuple[Tensor, Tensor]]


class LogitFeatureExtractor(Protocol):
    """What :func:`extract_feature_set` needs; :class:`~vqgen.metrics.fid.InceptionFeatures` is one."""

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...


@dataclass(frozen=True)
class FeatureSet:
    """Inception outputs of one image set.

    ``pool`` float32 ``[N, D]``; ``logits`` float32 ``[N, C]`` or ``None`` (then
    ``logits_unavailable`` says why); ``labels`` int64 ``[N]`` or ``None``; ``stats``: the Gaussian
    statistics of ``pool`` when already known (a cache), else computed on demand.
    """

    pool: Tensor
    logits: Tensor | None = None
    labels: Tensor | None = None
    stats: FeatureStats | None = None
    logits_unavailable: str = ""

    def __post_init__(self) -> None:
        n = self.pool.shape[0] if self.pool.dim() == 2 else -1
        if n < 0 or not self.pool.is_floating_point():
            raise DataError(f"FeatureSet: pool features must be float [N, D], got {self.pool.dtype} "
                            f"{tuple(self.pool.shape)}")
        if self.logits is not None and (self.logits.dim() != 2 or self.logits.shape[0] != n):
            raise DataError(f"FeatureSet: logits {tuple(self.logits.shape)} do not match {n} images")
        if self.labels is not None and (tuple(self.labels.shape) != (n,) or self.labels.is_floating_point()):
            raise DataError(f"FeatureSet: labels must be integers [{n}], got {self.labels.dtype} "
                            f"{tuple(self.labels.shape)}")
        if self.stats is not None and self.stats.count != n:
            raise DataError(f"FeatureSet: statistics of {self.stats.count} images for {n} features")

    def __len__(self) -> int:
        return self.pool.shape[0]

    def feature_stats(self) -> FeatureStats:
        """Mean and covariance of ``pool`` (the cached ones when present)."""
        return self.stats if self.stats is not None else stats_from_features(self.pool)

    def select(self, mask: Tensor) -> FeatureSet:
        """The images where ``mask`` is true (statistics recomputed on demand)."""
        return FeatureSet(
            pool=self.pool[mask],
            logits=None if self.logits is None else self.logits[mask],
            labels=None if self.labels is None else self.labels[mask],
            logits_unavailable=self.logits_unavailable,
        )

    def to_stats(self, key: str = "") -> FeatureStats:
        """Statistics holding the features and labels too: what the reference cache stores."""
        stats = self.feature_stats()
        return FeatureStats(mean=stats.mean, cov=stats.cov, count=stats.count, key=key,
                            features=self.pool, labels=self.labels)

    @classmethod
    def from_stats(cls, stats: FeatureStats) -> FeatureSet:
        """The reference feature set of cached statistics that hold their features."""
        if stats.features is None:
            named = f" ({stats.key})" if stats.key else ""
            raise DataError(f"statistics{named} hold only mean/cov; KID and precision/recall need the features")
        return cls(pool=stats.features.float(), labels=stats.labels, stats=stats,
                   logits_unavailable="reference logits are not cached (the Inception Score uses samples only)")


@dataclass(frozen=True)
class SampleMetrics:
    """``values``: metric name → number; ``unavailable``: metric name → why it was not computed."""

    values: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | str]:
        """One flat dict for a metrics file: the values, and ``<name>_unavailable`` reasons."""
        return {**self.values, **{f"{name}_unavailable": why for name, why in self.unavailable.items()}}


# ---------------------------------------------------------------------------------------------
# One feature pass


def extract_feature_set(
    images: ImageSource,
    extractor: LogitFeatureExtractor,
    *,
    labels: np.ndarray | Tensor | None = None,
    batch_size: int = 50,
    progress: bool = False,
) -> FeatureSet:
    """Pool features, logits (when the extractor gives them) and labels of uint8 ``images``, each
    image encoded once, ``batch_size`` at a time.

    Labels come either as ``labels`` (with an array of images) or inside the batches, as
    ``(images, labels)`` pairs.
    """
    pools: list[Tensor] = []
    logits: list[Tensor | None] = []
    label_parts: list[Tensor | None] = []
    total = len(images) if isinstance(images, (np.ndarray, Tensor)) else None
    with tqdm(total=total, unit="img", desc="Inception features", disable=not progress) as bar:
        for batch, batch_labels in _labelled_batches(images, labels, batch_size):
            pool, batch_logits = extractor.features_and_logits(batch)
            pools.append(pool.detach().to("cpu", torch.float32))
            logits.append(None if batch_logits is None else batch_logits.detach().to("cpu", torch.float32))
            label_parts.append(batch_labels)
            bar.update(batch.shape[0])
    if not pools:
        raise DataError("sample metrics: no images given")
    if any(part is None for part in label_parts) and not all(part is None for part in label_parts):
        raise DataError("sample metrics: some batches carry labels and others do not")
    no_logits = any(part is None for part in logits)
    reason = ""
    if no_logits:
        reason = getattr(extractor, "logits_unavailable", "") or "the feature extractor gives no logits"
    return FeatureSet(
        pool=torch.cat(pools),
        logits=None if no_logits else torch.cat(logits),
        labels=None if label_parts[0] is None else torch.cat(label_parts),
        logits_unavailable=reason,
    )


def _labelled_batches(
    images: ImageSource, labels: np.ndarray | Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``(uint8 [B, C, H, W], int64 [B] or None)`` chunks of at most ``batch_size`` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, (np.ndarray, Tensor)):
        blocks: Iterable = [(images, labels)]
    elif labels is not None:
        raise DataError("sample metrics: with batches of images, give labels inside them as (images, labels) pairs")
    else:
        blocks = (item if isinstance(item, (tuple, list)) else (item, None) for item in images)
    for block_images, block_labels in blocks:
        block_images = _to_nchw(block_images)
        if block_labels is not None:
            block_labels = _as_labels(block_labels, block_images.shape[0])
        for start in range(0, block_images.shape[0], batch_size):
            chunk = slice(start, start + batch_size)
            yield block_images[chunk], None if block_labels is None else block_labels[chunk]


def _as_labels(labels: np.ndarray | Tensor, count: int) -> Tensor:
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    if labels.is_floating_point() or tuple(labels.shape) != (count,):
        raise DataError(f"sample metrics: labels must be integers [{count}], got {labels.dtype} {tuple(labels.shape)}")
    return labels.to("cpu", torch.int64)


def cached_reference_features(
    cache_path: str | os.PathLike,
    key: str,
    make_images: Callable[[], ImageSource],
    extractor: LogitFeatureExtractor,
    *,
    need_labels: bool = False,
    batch_size: int = 50,
    progress: bool = False,
) -> FeatureSet:
    """The reference feature set from ``cache_path`` if it was computed for ``key`` and holds the
    features (and labels, with ``need_labels``); otherwise encode ``make_images()`` (called only
    then; for labels, yield ``(images, labels)`` pairs), write the cache atomically and return it.

    Unreadable caches and those holding only mean/cov (FID-only files, older files) are a miss and
    are rewritten; the rewritten file still serves :func:`~vqgen.metrics.fid.cached_reference_stats`.
    """
    cache_path = Path(cache_path)
    cached = usable_reference_cache(cache_path, key, need_labels)
    if cached is not None:
        return FeatureSet.from_stats(cached)
    features = extract_feature_set(make_images(), extractor, batch_size=batch_size, progress=progress)
    if need_labels and features.labels is None:
        raise DataError(f"reference images for {cache_path.name} carry no labels, but labels were asked for")
    stats = features.to_stats(key)
    stats.save(cache_path)
    return FeatureSet.from_stats(stats)


def usable_reference_cache(path: Path, key: str, need_labels: bool) -> FeatureStats | None:
    """The cached reference of ``path`` if it was made for ``key`` and holds the features (and
    labels, with ``need_labels``); None otherwise (missing, unreadable, FID-only or other key)."""
    if not path.is_file():
        return None
    try:
        cached = FeatureStats.load(path)
    except CheckpointError:
        return None
    if cached.key != key or cached.features is None or (need_labels and cached.labels is None):
        return None
    return cached


# ---------------------------------------------------------------------------------------------
# Metrics on features


def compute_sample_metrics(
    real: FeatureSet,
    fake: FeatureSet,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_degree: int = 3,
    kid_gamma: float | None = None,
    kid_coef0: float = 1.0,
    isc_splits: int = 10,
    pr_k: int = 3,
    pr_batch_size: int = 1000,
    seed: int = DEFAULT_SEED,
) -> SampleMetrics:
    """FID, KID, Inception Score, precision/recall and per-class FID of ``fake`` (generated)
    against ``real``.

    Keys: ``fid``; ``kid_mean``, ``kid_std`` (unbiased polynomial-kernel MMD² over ``kid_subsets``
    random subsets of ``min(kid_subset_size, N_real, N_fake)`` images; ``kid_gamma=None`` means
    1/D); ``isc_mean``, ``isc_std`` (over ``isc_splits`` splits of the generated logits);
    ``precision``, ``recall`` (Kynkäänniemi et al. 2019, ``pr_k`` nearest neighbours; distances
    ``pr_batch_size`` rows at a time, so 10,000 x 10,000 needs ~100 MB, not 1.2 GB);
    ``fid_class_<label>`` when both sets carry labels; and ``num_real``, ``num_fake``,
    ``kid_subset_size``. Deterministic for a given ``seed``.
    """
    if len(real) < 2 or len(fake) < 2:
        raise DataError(
            f"sample metrics need at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    if real.pool.shape[1] != fake.pool.shape[1]:
        raise DataError(f"sample metrics: real features are {real.pool.shape[1]}-d, generated {fake.pool.shape[1]}-d")
    out = SampleMetrics(values={"num_real": len(real), "num_fake": len(fake)})
    out.values["fid"] = feature_set_fid(fake, real)
    _add_kid(out, real, fake, kid_subsets, kid_subset_size, kid_degree, kid_gamma, kid_coef0, seed)
    _add_inception_score(out, fake, isc_splits, seed)
    _add_precision_recall(out, real, fake, pr_k, pr_batch_size)
    _add_per_class_fid(out, real, fake)
    return out


def _add_kid(out: SampleMetrics, real: FeatureSet, fake: FeatureSet, subsets: int, subset_size: int,
             degree: int, gamma: float | None, coef0: float, seed: int) -> None:
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(real), len(fake))
    out.values["kid_subset_size"] = size
    result = kid_features_to_metric(
        fake.pool.float(), real.pool.float(), kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
        kid_kernel_poly_degree=degree, kid_kernel_poly_gamma=gamma, kid_kernel_poly_coef0=coef0,
        rng_seed=seed, verbose=False,
    )
    out.values["kid_mean"] = result["kernel_inception_distance_mean"]
    out.values["kid_std"] = result["kernel_inception_distance_std"]


def _add_inception_score(out: SampleMetrics, fake: FeatureSet, splits: int, seed: int) -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    if fake.logits is None:
        out.unavailable["isc"] = fake.logits_unavailable or "no logits for the generated images"
        return
    if len(fake) < splits:  # an empty split would make a NaN score
        out.unavailable["isc"] = f"{len(fake)} generated images, fewer than the {splits} splits"
        return
    result = isc_features_to_metric(fake.logits, splits=splits, shuffle=True, rng_seed=seed)
    out.values["isc_mean"] = result["inception_score_mean"]
    out.values["isc_std"] = result["inception_score_std"]


def _add_precision_recall(out: SampleMetrics, real: FeatureSet, fake: FeatureSet, k: int, batch_size: int) -> None:
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(real), len(fake)) <= k:  # each image's k-th neighbour must be another image
        out.unavailable["precision_recall"] = f"needs more than k={k} images per set"
        return
    # save_cpu_ram: distances in [batch_size, N] blocks instead of whole N x N matrices.
    result = prc_features_to_metric(fake.pool.float(), real.pool.float(), prc_neighborhood=k,
                                    prc_batch_size=batch_size, save_cpu_ram=True, verbose=False)
    out.values["precision"] = result["precision"]
    out.values["recall"] = result["recall"]


def _add_per_class_fid(out: SampleMetrics, real: FeatureSet, fake: FeatureSet) -> None:
    if fake.labels is None or real.labels is None:
        missing = "generated images" if fake.labels is None else "reference images"
        out.unavailable["fid_class"] = f"the {missing} carry no class labels"
        return
    for label in torch.unique(torch.cat([real.labels, fake.labels])).tolist():
        real_c, fake_c = real.pool[real.labels == label], fake.pool[fake.labels == label]
        name = f"fid_class_{label}"
        if min(len(real_c), len(fake_c)) < 2:
            out.unavailable[name] = (
                f"{len(real_c)} real and {len(fake_c)} generated images of class {label}; needs 2 of each")
            continue
        out.values[name] = features_fid(fake_c, real_c)


def feature_set_fid(fake: FeatureSet, real: FeatureSet) -> float:
    """FID of two feature sets: from their (possibly cached) statistics, or, when the images are
    fewer than the feature dimensions, from the features in their common span (same value)."""
    if len(fake) + len(real) + 1 < fake.pool.shape[1]:
        return features_fid(fake.pool, real.pool)
    return frechet_distance(fake.feature_stats(), real.feature_stats())


def features_fid(fake: Tensor, real: Tensor) -> float:
    """FID of two feature matrices ``[n, D]``, computed in their common span when it is smaller
    than D."""
    real, fake = project_to_common_span(real, fake)
    return frechet_distance(stats_from_features(fake), stats_from_features(real))


def project_to_common_span(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a [n_a, D]`` and ``b [n_b, D]`` in an orthonormal basis of the span of their centred rows
    and mean difference, when that span is smaller than D (float64).

    Both covariances and the mean difference lie in that span, and the Fréchet distance is invariant
    under rotations, so the distance is unchanged, while its eigen-decompositions shrink from D x D
    to (n_a + n_b + 1)-square: per-class FIDs of a few hundred images cost milliseconds, not seconds.
    """
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    spanning = torch.cat([a - mean_a, b - mean_b, (mean_a - mean_b)[None]])  # [n_a + n_b + 1, D]
    if spanning.shape[0] >= spanning.shape[1]:
        return a, b
    basis, _ = torch.linalg.qr(spanning.T)  # [D, n_a + n_b + 1], orthonormal columns
    return a @ basis, b @ basis
