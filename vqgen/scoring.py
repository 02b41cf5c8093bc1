"""Scoring generated images: one pass of Inception features over the samples and the reference,
on every process, then FID, KID, Inception Score, precision/recall and per-class FID.

The evaluate stage and ``vqgen score`` share this module, so both give the same figures for the
same images. Each process encodes its share of the images and the features are gathered, so under
``accelerate launch`` no rank waits in a collective while another encodes everything (the NCCL
default timeout is 10 minutes). The reference features are cached per dataset, split, image count,
weights and resize convention (:func:`reference_features`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vqgen.config import EvaluateStageConfig
from vqgen.configtools import split_by_role
from vqgen.data.datasets import DataConfig, build_dataset, open_npz, read_npz_array, to_uint8
from vqgen.distributed import on_main_process, process_state, shard_indices
from vqgen.errors import DataError
from vqgen.metrics.fid import RESIZE_CONVENTIONS, FeatureStats, InceptionFeatures, frechet_distance, reference_stats_key
from vqgen.metrics.inception_weights import INCEPTION_FILENAME
from vqgen.metrics.sample_metrics import FeatureSet, usable_reference_cache, compute_sample_metrics, extract_feature_set
from vqgen.utils import sha256_json

# Images by index: ``indices`` → uint8 ``[len(indices), C, H, W]`` and labels ``[len]`` (or None).
ImagesAt = Callable[[Sequence[int]], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class Reference:
    """What samples are compared with: the features of real images (with their labels), or only
    the Gaussian statistics of a published statistics file (then FID is the only metric)."""

    stats: FeatureStats
    features: FeatureSet | None
    info: dict[str, Any]


def make_extractor(cfg: EvaluateStageConfig, device) -> InceptionFeatures:
    """The FID Inception network of ``cfg`` (its weights fetched once if missing and allowed)."""
    return InceptionFeatures(cfg.inception_weights or None, device=device, resize=cfg.resize,
                             url=cfg.inception_url or None, download=cfg.download_weights)


def extractor_info(extractor: InceptionFeatures) -> dict[str, str]:
    """What ``metrics.json`` records about the feature extractor, so a figure can be compared."""
    return {
        "feature_extractor": f"Inception-v3 of {INCEPTION_FILENAME} (the FID network), 2048-d pool features",
        "inception_weights_sha256": extractor.weights_sha256,
        "resize": f"{extractor.resize}: {RESIZE_CONVENTIONS[extractor.resize]}",
    }


# ---------------------------------------------------------------------------------------------
# Features on every process


def gather_rows(rows: Tensor, count: int) -> Tensor:
    """Every process's ``rows`` (items ``shard_indices(count, rank, world)`` in order) → all
    ``count`` rows in index order, on every process."""
    state = process_state()
    world = state.num_processes
    if world == 1:
        return rows
    per_rank = -(-count // world)
    padded = rows.new_zeros((per_rank, *rows.shape[1:]), device=state.device)  # NCCL gathers device tensors
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    # Row j of rank r is item j * world + r: interleave the ranks, then drop the padding.
    stacked = torch.stack([p.cpu() for p in parts], dim=1)  # [per_rank, world, ...]
    return stacked.reshape(per_rank * world, *rows.shape[1:])[:count]


def features_of(images_at: ImagesAt, count: int, extractor: InceptionFeatures, batch_size: int,
                progress: str = "") -> FeatureSet:
    """The feature set of images ``0..count-1``: each process encodes its share, all get the whole."""
    state = process_state()
    mine = list(shard_indices(count, state.process_index, state.num_processes))
    pools, logits, labels = [], [], []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    from tqdm.auto import tqdm

    for indices in tqdm(batches, desc=progress or "Inception features", unit="batch",
                        disable=not (progress and state.is_main_process)):
        images, batch_labels = images_at(indices)
        part = extract_feature_set(images, extractor, labels=batch_labels, batch_size=batch_size)
        pools.append(part.pool)
        logits.append(part.logits)
        labels.append(part.labels)
    dim = 2048 if not pools else pools[0].shape[1]
    pool = gather_rows(torch.cat(pools) if pools else torch.zeros(0, dim), count)
    have_logits = not extractor.logits_unavailable
    all_logits = gather_rows(torch.cat(logits) if pools else torch.zeros(0, 1008), count) if have_logits else None
    has_labels = bool(labels) and labels[0] is not None
    has_labels = on_main_process(lambda: has_labels)  # every rank agrees (rank 0 always has images)
    all_labels = gather_rows(torch.cat(labels) if pools else torch.zeros(0, dtype=torch.int64), count) if has_labels else None
    return FeatureSet(pool=pool, logits=all_logits, labels=all_labels, logits_unavailable=extractor.logits_unavailable)


def dataset_images(dataset) -> ImagesAt:
    """:data:`ImagesAt` of an image dataset (items ``(float [C, H, W] in [-1, 1], label)``)."""

    def images_at(indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        items = [dataset[i] for i in indices]
        return to_uint8(torch.stack([image for image, _ in items])), torch.tensor([label for _, label in items])

    return images_at


def array_images(images: np.ndarray, labels: np.ndarray | None) -> ImagesAt:
    """:data:`ImagesAt` of uint8 arrays ``[N, C, H, W]`` (a samples file)."""

    def images_at(indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        index = np.asarray(indices, dtype=np.int64)
        return (torch.from_numpy(np.ascontiguousarray(images[index])),
                None if labels is None else torch.from_numpy(labels[index].astype(np.int64)))

    return images_at


# ---------------------------------------------------------------------------------------------
# The reference


def load_stats_file(path: Path) -> FeatureStats:
    """pytorch-fid's statistics ``.npz`` (``mu [D]``, ``sigma [D, D]``), as published for datasets;
    read without unpickling. A bad file is a DataError naming it and what is wrong."""
    if not path.is_file():
        raise DataError(f"reference statistics file not found: {path} (evaluate.reference)")
    with open_npz(path) as npz:
        arrays = {name: read_npz_array(npz, path, name) for name in ("mu", "sigma") if name in npz.files}
    if set(arrays) != {"mu", "sigma"}:
        raise DataError(f"{path}: a statistics file needs arrays 'mu' and 'sigma' (pytorch-fid's format)")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise DataError(f"{path}: expected float mu [D] and sigma [D, D], got {mu.dtype} {mu.shape} and "
                        f"{sigma.dtype} {sigma.shape}")
    return FeatureStats(mean=torch.from_numpy(mu).double(), cov=torch.from_numpy(sigma).double(), count=0,
                        key=f"file:{path.name}")


def reference_features(cfg: EvaluateStageConfig, data: DataConfig, cache_dir: Path,
                       extractor: InceptionFeatures) -> Reference:
    """The reference of ``cfg.reference``: a dataset split's features (cached in ``cache_dir``; the
    main process reads and writes the cache, every process encodes its share on a miss) or a
    statistics file."""
    if cfg.reference_split is None:
        path = Path(cfg.reference).expanduser()
        stats = on_main_process(lambda: load_stats_file(path))
        return Reference(stats, None, {"reference": f"statistics file {path}", "num_real": None})
    split = cfg.reference_split
    dataset = build_dataset(data, split)
    count = min(cfg.num_real or len(dataset), len(dataset))
    key = reference_stats_key(sha256_json(split_by_role(data)[0]), count, extractor.weights_sha256,
                              split=split, resize=extractor.resize, features=True)
    cache = cache_dir / f"{data.kind}-{split}-{sha256_json(key)[:16]}.safetensors"
    cached = on_main_process(lambda: usable_reference_cache(cache, key, need_labels=True))
    if cached is None:
        features = features_of(dataset_images(dataset), count, extractor, cfg.batch_size, progress="reference features")
        stats = features.to_stats(key)
        on_main_process(lambda: stats.save(cache))
    else:
        stats = cached
    return Reference(stats, FeatureSet.from_stats(stats), {"reference": f"{split} split", "num_real": count})


# ---------------------------------------------------------------------------------------------
# Metrics


def sample_metrics(cfg: EvaluateStageConfig, reference: Reference, fake: FeatureSet) -> dict[str, Any]:
    """Every metric of ``fake`` against ``reference`` (FID only against a statistics file), with
    ``<name>_unavailable`` reasons for those that cannot be computed."""
    if reference.features is None:
        return {"fid": frechet_distance(fake.feature_stats(), reference.stats), "num_fake": len(fake),
                "kid_unavailable": "the reference is a statistics file (mean and covariance only)",
                "precision_recall_unavailable": "the reference is a statistics file (mean and covariance only)"}
    result = compute_sample_metrics(reference.features, fake, kid_subsets=cfg.kid_subsets,
                                    kid_subset_size=cfg.kid_subset_size, pr_k=cfg.pr_k)
    return result.as_dict()


def images_reference(path: Path, extractor: InceptionFeatures, batch_size: int) -> Reference:
    """The reference of ``vqgen score --against PATH``: a statistics ``.npz`` (``mu``, ``sigma``), or
    the images of a samples ``.npz`` or of a folder (encoded now, not cached)."""
    from vqgen.data.samples import load_images

    if path.suffix == ".npz" and path.is_file():
        with open_npz(path) as npz:
            is_stats = "mu" in npz.files
        if is_stats:
            return Reference(on_main_process(lambda: load_stats_file(path)), None,
                             {"reference": f"statistics file {path}", "num_real": None})
    images, labels = load_images(path)
    features = features_of(array_images(images, labels), len(images), extractor, batch_size, progress="reference features")
    return Reference(features.feature_stats(), features, {"reference": f"images in {path}", "num_real": len(images)})


def score_samples_file(cfg: EvaluateStageConfig, data: DataConfig | None, samples_path: Path, out_dir: Path,
                       device, against: Path | None = None) -> dict:
    """Every metric of any samples file (uint8 ``images [N, C, H, W]``, the sample stage's format)
    or image folder: against ``against`` (images or a statistics file) when given, else against
    the reference of ``cfg`` on ``data``. ``vqgen score`` and ``vqgen fid``. The images are read
    before the weights load, so a bad file is named at once."""
    from vqgen.data.samples import load_images

    images, labels = load_images(samples_path)
    extractor = make_extractor(cfg, device)
    if against is not None:
        reference = images_reference(against, extractor, cfg.batch_size)
    else:
        cache_dir = Path(cfg.stats_cache) if cfg.stats_cache else out_dir / "fid-stats"
        reference = reference_features(cfg, data, cache_dir, extractor)
    fake = features_of(array_images(images, labels), len(images), extractor, cfg.batch_size, progress="sample features")
    return {**sample_metrics(cfg, reference, fake), **reference.info, "num_samples": len(images),
            **extractor_info(extractor)}
