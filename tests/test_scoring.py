"""Scoring as users run it: `vqgen score` against folders, samples files and statistics files; the
run's preflight (weights, switched-off evaluation) before any stage starts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_pipeline import INCEPTION_NOFC
from vqgen.config import EvaluateStageConfig
from vqgen.data.samples import load_image_folder, save_samples
from vqgen.errors import DataError
from vqgen.metrics.fid import InceptionFeatures
from vqgen.scoring import array_images, features_of, load_stats_file, score_samples_file


@pytest.fixture
def weights(shared_data):
    path = shared_data / INCEPTION_NOFC
    if not path.exists():
        pytest.skip("FID Inception weights not in the shared data folder")
    return path


def _images(seed: int, n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 3, 16, 16))
    return np.clip(base + rng.integers(-40, 40, (n, 3, 16, 16)), 0, 255).astype(np.uint8)


def _write_folder(root, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(root / str(label) / f"{i:04d}.png")


def test_image_folder_reads_labels_from_class_subfolders(tmp_path):
    images, labels = _images(0), np.array([0, 1] * 4)
    _write_folder(tmp_path / "imgs", images, labels)
    read, read_labels = load_image_folder(tmp_path / "imgs")
    order = np.argsort([f"{label}/{i:04d}" for i, label in enumerate(labels)])
    assert np.array_equal(read, images[order]) and np.array_equal(read_labels, labels[order])
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "0" / "small.png")
    with pytest.raises(DataError, match="small.png: image of shape"):
        load_image_folder(tmp_path / "imgs")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png: not a readable image"):
        load_image_folder(tmp_path / "bad")


def test_score_against_images_and_their_statistics_file(tmp_path, weights):
    cfg = EvaluateStageConfig(inception_weights=str(weights), batch_size=8, kid_subset_size=8)
    real, fake = _images(1), _images(2)
    _write_folder(tmp_path / "real", real, np.zeros(8, dtype=np.int64))
    save_samples(tmp_path / "fake.npz", fake)
    by_images = score_samples_file(cfg, None, tmp_path / "fake.npz", tmp_path, "cpu", against=tmp_path / "real")
    assert by_images["fid"] > 0 and by_images["num_real"] == 8 and by_images["num_samples"] == 8
    assert {"kid_mean", "kid_std", "precision", "recall"} <= by_images.keys()
    # The same reference as pytorch-fid's statistics file (mu, sigma): the same FID, and only FID.
    stats = features_of(array_images(*load_image_folder(tmp_path / "real")), 8, InceptionFeatures(weights), 8).feature_stats()
    np.savez(tmp_path / "stats.npz", mu=stats.mean.numpy(), sigma=stats.cov.numpy())
    by_stats = score_samples_file(cfg, None, tmp_path / "fake.npz", tmp_path, "cpu", against=tmp_path / "stats.npz")
    assert by_stats["fid"] == pytest.approx(by_images["fid"], rel=1e-6)
    assert "kid_mean" not in by_stats and "statistics file" in by_stats["kid_unavailable"]


def test_bad_statistics_files_are_named(tmp_path):
    np.savez(tmp_path / "objects.npz", mu=np.array([object()], dtype=object), sigma=np.eye(2))
    with pytest.raises(DataError, match="objects.npz.*(object|pickle)"):
        load_stats_file(tmp_path / "objects.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(DataError, match=r"shapes.npz: expected float mu \[D\] and sigma \[D, D\]"):
        load_stats_file(tmp_path / "shapes.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match="text.npz is not an .npz file"):
        load_stats_file(tmp_path / "text.npz")
    with pytest.raises(DataError, match="reference statistics file not found"):
        load_stats_file(tmp_path / "missing.npz")


def test_score_command_prints_the_metrics(tmp_path, weights):
    save_samples(tmp_path / "fake.npz", _images(3))
    save_samples(tmp_path / "real.npz", _images(4))
    base = [sys.executable, "-m", "vqgen.cli", "score", str(tmp_path / "fake.npz")]
    sets = ["--set", f"evaluate.inception_weights={weights}", "--set", "evaluate.kid_subset_size=8"]
    done = subprocess.run([*base, "--against", str(tmp_path / "real.npz"), *sets], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout[done.stdout.index("{"):])
    assert metrics["fid"] > 0 and metrics["reference"] == f"images in {tmp_path / 'real.npz'}"
    alone = subprocess.run(base, capture_output=True, text=True)
    assert alone.returncode == 2 and "give --config" in alone.stderr


def test_run_refuses_to_start_without_weights_and_skips_switched_off_evaluation(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached copy; the commands inherit it
    offline = ("evaluate.inception_weights=", "evaluate.inception_url=http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    out = tiny_pipeline("run", sets=offline, rc=2)
    assert "FID Inception weights not found" in out and "evaluate.inception_weights" in out
    assert not (tiny_pipeline.run_dir / "vqvae").exists()  # refused before the first stage
    out = tiny_pipeline("run", sets=(*offline, "evaluate.enabled=false"))
    said = out.index("evaluate: switched off in the config; it will be skipped")
    assert said < out.index("train-vqvae: running")
    assert (tiny_pipeline.run_dir / "samples" / "samples.npz").exists()
    assert not (tiny_pipeline.run_dir / "eval").exists()
