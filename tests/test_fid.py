"""FID of real images by vqgen (torchmetrics' Inception) against pytorch-fid, on the same images.

Each implementation does its own preprocessing from the same uint8 images: vqgen/torchmetrics
resizes with antialiased bilinear and scales by (x - 128) / 128; pytorch-fid takes x / 255, resizes
with plain bilinear and scales by 2x - 1. Both networks load the shared weights file. Inception runs
at about 8 images/s on 2 CPU cores, so each set has N_IMAGES images and is encoded once per
implementation (8 * N_IMAGES forward passes in all).
"""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pipeline import SHARED_DATA

from vqgen.errors import CheckpointError
from vqgen.metrics import InceptionFeatures, as_uint8_batches, frechet_distance, stats_from_images

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_cores")]

WEIGHTS = SHARED_DATA / "inception" / "pt_inception-2015-12-05-nofc.pth"
CIFAR_NPZ = SHARED_DATA / "cifar10-subset" / "cifar10_subset.npz"
FASHION_TEST_IMAGES = SHARED_DATA / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
N_IMAGES = 50
BATCH = 50

if not all(p.is_file() for p in (WEIGHTS, CIFAR_NPZ, FASHION_TEST_IMAGES)):
    pytest.skip(
        "shared data (Inception weights, CIFAR-10 subset, Fashion-MNIST) is absent", allow_module_level=True
    )
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
pytorch_fid_score = pytest.importorskip("pytorch_fid.fid_score")


def _read_idx_images(path: Path) -> np.ndarray:
    """uint8 [N, H, W] from a gzipped idx3 file (16-byte big-endian header: magic, count, rows, cols)."""
    raw = gzip.decompress(path.read_bytes())
    magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    assert magic == 2051, f"{path}: not an idx3 image file"
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, rows, cols)


@pytest.fixture(scope="module")
def image_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two disjoint uint8 [N, C, H, W] sets per dataset."""
    cifar = np.load(CIFAR_NPZ)
    cifar_test = torch.from_numpy(cifar["test_images"][:N_IMAGES]).permute(0, 3, 1, 2).contiguous()
    cifar_train = torch.from_numpy(cifar["train_images"][:N_IMAGES]).permute(0, 3, 1, 2).contiguous()
    fashion = torch.from_numpy(_read_idx_images(FASHION_TEST_IMAGES)[: 2 * N_IMAGES].copy()).unsqueeze(1)
    return {
        "cifar10": (cifar_test, cifar_train),
        "fashion-mnist": (fashion[:N_IMAGES], fashion[N_IMAGES:]),  # grey [N, 1, 28, 28]
    }


class _Recorder:
    """Passes images to the extractor and keeps the features, for the per-image comparison."""

    def __init__(self, extractor):
        self.extractor, self.features = extractor, []

    def __call__(self, images):
        out = self.extractor(images)
        self.features.append(out.double().cpu())
        return out


@pytest.fixture(scope="module")
def vqgen_extractor() -> InceptionFeatures:
    return InceptionFeatures(WEIGHTS)


@pytest.fixture(scope="module")
def vqgen_results(image_sets, vqgen_extractor):
    """Per dataset: (stats of set a, stats of set b, features [2N, 2048]) through vqgen's public path."""
    results = {}
    for name, sets in image_sets.items():
        recorder = _Recorder(vqgen_extractor)
        stats = [stats_from_images(images, recorder, batch_size=BATCH) for images in sets]
        results[name] = (*stats, torch.cat(recorder.features))
    return results


@pytest.fixture(scope="module")
def vqgen_fid(vqgen_results) -> dict[str, float]:
    """Per dataset: vqgen's FID between its two sets (each 2048-d distance costs a few seconds)."""
    return {name: frechet_distance(a, b) for name, (a, b, _) in vqgen_results.items()}


def _build_pytorch_fid_model() -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (2048-d pool block) on the shared weights, without its download.

    Its `fid_inception_v3()` always downloads, so the same network is assembled here from its own
    building blocks, loaded non-strictly (the shared file has no `fc`, which FID never uses), and
    handed to `InceptionV3` in place of the download.
    """
    pfi = pytorch_fid_inception
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pfi, "fid_inception_v3", lambda: net)
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return model.eval()


@pytest.fixture(scope="module")
def pytorch_fid_features(image_sets) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per dataset: pytorch-fid features float64 [N, 2048] of set a and set b."""
    model = _build_pytorch_fid_model()
    features = {}
    with torch.inference_mode():
        for name, sets in image_sets.items():
            per_set = []
            for images in sets:
                rgb = images.expand(-1, 3, -1, -1)  # grey → RGB, as pytorch-fid's PIL convert("RGB")
                # pytorch-fid's dataset yields ToTensor() images in [0, 1]; the model resizes and scales.
                out = [model(batch.float() / 255)[0].flatten(1) for batch in rgb.split(BATCH)]
                per_set.append(torch.cat(out).double().numpy())
            features[name] = tuple(per_set)
    return features


def _pytorch_fid_distance(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's `calculate_frechet_distance` on the features' means and `np.cov` covariances.

    With N < 2048 both covariances (and the mean difference) lie in the span of at most 2N - 1
    directions. The Fréchet distance is invariant under rotations, so both sets are expressed in an
    orthonormal basis of that span first: the same number, but scipy's `sqrtm` then takes a
    (2N)-square matrix in a fraction of a second instead of ~40 s for a singular 2048-square one.
    """
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    span = np.concatenate([a - mu_a, b - mu_b, (mu_a - mu_b)[None]]).T  # [2048, 2N + 1]
    basis, _ = np.linalg.qr(span)
    a, b = a @ basis, b @ basis
    return float(
        pytorch_fid_score.calculate_frechet_distance(
            a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False)
        )
    )


@pytest.mark.parametrize("dataset", ["cifar10", "fashion-mnist"])
def test_fid_agrees_with_pytorch_fid(dataset, vqgen_results, vqgen_fid, pytorch_fid_features):
    stats_a, stats_b, _ = vqgen_results[dataset]
    assert stats_a.count == stats_b.count == N_IMAGES
    ours = vqgen_fid[dataset]
    reference = _pytorch_fid_distance(*pytorch_fid_features[dataset])
    gap = abs(ours - reference) / reference
    print(f"\n{dataset}: FID vqgen {ours:.4f}, pytorch-fid {reference:.4f}, relative gap {gap:.3%}")
    assert ours > 1.0  # two different image sets are not at distance zero
    assert gap < 0.01


@pytest.mark.parametrize("dataset", ["cifar10", "fashion-mnist"])
def test_features_agree_image_by_image(dataset, vqgen_results, pytorch_fid_features):
    ours = vqgen_results[dataset][2]
    theirs = torch.from_numpy(np.concatenate(pytorch_fid_features[dataset]))
    relative = (ours - theirs).norm(dim=1) / theirs.norm(dim=1)
    print(f"\n{dataset}: per-image feature difference mean {relative.mean():.3%}, max {relative.max():.3%}")
    # Only the preprocessing differs (input range [-1, 127/128] vs [-1, 1], antialiased resize).
    assert relative.max() < 0.05


def test_grey_images_equal_repeated_rgb(image_sets, vqgen_extractor):
    grey = image_sets["fashion-mnist"][0][:4]
    assert torch.allclose(vqgen_extractor(grey), vqgen_extractor(grey.repeat(1, 3, 1, 1)))
    batches = list(as_uint8_batches(grey, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 1]


def test_weights_with_one_wrong_tensor_are_rejected_naming_it(tmp_path):
    # Right key count and probe shapes, so only the strict load into the network can notice.
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    bad = tmp_path / "edited-inception.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="edited-inception.pth.*Mixed_5b.branch1x1.conv.weight"):
        InceptionFeatures(bad)


def test_weights_with_other_values_are_rejected_by_the_extractor(tmp_path):
    # Right layout, so the network loads them; only the tensor checksum tells them apart.
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"] = state["Mixed_7c.branch_pool.conv.weight"].flip(0)
    bad = tmp_path / "shuffled-inception.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="shuffled-inception.pth: not the standard FID Inception weights"):
        InceptionFeatures(bad)
