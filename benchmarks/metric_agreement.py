"""vqgen's sample metrics against torch-fidelity's ``calculate_metrics`` on the same image sets.

    python benchmarks/metric_agreement.py --count 500                       # 500 + 500 per dataset
    python benchmarks/metric_agreement.py --count 100 --data-root ../shared/data --weights W.pth

Per dataset (CIFAR-10 subset: train images [0, N) against [N, 2N); Fashion-MNIST: test images
[0, N) against [N, 2N)) it prints a markdown table of every metric computed three ways:

- **end to end**: vqgen (its InceptionFeatures + compute_sample_metrics) against torch-fidelity's
  ``calculate_metrics``, each from the uint8 images with its own preprocessing. These differ by
  the resize convention: vqgen (torchmetrics) upsamples with PyTorch's half-pixel-centred bilinear,
  torch-fidelity with TensorFlow 1's (no half-pixel offset); the network is the same (the script
  checks that torchmetrics' network with ``antialias=False``, i.e. the TF1 resize, reproduces
  torch-fidelity's features).
- **vqgen on torch-fidelity's features** against ``calculate_metrics``: the metric computations
  alone, on identical features (read from torch-fidelity's own feature cache).
- **torch-fidelity's metric functions on vqgen's features** against vqgen.

The shared FID weights have no ``fc`` layer, so for the Inception Score both sides get the same
weights file with a seeded random ``fc`` (1008 x 2048): it validates the computation, not a
published IS. torch-fidelity is given that file and is never allowed to download.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from vqgen.metrics.fid import InceptionFeatures
from vqgen.metrics.sample_metrics import (
    DEFAULT_SEED,
    FeatureSet,
    compute_sample_metrics,
    extract_feature_set,
    project_to_common_span,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
NOFC_WEIGHTS = Path("inception") / "pt_inception-2015-12-05-nofc.pth"
CIFAR = Path("cifar10-subset") / "cifar10_subset.npz"
FASHION = Path("fashion-mnist") / "FashionMNIST" / "raw"
DATASETS = ("cifar10", "fashion-mnist")

# torch-fidelity's result keys → vqgen's.
TORCH_FIDELITY_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "precision": "precision",
    "recall": "recall",
}


@dataclass(frozen=True)
class ImagePair:
    """Two uint8 ``[N, C, H, W]`` image sets with labels: ``real`` (reference), ``fake`` (scored)."""

    real: torch.Tensor
    real_labels: torch.Tensor
    fake: torch.Tensor
    fake_labels: torch.Tensor


@dataclass(frozen=True)
class Settings:
    """torch-fidelity's defaults; ``kid_subset_size`` is capped to the image counts."""

    kid_subsets: int = 100
    kid_subset_size: int = 1000
    isc_splits: int = 10
    pr_k: int = 3
    seed: int = DEFAULT_SEED
    batch_size: int = 50


# ---------------------------------------------------------------------------------------------
# Data and weights


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file's array: big-endian header (magic, counts/dims as uint32), then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    dims = magic & 0xFF
    header = np.frombuffer(raw[: 4 + 4 * dims], dtype=">u4")
    if header[0] != magic:
        raise ValueError(f"{path}: idx magic {header[0]}, expected {magic}")
    return np.frombuffer(raw[4 + 4 * dims :], dtype=np.uint8).reshape(*header[1:].tolist())


def load_image_sets(data_root: Path, count: int, datasets: tuple[str, ...] = DATASETS) -> dict[str, ImagePair]:
    """``count`` + ``count`` disjoint images per dataset, with labels."""
    pairs = {}
    if "cifar10" in datasets:
        cifar = np.load(data_root / CIFAR)
        images = torch.from_numpy(cifar["train_images"][: 2 * count]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(cifar["train_labels"][: 2 * count].astype(np.int64))
        pairs["cifar10"] = _halves(images, labels, count)
    if "fashion-mnist" in datasets:
        images = _read_idx(data_root / FASHION / "t10k-images-idx3-ubyte.gz", 2051)[: 2 * count]
        labels = _read_idx(data_root / FASHION / "t10k-labels-idx1-ubyte.gz", 2049)[: 2 * count]
        images, labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
        pairs["fashion-mnist"] = _halves(images.unsqueeze(1), labels, count)  # grey [N, 1, 28, 28]
    return pairs


def _halves(images: torch.Tensor, labels: torch.Tensor, count: int) -> ImagePair:
    if len(images) < 2 * count:
        raise ValueError(f"only {len(images)} images, {2 * count} needed")
    return ImagePair(real=images[:count], real_labels=labels[:count], fake=images[count:], fake_labels=labels[count:])


def write_weights_with_random_fc(source: Path, destination: Path, seed: int = 0, scale: float = 0.15) -> Path:
    """``source`` (FID weights, maybe without fc) with a seeded random ``fc`` (1008 x 2048 weight,
    zero bias) in torch-fidelity's (= pytorch-fid's) key format. ``scale`` gives logits of std ~3,
    so the class probabilities are neither flat nor one-hot."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * scale
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, destination)
    return destination


# ---------------------------------------------------------------------------------------------
# The three computations


def vqgen_feature_sets(pair: ImagePair, extractor: InceptionFeatures, batch_size: int) -> tuple[FeatureSet, FeatureSet]:
    """(real, fake) feature sets through vqgen's one-pass extraction."""
    real = extract_feature_set(pair.real, extractor, labels=pair.real_labels, batch_size=batch_size)
    fake = extract_feature_set(pair.fake, extractor, labels=pair.fake_labels, batch_size=batch_size)
    return real, fake


def vqgen_metrics(real: FeatureSet, fake: FeatureSet, settings: Settings) -> dict[str, float]:
    result = compute_sample_metrics(real, fake, kid_subsets=settings.kid_subsets,
                                    kid_subset_size=settings.kid_subset_size, isc_splits=settings.isc_splits,
                                    pr_k=settings.pr_k, seed=settings.seed)
    assert not {k for k in result.unavailable if not k.startswith("fid_class_")}, result.unavailable
    return result.values


class _Images(torch.utils.data.Dataset):
    """uint8 ``[3, H, W]`` items, as torch-fidelity wants (grey repeated to RGB, as vqgen does)."""

    def __init__(self, images: torch.Tensor):
        self.images = images.expand(-1, 3, -1, -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].contiguous()


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """torch-fidelity downloads its weights when given no path; make any attempt an error."""

    def refuse(url, *args, **kwargs):
        raise RuntimeError(f"download attempted: {url}")

    targets = ("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
               "torch.hub.load_state_dict_from_url", "torch.hub.download_url_to_file")
    with contextlib.ExitStack() as stack:
        for target in targets:
            stack.enter_context(mock.patch(target, refuse))
        yield


def torch_fidelity_end_to_end(
    pair: ImagePair, weights: Path, cache_root: Path, settings: Settings
) -> tuple[dict[str, float], FeatureSet, FeatureSet]:
    """``calculate_metrics(input1=fake, input2=real)`` with every metric, and the (real, fake)
    features it computed, read back from its feature cache in ``cache_root``."""
    import torch_fidelity

    size = min(settings.kid_subset_size, len(pair.real), len(pair.fake))
    with no_downloads():
        result = torch_fidelity.calculate_metrics(
            input1=_Images(pair.fake), input2=_Images(pair.real), input1_cache_name="fake", input2_cache_name="real",
            cache_root=str(cache_root), cuda=False, batch_size=settings.batch_size, isc=True, fid=True, kid=True,
            prc=True, feature_extractor="inception-v3-compat",  # its precision/recall default to VGG-16 features
            feature_extractor_weights_path=str(weights), kid_subsets=settings.kid_subsets,
            kid_subset_size=size, isc_splits=settings.isc_splits, prc_neighborhood=settings.pr_k,
            rng_seed=settings.seed, save_cpu_ram=True, verbose=False,  # save_cpu_ram: no loader workers
        )
    metrics = {ours: float(result[theirs]) for theirs, ours in TORCH_FIDELITY_KEYS.items()}

    def cached(name: str, layer: str) -> torch.Tensor:
        (path,) = cache_root.glob(f"{name}-*-features-{layer}.pt")
        return torch.load(path, map_location="cpu", weights_only=True)

    real = FeatureSet(pool=cached("real", "2048"), logits=cached("real", "logits_unbiased"), labels=pair.real_labels)
    fake = FeatureSet(pool=cached("fake", "2048"), logits=cached("fake", "logits_unbiased"), labels=pair.fake_labels)
    return metrics, real, fake


def torch_fidelity_on_features(real: FeatureSet, fake: FeatureSet, settings: Settings) -> dict[str, float]:
    """torch-fidelity's metric functions on given features (every metric, per-class FID too).

    FIDs are taken on the features expressed in the basis of their common span (exact: the
    Fréchet distance is rotation invariant; see project_to_common_span), because torch-fidelity's
    non-symmetric 2048 x 2048 ``eigvals`` takes ~9 s on 2 cores.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    def fid(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = project_to_common_span(a, b)
        stats = [fid_features_to_statistics(x) for x in (a, b)]
        return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]

    size = min(settings.kid_subset_size, len(real), len(fake))
    out = {"fid": fid(fake.pool, real.pool)}
    kid = kid_features_to_metric(fake.pool, real.pool, kid_subsets=settings.kid_subsets, kid_subset_size=size,
                                 rng_seed=settings.seed, verbose=False)
    isc = isc_features_to_metric(fake.logits, splits=settings.isc_splits, shuffle=True, rng_seed=settings.seed)
    prc = prc_features_to_metric(fake.pool, real.pool, prc_neighborhood=settings.pr_k, verbose=False)
    for theirs, ours in TORCH_FIDELITY_KEYS.items():
        for part in (kid, isc, prc):
            if theirs in part:
                out[ours] = float(part[theirs])
    for label in torch.unique(torch.cat([real.labels, fake.labels])).tolist():
        real_c, fake_c = real.pool[real.labels == label], fake.pool[fake.labels == label]
        if min(len(real_c), len(fake_c)) >= 2:
            out[f"fid_class_{label}"] = fid(fake_c, real_c)
    return out


def tf1_resize_features(images: torch.Tensor, weights: Path) -> torch.Tensor:
    """Pool features of vqgen's extractor with ``resize="tf1"`` (torch-fidelity's TF1 resize):
    equal to torch-fidelity's features if the resize is the only difference."""
    return InceptionFeatures(weights, resize="tf1")(images)


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def feature_difference(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per-image ``|ours - theirs| / |theirs|`` of feature rows."""
    return (ours.double() - theirs.double()).norm(dim=1) / theirs.double().norm(dim=1)


@dataclass(frozen=True)
class Comparison:
    """Everything one dataset's table shows."""

    vqgen: dict[str, float]  # vqgen end to end
    fidelity: dict[str, float]  # torch-fidelity calculate_metrics end to end
    vqgen_on_fidelity_features: dict[str, float]
    fidelity_on_vqgen_features: dict[str, float]
    feature_gap: torch.Tensor  # per-image relative difference, vqgen vs torch-fidelity pool features
    tf1_gap: float  # max relative difference, torchmetrics with TF1 resize vs torch-fidelity


def compare(pair: ImagePair, extractor: InceptionFeatures, weights: Path, settings: Settings,
            tf1_images: int = 4) -> Comparison:
    """All three computations on one dataset (``weights``: the file ``extractor`` was built on)."""
    real, fake = vqgen_feature_sets(pair, extractor, settings.batch_size)
    with tempfile.TemporaryDirectory(prefix="metric-agreement-") as tmp:
        fidelity, tf_real, tf_fake = torch_fidelity_end_to_end(pair, weights, Path(tmp), settings)
    tf1 = tf1_resize_features(pair.fake[:tf1_images], weights)
    return Comparison(
        vqgen=vqgen_metrics(real, fake, settings),
        fidelity=fidelity,
        vqgen_on_fidelity_features=vqgen_metrics(tf_real, tf_fake, settings),
        fidelity_on_vqgen_features=torch_fidelity_on_features(real, fake, settings),
        feature_gap=feature_difference(torch.cat([real.pool, fake.pool]), torch.cat([tf_real.pool, tf_fake.pool])),
        tf1_gap=feature_difference(tf1, tf_fake.pool[:tf1_images]).max().item(),
    )


def markdown_table(result: Comparison) -> str:
    head = ("| metric | vqgen | torch-fidelity | rel. diff (end to end) | vqgen on t-f features | rel. diff "
            "| t-f functions on vqgen features | rel. diff |")
    lines = [head, "|" + "---|" * 8]
    for name in result.fidelity_on_vqgen_features:
        ours, tf_ours = result.vqgen[name], result.fidelity_on_vqgen_features[name]
        if name in result.fidelity:
            theirs, same = result.fidelity[name], result.vqgen_on_fidelity_features[name]
            e2e = (f"{theirs:.6g} | {relative_difference(ours, theirs):.2%} | "
                   f"{same:.6g} | {relative_difference(same, theirs):.2e}")
        else:
            e2e = "— | — | — | —"  # torch-fidelity has no per-class FID
        lines.append(f"| {name} | {ours:.6g} | {e2e} | {tf_ours:.6g} | {relative_difference(ours, tf_ours):.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="images per set (two sets per dataset)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--weights", type=Path, default=None,
                        help="FID Inception weights (default: the shared no-fc file)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--kid-subset-size", type=int, default=Settings.kid_subset_size)
    parser.add_argument("--fc-seed", type=int, default=0, help="seed of the random fc layer added for the IS")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--resize", choices=("torch", "tf1"), default="torch",
                        help="vqgen's resize convention (evaluate.resize); tf1 is torch-fidelity's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(kid_subset_size=args.kid_subset_size, seed=args.seed, batch_size=args.batch_size)
    source = args.weights or args.data_root / NOFC_WEIGHTS
    pairs = load_image_sets(args.data_root, args.count, tuple(args.datasets))
    with tempfile.TemporaryDirectory(prefix="metric-agreement-weights-") as tmp:
        weights = write_weights_with_random_fc(source, Path(tmp) / "inception-random-fc.pth", seed=args.fc_seed)
        extractor = InceptionFeatures(weights, resize=args.resize)
        print(f"vqgen resize convention: {args.resize}")
        for name, pair in pairs.items():
            result = compare(pair, extractor, weights, settings)
            print(f"\n### {name}: {len(pair.real)} real + {len(pair.fake)} generated images, "
                  f"KID subset size {int(result.vqgen['kid_subset_size'])}\n")
            print(markdown_table(result))
            gap = result.feature_gap
            print(f"\nPool features, vqgen vs torch-fidelity, per image: mean {gap.mean():.1%}, max {gap.max():.1%} "
                  f"(resize convention); torchmetrics with TF1 resize vs torch-fidelity: max {result.tf1_gap:.1e}")


if __name__ == "__main__":
    main()
