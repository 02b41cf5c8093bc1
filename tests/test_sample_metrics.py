"""Sample metrics (FID, KID, IS, precision/recall, per-class FID) from one feature pass.

Unit tests on synthetic features, then the agreement with torch-fidelity on real images
(benchmarks/metric_agreement.py at small counts): the metric computations on identical features
to 1%, and the end-to-end difference, which comes from the resize convention only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vqgen.errors import DataError
from vqgen.metrics.fid import FeatureStats, cached_reference_stats, frechet_distance, stats_from_features
from vqgen.metrics.sample_metrics import (
    FeatureSet,
    cached_reference_features,
    compute_sample_metrics,
    extract_feature_set,
    project_to_common_span,
)

DIM = 64
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _features(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=generator) + shift


class _FakeExtractor:
    """Features = mean pixel value per channel block, logits optional: no Inception needed."""

    def __init__(self, with_logits: bool = True):
        self.with_logits, self.calls = with_logits, 0
        self.logits_unavailable = "" if with_logits else "test weights have no fc"

    def features_and_logits(self, images: torch.Tensor):
        self.calls += 1
        pool = images.float().flatten(1)[:, :DIM]
        return pool, (pool[:, :10].clone() if self.with_logits else None)


def test_kid_of_a_set_with_itself_is_near_zero_and_with_a_shifted_set_positive():
    x = FeatureSet(pool=_features(200, 0))
    same = compute_sample_metrics(x, x, kid_subsets=20, kid_subset_size=100)
    shifted = compute_sample_metrics(x, FeatureSet(pool=_features(200, 1, shift=0.5)), kid_subsets=20,
                                     kid_subset_size=100)
    iid = compute_sample_metrics(x, FeatureSet(pool=_features(200, 2)), kid_subsets=20, kid_subset_size=100)
    assert shifted.values["kid_mean"] > 0 and shifted.values["kid_std"] > 0
    assert shifted.values["kid_subset_size"] == 100
    # Another sample of the same distribution: zero within the estimator's noise.
    assert abs(iid.values["kid_mean"]) < 0.05 * shifted.values["kid_mean"]
    # The set itself: the two subsets share images, whose self-similarity k(x, x) the unbiased
    # estimator counts only in the cross term, so it comes out slightly below zero.
    assert -0.1 * shifted.values["kid_mean"] < same.values["kid_mean"] <= 0


def test_kid_subset_size_is_capped_to_the_counts():
    result = compute_sample_metrics(FeatureSet(pool=_features(30, 0)), FeatureSet(pool=_features(40, 1)),
                                    kid_subsets=5)
    assert result.values["kid_subset_size"] == 30


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_zero():
    x = FeatureSet(pool=_features(100, 0))
    same = compute_sample_metrics(x, x, kid_subsets=2)
    assert same.values["precision"] == 1.0 and same.values["recall"] == 1.0
    far = compute_sample_metrics(x, FeatureSet(pool=_features(100, 1, shift=100.0)), kid_subsets=2)
    assert far.values["precision"] == 0.0 and far.values["recall"] == 0.0


def test_precision_recall_do_not_depend_on_the_batch_size():
    real, fake = FeatureSet(pool=_features(120, 0)), FeatureSet(pool=_features(90, 1, shift=0.3))
    whole = compute_sample_metrics(real, fake, kid_subsets=2, pr_batch_size=1000).values
    batched = compute_sample_metrics(real, fake, kid_subsets=2, pr_batch_size=7).values
    assert (whole["precision"], whole["recall"]) == (batched["precision"], batched["recall"])


def test_inception_score_of_uniform_logits_is_one():
    fake = FeatureSet(pool=_features(50, 0), logits=torch.zeros(50, 1008))
    result = compute_sample_metrics(FeatureSet(pool=_features(50, 1)), fake, kid_subsets=2)
    assert result.values["isc_mean"] == pytest.approx(1.0, abs=1e-12)
    assert result.values["isc_std"] == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_class_count():
    logits = torch.full((100, 10), -1e4).scatter_(1, torch.arange(100)[:, None] % 10, 0.0)
    result = compute_sample_metrics(FeatureSet(pool=_features(100, 1)),
                                    FeatureSet(pool=_features(100, 0), logits=logits), kid_subsets=2, isc_splits=1)
    assert result.values["isc_mean"] == pytest.approx(10.0, rel=1e-9)


def test_missing_logits_and_labels_are_reported_with_a_reason_not_a_number():
    real = FeatureSet(pool=_features(20, 0))
    fake = FeatureSet(pool=_features(20, 1), logits_unavailable="weights.pth has no fc.weight/fc.bias")
    result = compute_sample_metrics(real, fake, kid_subsets=2)
    assert "isc_mean" not in result.values and result.unavailable["isc"] == "weights.pth has no fc.weight/fc.bias"
    assert "labels" in result.unavailable["fid_class"]
    flat = result.as_dict()
    assert flat["isc_unavailable"] == "weights.pth has no fc.weight/fc.bias" and "fid" in flat
    few = compute_sample_metrics(real, FeatureSet(pool=_features(5, 1), logits=torch.zeros(5, 10)), kid_subsets=2)
    assert "fewer than the 10 splits" in few.unavailable["isc"]


def test_per_class_fid_keys_and_values():
    labels_real = torch.arange(60) % 3
    labels_fake = torch.cat([torch.arange(59) % 3, torch.tensor([7])])  # class 7: one image, no real ones
    real = FeatureSet(pool=_features(60, 0), labels=labels_real)
    fake = FeatureSet(pool=_features(60, 1, shift=0.2), labels=labels_fake)
    result = compute_sample_metrics(real, fake, kid_subsets=2)
    assert {k for k in result.values if k.startswith("fid_class_")} == {"fid_class_0", "fid_class_1", "fid_class_2"}
    assert "1 generated" in result.unavailable["fid_class_7"]
    # Per class the features are projected onto their span (n_a + n_b + 1 = 41 < 64 dimensions):
    # the same distance as on the full statistics.
    mask_r, mask_f = labels_real == 1, labels_fake == 1
    full = frechet_distance(stats_from_features(fake.pool[mask_f]), stats_from_features(real.pool[mask_r]))
    assert result.values["fid_class_1"] == pytest.approx(full, rel=1e-9)


def test_projection_keeps_the_frechet_distance():
    a, b = _features(10, 0), _features(15, 1, shift=1.0)
    pa, pb = project_to_common_span(a, b)
    assert pa.shape == (10, 26)
    direct = frechet_distance(stats_from_features(a), stats_from_features(b))
    assert frechet_distance(stats_from_features(pa), stats_from_features(pb)) == pytest.approx(direct, rel=1e-9)


def test_overall_fid_of_fewer_images_than_dimensions_is_the_full_distance():
    # 20 + 30 images of 64-d features: computed in their span, compared with the full statistics.
    real, fake = FeatureSet(pool=_features(20, 0)), FeatureSet(pool=_features(30, 1, shift=0.3))
    result = compute_sample_metrics(real, fake, kid_subsets=2)
    full = frechet_distance(stats_from_features(fake.pool), stats_from_features(real.pool))
    assert result.values["fid"] == pytest.approx(full, rel=1e-9)
    # At or above the dimension the cached statistics are used as they are.
    many = FeatureSet(pool=_features(70, 2))
    assert compute_sample_metrics(many, fake, kid_subsets=2).values["fid"] == pytest.approx(
        frechet_distance(stats_from_features(fake.pool), stats_from_features(many.pool)), rel=1e-12)


def test_results_are_deterministic():
    real = FeatureSet(pool=_features(80, 0), labels=torch.arange(80) % 2)
    fake = FeatureSet(pool=_features(80, 1, shift=0.1), logits=_features(80, 2)[:, :20], labels=torch.arange(80) % 2)
    first = compute_sample_metrics(real, fake, kid_subsets=10, kid_subset_size=40, isc_splits=4)
    assert compute_sample_metrics(real, fake, kid_subsets=10, kid_subset_size=40, isc_splits=4) == first
    other_seed = compute_sample_metrics(real, fake, kid_subsets=10, kid_subset_size=40, isc_splits=4, seed=1)
    assert other_seed.values["kid_mean"] != first.values["kid_mean"]


def test_mismatched_inputs_are_named_errors():
    with pytest.raises(DataError, match="at least 2 images"):
        compute_sample_metrics(FeatureSet(pool=_features(1, 0)), FeatureSet(pool=_features(5, 1)))
    with pytest.raises(DataError, match="labels"):
        FeatureSet(pool=_features(5, 0), labels=torch.zeros(4, dtype=torch.long))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_extract_feature_set_takes_labels_as_argument_or_inside_batches():
    images, labels = _images(25, 0), torch.arange(25) % 4
    from_array = extract_feature_set(images, _FakeExtractor(), labels=labels, batch_size=10)
    from_pairs = extract_feature_set([(images[:12], labels[:12]), (images[12:], labels[12:])], _FakeExtractor(),
                                     batch_size=10)
    for got in (from_array, from_pairs):
        assert got.pool.shape == (25, DIM) and got.logits.shape == (25, 10)
        assert torch.equal(got.labels, labels) and torch.equal(got.pool, images.float().flatten(1))
    no_logits = extract_feature_set(images, _FakeExtractor(with_logits=False))
    assert no_logits.logits is None and no_logits.labels is None
    assert no_logits.logits_unavailable == "test weights have no fc"
    with pytest.raises(DataError, match="some batches carry labels"):
        extract_feature_set([(images[:5], labels[:5]), images[5:]], _FakeExtractor())


def test_reference_cache_round_trip_keeps_features_and_labels(tmp_path):
    cache = tmp_path / "ref.safetensors"
    images, labels = _images(30, 0), torch.arange(30) % 3
    extractor = _FakeExtractor()
    first = cached_reference_features(cache, "key-a", lambda: [(images, labels)], extractor, need_labels=True,
                                      batch_size=8)
    calls = extractor.calls
    again = cached_reference_features(cache, "key-a", lambda: pytest.fail("cache miss"), extractor, need_labels=True)
    assert extractor.calls == calls
    assert torch.equal(again.pool, first.pool) and again.pool.dtype == torch.float32
    assert torch.equal(again.labels, labels) and again.labels.dtype == torch.int64
    assert torch.allclose(again.feature_stats().cov, stats_from_features(first.pool).cov)
    # The FID-only reader takes the same file.
    stats = cached_reference_stats(cache, "key-a", lambda: pytest.fail("cache miss"), lambda x: x)
    assert stats.count == 30 and stats.features is not None
    # Another key is a miss.
    cached_reference_features(cache, "key-b", lambda: [(images, labels)], extractor, need_labels=True)
    assert extractor.calls > calls and FeatureStats.load(cache).key == "key-b"


def test_old_or_fid_only_cache_files_are_a_miss_not_an_error(tmp_path):
    cache = tmp_path / "ref.safetensors"
    features = _features(20, 0)
    # A file as written before features were stored: mean/cov only.
    stats = stats_from_features(features, key="key-a")
    save_file({"mean": stats.mean, "cov": stats.cov},
              cache, metadata={"format": "vqgen-fid-stats/1", "count": "20", "key": "key-a"})
    assert FeatureStats.load(cache).features is None
    extractor = _FakeExtractor()
    got = cached_reference_features(cache, "key-a", lambda: _images(20, 1), extractor)
    assert extractor.calls > 0 and FeatureStats.load(cache).features is not None
    # Stored without labels, asked with labels: a miss too.
    calls = extractor.calls
    cached_reference_features(cache, "key-a", lambda: [(_images(20, 1), torch.zeros(20, dtype=torch.long))],
                              extractor, need_labels=True)
    assert extractor.calls > calls and FeatureStats.load(cache).labels is not None
    assert len(got) == 20
    # Features of the wrong shape: unreadable, so a miss as well.
    save_file({"mean": stats.mean, "cov": stats.cov, "features": features[:5]},
              cache, metadata={"format": "vqgen-fid-stats/1", "count": "20", "key": "key-a"})
    calls = extractor.calls
    cached_reference_features(cache, "key-a", lambda: _images(20, 1), extractor)
    assert extractor.calls > calls


# ---------------------------------------------------------------------------------------------
# Real images against torch-fidelity

N_IMAGES = 50  # per set; each image is encoded by vqgen and by torch-fidelity (~10 images/s)
SETTINGS_KID_SUBSET = 25  # below the count, so the subsets differ and the KID std is not 0


@pytest.fixture(scope="module")
def agreement(tmp_path_factory, all_cores):
    """Per dataset: the benchmark's Comparison at N_IMAGES + N_IMAGES, and the extractors."""
    from tiny_pipeline import SHARED_DATA

    weights_nofc = SHARED_DATA / "inception" / "pt_inception-2015-12-05-nofc.pth"
    if not weights_nofc.is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set VQGEN_TEST_DATA)")
    pytest.importorskip("torch_fidelity")
    with pytest.MonkeyPatch.context() as patch:  # the comparison lives in the benchmark script
        patch.syspath_prepend(str(BENCHMARKS))
        import metric_agreement as agreement_script
    from vqgen.metrics.fid import InceptionFeatures

    weights = agreement_script.write_weights_with_random_fc(
        weights_nofc, tmp_path_factory.mktemp("weights") / "inception-random-fc.pth", seed=0)
    extractor = InceptionFeatures(weights)
    settings = agreement_script.Settings(kid_subset_size=SETTINGS_KID_SUBSET)
    pairs = agreement_script.load_image_sets(SHARED_DATA, N_IMAGES)
    results = {name: agreement_script.compare(pair, extractor, weights, settings) for name, pair in pairs.items()}
    for name, result in results.items():
        print(f"\n{name} ({N_IMAGES} + {N_IMAGES} images)\n{agreement_script.markdown_table(result)}")
    return {"results": results, "extractor": extractor, "weights_nofc": weights_nofc, "pairs": pairs}


DATASETS = ["cifar10", "fashion-mnist"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_metrics_on_identical_features_agree_with_calculate_metrics(dataset, shared_data, agreement):
    """vqgen's computations on torch-fidelity's own features = its calculate_metrics, within 1%."""
    result = agreement["results"][dataset]
    assert set(result.fidelity) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall"}
    for name, theirs in result.fidelity.items():
        ours = result.vqgen_on_fidelity_features[name]
        assert abs(ours - theirs) <= 0.01 * abs(theirs), f"{dataset} {name}: vqgen {ours}, torch-fidelity {theirs}"
    assert result.fidelity["kid_std"] > 0 and result.fidelity["isc_mean"] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_torch_fidelity_functions_on_vqgen_features_agree_with_vqgen(dataset, shared_data, agreement):
    result = agreement["results"][dataset]
    assert any(name.startswith("fid_class_") for name in result.fidelity_on_vqgen_features)
    for name, theirs in result.fidelity_on_vqgen_features.items():
        ours = result.vqgen[name]
        assert abs(ours - theirs) <= 0.01 * abs(theirs), f"{dataset} {name}: vqgen {ours}, torch-fidelity {theirs}"


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_end_to_end_difference_is_the_resize_convention(dataset, shared_data, agreement):
    """vqgen's and torch-fidelity's features differ (PyTorch half-pixel bilinear vs TF1 resize of
    28/32-px images); torchmetrics' network with the TF1 resize reproduces torch-fidelity's."""
    result = agreement["results"][dataset]
    gap = result.feature_gap
    print(f"\n{dataset}: feature gap mean {gap.mean():.1%}, max {gap.max():.1%}; TF1 resize {result.tf1_gap:.1e}")
    assert result.tf1_gap < 1e-5
    assert gap.mean() > 0.05  # a convention, not rounding


@pytest.mark.slow
def test_inception_features_and_logits(shared_data, agreement):
    """One forward gives the pool (= forward) and the logits; FID-only weights give no logits."""
    from vqgen.metrics.fid import InceptionFeatures

    images = agreement["pairs"]["fashion-mnist"].real[:3]
    extractor = agreement["extractor"]
    pool, logits = extractor.features_and_logits(images)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and extractor.logits_unavailable == ""
    assert torch.equal(pool, extractor(images))
    nofc = InceptionFeatures(agreement["weights_nofc"])
    pool_nofc, no_logits = nofc.features_and_logits(images)
    assert no_logits is None and "no fc.weight/fc.bias" in nofc.logits_unavailable
    assert torch.allclose(pool_nofc, pool, rtol=1e-5, atol=1e-5)  # fc does not touch the pool features
    fake = extract_feature_set(images, nofc)
    result = compute_sample_metrics(fake, fake, kid_subsets=2)
    assert "isc_mean" not in result.values and "no fc.weight/fc.bias" in result.unavailable["isc"]
