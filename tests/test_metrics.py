"""Fast tests of vqgen.metrics: PSNR, bits/dim, codebook usage, Fréchet distance, FID statistics
files, weights checks and the reference-statistics cache (with a tiny fake feature extractor)."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from vqgen.errors import CheckpointError, DataError
from vqgen.metrics import inception_weights
from vqgen.metrics import (
    INCEPTION_CONFIG_KEY,
    INCEPTION_URL,
    FeatureMoments,
    FeatureStats,
    as_uint8_batches,
    bits_per_dim,
    cached_reference_stats,
    codebook_usage,
    default_inception_path,
    frechet_distance,
    load_inception_state_dict,
    psnr,
    reference_stats_key,
    resolve_inception_weights,
    score_images,
    stats_from_features,
    stats_from_images,
)
from vqgen.metrics.fid import INCEPTION_TENSORS_SHA256, inception_tensors_sha256
from vqgen.utils import sha256_file

SHARED_DATA = Path(os.environ.get("VQGEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_WEIGHTS = SHARED_DATA / "inception" / "pt_inception-2015-12-05-nofc.pth"


# ---------------------------------------------------------------------------------------------
# image metrics


def test_psnr_matches_hand_computation():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0] += 0.1  # MSE 0.01 → 10 log10(4 / 0.01) = 26.0206 dB for data range 2
    y[1, 0] += 0.3  # a third of the pixels off by 0.3 → MSE 0.03
    per_image, mean = psnr(x, y, data_range=2.0)
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.03)], dtype=torch.float64)
    assert torch.allclose(per_image, expected, atol=1e-6)
    assert mean == pytest.approx(expected.mean().item())


def test_psnr_uint8_does_not_wrap():
    x = torch.full((1, 1, 2, 2), 10, dtype=torch.uint8)
    y = torch.full((1, 1, 2, 2), 20, dtype=torch.uint8)  # 10 - 20 would wrap to 246 in uint8
    per_image, _ = psnr(x, y, data_range=255)
    assert per_image.item() == pytest.approx(10 * math.log10(255**2 / 100))


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), data_range=2.0)


def test_bits_per_dim():
    assert bits_per_dim(math.log(2.0)) == pytest.approx(1.0)
    bits = bits_per_dim(torch.tensor(3 * math.log(2.0) * 10), num_dims=10)
    assert isinstance(bits, torch.Tensor)  # a tensor stays a tensor (no read back from the device)
    assert float(bits) == pytest.approx(3.0)
    assert isinstance(bits_per_dim(10), float)


def test_codebook_usage_on_known_histograms():
    fraction, perplexity = codebook_usage(torch.tensor([0, 0, 1, 1]), num_codes=4)
    assert fraction == 0.5 and perplexity == pytest.approx(2.0)
    # p = (1/2, 1/4, 1/4): entropy 1.5 bits, perplexity 2**1.5
    codes = torch.tensor([[3, 3], [5, 7]])
    fraction, perplexity = codebook_usage(codes, num_codes=8)
    assert fraction == pytest.approx(3 / 8)
    assert perplexity == pytest.approx(2**1.5)
    fraction, perplexity = codebook_usage(torch.arange(16).repeat(3), num_codes=16)
    assert fraction == 1.0 and perplexity == pytest.approx(16.0)


def test_codebook_usage_rejects_out_of_range_codes():
    with pytest.raises(DataError, match="outside"):
        codebook_usage(torch.tensor([0, 8]), num_codes=8)


# ---------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def _stats(mean, cov, count=10):
    mean, cov = (torch.as_tensor(v, dtype=torch.float64) for v in (mean, cov))
    return FeatureStats(mean=mean, cov=cov, count=count)


def test_frechet_distance_of_identical_stats_is_zero_even_when_singular():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(20, 64, generator=gen, dtype=torch.float64)  # 20 samples in 64-d: rank 19
    stats = stats_from_features(features)
    assert abs(frechet_distance(stats, stats)) < 1e-10 * stats.cov.trace().item()


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # For diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2; zeros make them singular.
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0, 3.0])
    var_a, var_b = torch.tensor([1.0, 0.0, 4.0, 2.0]), torch.tensor([0.0, 0.0, 9.0, 0.5])
    expected = (mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()
    got = frechet_distance(_stats(mu_a, torch.diag(var_a)), _stats(mu_b, torch.diag(var_b)))
    assert got == pytest.approx(expected.item(), abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_full_rank_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) * 1.5 + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)
    got = frechet_distance(_stats(mu_a, cov_a), _stats(mu_b, cov_b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_moments_over_uneven_batches_match_numpy():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(37, 8, generator=gen, dtype=torch.float64) * 3 + 100  # large offset
    moments = FeatureMoments(8)
    for chunk in features.split([1, 10, 26]):
        moments.update(chunk)
    stats = moments.to_stats()
    assert stats.count == 37
    assert torch.allclose(stats.mean, features.mean(0), atol=1e-10)
    assert np.allclose(stats.cov.numpy(), np.cov(features.numpy(), rowvar=False), atol=1e-10)


def test_degenerate_statistics_are_a_named_error(monkeypatch):
    good = _stats(torch.zeros(4), torch.eye(4))
    cov = torch.eye(4, dtype=torch.float64)
    cov[0, 1] = math.nan  # what NaN features (e.g. from wrong Inception weights) give
    bad = FeatureStats(mean=torch.zeros(4, dtype=torch.float64), cov=cov, count=10, key="samples|10")
    expected = r"degenerate \(the second statistics \(samples\|10\) hold NaN.*Inception weights"
    with pytest.raises(DataError, match=expected):
        frechet_distance(good, bad)

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    with pytest.raises(DataError, match="degenerate .eigen-decomposition failed"):
        frechet_distance(good, good)


def test_moments_need_two_images():
    moments = FeatureMoments(4)
    moments.update(torch.zeros(1, 4))
    with pytest.raises(DataError, match="at least 2"):
        moments.to_stats()


def test_stats_save_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    stats = stats_from_features(torch.randn(12, 6, generator=gen), key="cifar10-test|12")
    path = tmp_path / "ref.safetensors"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.cov, stats.cov)
    assert loaded.mean.dtype == torch.float64
    assert (loaded.count, loaded.key) == (12, "cifar10-test|12")
    assert b"pickle" not in path.read_bytes()[:8]  # safetensors header is a length + JSON


def test_stats_load_rejects_damaged_file(tmp_path):
    path = tmp_path / "ref.safetensors"
    stats_from_features(torch.randn(5, 4)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="ref.safetensors"):
        FeatureStats.load(path)


# ---------------------------------------------------------------------------------------------
# Inception weights files


def test_missing_explicit_weights_says_where_to_put_them(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(CheckpointError) as info:
        resolve_inception_weights(missing)
    message = str(info.value)
    assert str(missing) in message and INCEPTION_CONFIG_KEY in message and INCEPTION_URL in message


def test_missing_hub_cache_weights_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert default_inception_path() == expected
    with pytest.raises(CheckpointError) as info:
        resolve_inception_weights(None, download=False)  # never reach the internet from a test
    assert str(expected) in str(info.value) and INCEPTION_URL in str(info.value)


def _fake_inception_state():
    """Tensors shaped like the probed keys of the real file; enough to exercise the loader."""
    return {
        "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": torch.zeros(128, 128, 1, 7),
        "Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1),
    }


def test_truncated_weights_file_names_the_file(tmp_path):
    source = tmp_path / "whole.pth"
    if REAL_WEIGHTS.is_file():
        source = REAL_WEIGHTS
    else:
        torch.save(_fake_inception_state(), source)
    truncated = tmp_path / "cut-inception.pth"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(300_000))
    with pytest.raises(CheckpointError, match="cut-inception.pth.*truncated"):
        load_inception_state_dict(truncated)


def test_wrong_weights_files_name_the_file_and_problem(tmp_path):
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(CheckpointError, match="tensor.pth: expected a state dict"):
        load_inception_state_dict(not_a_dict)

    other_model = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other_model)
    with pytest.raises(CheckpointError, match="resnet.pth: not an FID Inception.*Conv2d_1a_3x3"):
        load_inception_state_dict(other_model)

    wrong_shape = tmp_path / "wide.pth"
    state = _fake_inception_state()
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, wrong_shape)
    expected = r"wide.pth: Conv2d_1a_3x3.conv.weight has shape \(64, 3, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        load_inception_state_dict(wrong_shape)

    too_few = tmp_path / "partial.pth"
    torch.save(_fake_inception_state(), too_few)
    with pytest.raises(CheckpointError, match="partial.pth: has 3 tensors, expected 564"):
        load_inception_state_dict(too_few)


def test_real_weights_file_passes_the_checks():
    if not REAL_WEIGHTS.is_file():
        pytest.skip("shared FID Inception weights are absent")
    state = load_inception_state_dict(REAL_WEIGHTS)
    assert len(state) == 564 and "fc.weight" not in state
    assert inception_tensors_sha256(state) == INCEPTION_TENSORS_SHA256


@pytest.fixture(scope="module")
def real_state():
    if not REAL_WEIGHTS.is_file():
        pytest.skip("shared FID Inception weights are absent")
    return torch.load(REAL_WEIGHTS, map_location="cpu", weights_only=True)


def test_weights_with_the_right_layout_but_other_values_are_rejected(tmp_path, real_state):
    state = dict(real_state)
    state["Mixed_5b.branch1x1.bn.running_var"] = state["Mixed_5b.branch1x1.bn.running_var"] * 2
    edited = tmp_path / "retrained.pth"
    torch.save(state, edited)
    with pytest.raises(CheckpointError, match="retrained.pth: not the standard FID Inception weights "
                                              r"\(tensor checksum [0-9a-f]{16}.*not comparable with published"):
        load_inception_state_dict(edited)


def test_weights_with_the_standard_file_prefix_are_accepted(tmp_path, real_state, monkeypatch):
    state = dict(real_state)
    state["Conv2d_1a_3x3.bn.running_mean"] = state["Conv2d_1a_3x3.bn.running_mean"] + 1
    edited = tmp_path / "edited.pth"
    torch.save(state, edited)
    with pytest.raises(CheckpointError, match="not the standard"):
        load_inception_state_dict(edited)
    # A file whose sha256 starts like the standard file's is taken as that file, whatever it holds.
    monkeypatch.setattr(inception_weights, "INCEPTION_SHA256_PREFIX", sha256_file(edited)[:8])
    assert len(load_inception_state_dict(edited)) == 564


def test_tensor_checksum_ignores_how_the_file_was_saved(tmp_path, real_state):
    # Like the standard 6726825d file: legacy torch.save format, conv weights in another memory
    # layout (other strides), and the classifier (fc) that FID never reads.
    state = {k: v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if v.dim() == 4 else v
             for k, v in real_state.items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.randn(1008)
    assert not state["Conv2d_1a_3x3.conv.weight"].is_contiguous()
    full = tmp_path / "full-legacy.pth"
    torch.save(state, full, _use_new_zipfile_serialization=False)
    loaded = load_inception_state_dict(full)
    assert len(loaded) == 566 and inception_tensors_sha256(loaded) == INCEPTION_TENSORS_SHA256


# ---------------------------------------------------------------------------------------------
# image batches, statistics from images, and the reference cache


class FakeExtractor:
    """Per-channel means and a few pixels as 'features'; counts the images it encodes."""

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        x = images.double().expand(-1, 3, -1, -1)
        return torch.cat([x.mean(dim=(2, 3)), x[:, :, 0, :2].flatten(1)], dim=1)  # [N, 9]


def _images(n, seed, channels=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 8, 8), generator=gen, dtype=torch.uint8)


def test_as_uint8_batches_accepts_nhwc_grey_and_rejects_floats():
    nhwc = _images(5, 0).permute(0, 2, 3, 1).numpy()
    batches = list(as_uint8_batches(nhwc, batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.equal(torch.cat(batches), torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert next(as_uint8_batches(np.zeros((4, 8, 8), np.uint8))).shape == (4, 1, 8, 8)
    with pytest.raises(DataError, match="uint8"):
        next(as_uint8_batches(torch.rand(2, 3, 8, 8)))


def test_stats_from_images_equals_stats_of_all_features():
    images = _images(23, 1)
    extractor = FakeExtractor()
    stats = stats_from_images(iter([images[:7], images[7:]]), extractor, batch_size=5)
    direct = stats_from_features(FakeExtractor()(images))
    assert extractor.images_seen == 23
    assert torch.allclose(stats.mean, direct.mean) and torch.allclose(stats.cov, direct.cov)
    assert score_images(images, direct, FakeExtractor(), batch_size=4) == pytest.approx(0.0, abs=1e-6)


def test_reference_cache_hit_and_miss(tmp_path):
    cache = tmp_path / "eval" / "reference.safetensors"
    extractor = FakeExtractor()
    calls = []

    def make_images(seed):
        def make():
            calls.append(seed)
            return _images(16, seed)

        return make

    key_a = reference_stats_key("synthetic-a", 16, "0" * 64)
    first = cached_reference_stats(cache, key_a, make_images(0), extractor, batch_size=8)
    assert calls == [0] and extractor.images_seen == 16 and cache.is_file()

    # Same key: read back from the file, nothing encoded.
    again = cached_reference_stats(cache, key_a, make_images(0), extractor, batch_size=8)
    assert calls == [0] and extractor.images_seen == 16
    assert torch.equal(again.mean, first.mean) and again.key == key_a

    # A different dataset (or count, or weights) changes the key: recomputed and overwritten.
    key_b = reference_stats_key("synthetic-b", 16, "0" * 64)
    other = cached_reference_stats(cache, key_b, make_images(1), extractor, batch_size=8)
    assert calls == [0, 1] and not torch.equal(other.mean, first.mean)
    assert FeatureStats.load(cache).key == key_b

    # A damaged cache is recomputed, not fatal.
    cache.write_bytes(b"garbage")
    repaired = cached_reference_stats(cache, key_b, make_images(1), extractor, batch_size=8)
    assert calls == [0, 1, 1] and torch.equal(repaired.cov, other.cov)


def test_reference_key_depends_on_every_part():
    base = reference_stats_key("cifar10:test", 1000, "ab" * 32)
    assert base != reference_stats_key("cifar10:train", 1000, "ab" * 32)
    assert base != reference_stats_key("cifar10:test", 999, "ab" * 32)
    assert base != reference_stats_key("cifar10:test", 1000, "cd" * 32)
    assert base != reference_stats_key("cifar10:test", 1000, "ab" * 32, resolution=32)
