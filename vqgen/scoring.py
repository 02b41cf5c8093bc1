"""Scoring generated images against a dataset's real images: the reference statistics (cached per
dataset, image count and Inception weights) and the FID of a samples file. The evaluate stage and
``vqgen fid`` share them, so both give the same figure for the same samples.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vqgen.config import EvaluateStageConfig
from vqgen.configtools import split_by_role
from vqgen.data.datasets import DataConfig, build_dataset, to_uint8
from vqgen.data.samples import load_samples
from vqgen.metrics import InceptionFeatures, cached_reference_stats, reference_stats_key, score_images
from vqgen.utils import sha256_json


def real_batches(dataset, count: int, batch_size: int):
    """uint8 batches of the first ``count`` images of ``dataset``."""
    for start in range(0, count, batch_size):
        yield to_uint8(torch.stack([dataset[i][0] for i in range(start, min(count, start + batch_size))]))


def reference_stats(cfg: EvaluateStageConfig, data: DataConfig, out_dir: Path, extractor):
    """``(statistics, eval_set, count)`` of the real evaluation images, from the cache in
    ``stats_cache`` (default ``out_dir/fid-stats``) when it holds them for this data and weights."""
    eval_set = build_dataset(data, "eval")
    num_real = min(cfg.num_real or len(eval_set), len(eval_set))
    key = reference_stats_key(sha256_json(split_by_role(data)[0]), num_real, extractor.weights_sha256, split="eval")
    cache_dir = Path(cfg.stats_cache) if cfg.stats_cache else out_dir / "fid-stats"
    cache = cache_dir / f"{data.kind}-{sha256_json(key)[:16]}.safetensors"
    stats = cached_reference_stats(
        cache, key, lambda: real_batches(eval_set, num_real, cfg.batch_size), extractor, batch_size=cfg.batch_size,
        progress=True,
    )
    return stats, eval_set, num_real


def score_samples_file(cfg: EvaluateStageConfig, data: DataConfig, samples_path: Path, out_dir: Path, device) -> dict:
    """FID of any samples file (uint8 ``images [N, C, H, W]``, the sample stage's format) against
    the evaluation images of ``data``: ``vqgen fid``. The file is read before the weights load, so
    a bad file is named at once."""
    samples, _ = load_samples(samples_path)
    extractor = InceptionFeatures(cfg.inception_weights or None, device=device)
    reference, _, num_real = reference_stats(cfg, data, out_dir, extractor)
    fid = score_images(samples, reference, extractor, batch_size=cfg.batch_size, progress=True)
    return {"fid": fid, "fid_num_samples": int(len(samples)), "fid_num_real": num_real}
