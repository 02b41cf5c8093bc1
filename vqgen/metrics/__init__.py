"""Evaluation metrics: FID, KID, Inception Score, precision/recall from one pass of Inception
features (with cached reference features), PSNR, bits per dimension, codebook usage.

Importing this package does not build the Inception network; :class:`InceptionFeatures` does.
"""

from vqgen.metrics.fid import (
    FEATURE_DIM,
    INCEPTION_CONFIG_KEY,
    INCEPTION_FILENAME,
    INCEPTION_TENSORS_SHA256,
    INCEPTION_URL,
    FeatureMoments,
    FeatureStats,
    InceptionFeatures,
    as_uint8_batches,
    cached_reference_stats,
    default_inception_path,
    frechet_distance,
    inception_tensors_sha256,
    load_inception_state_dict,
    reference_stats_key,
    resolve_inception_weights,
    score_images,
    stats_from_features,
    stats_from_images,
)
from vqgen.metrics.image import bits_per_dim, codebook_usage, perplexity, psnr
from vqgen.metrics.inception_weights import check_inception_weights
from vqgen.metrics.sample_metrics import FeatureSet, SampleMetrics, compute_sample_metrics, extract_feature_set

__all__ = [
    "FeatureSet",
    "SampleMetrics",
    "check_inception_weights",
    "compute_sample_metrics",
    "extract_feature_set",
    "perplexity",
    "FEATURE_DIM",
    "INCEPTION_CONFIG_KEY",
    "INCEPTION_FILENAME",
    "INCEPTION_TENSORS_SHA256",
    "INCEPTION_URL",
    "FeatureMoments",
    "FeatureStats",
    "InceptionFeatures",
    "as_uint8_batches",
    "bits_per_dim",
    "cached_reference_stats",
    "codebook_usage",
    "default_inception_path",
    "frechet_distance",
    "inception_tensors_sha256",
    "load_inception_state_dict",
    "psnr",
    "reference_stats_key",
    "resolve_inception_weights",
    "score_images",
    "stats_from_features",
    "stats_from_images",
]
