"""Generating from a trained model: ``VQGen`` gives the sample stage's images, ``vqgen sample`` gives
the same on one process or two and after a kill, a bundle from ``vqgen export`` loads to the same
samples, and every broken input is an error that names it.

One tiny run (``evaluate.enabled = false``: no Inception weights needed) serves every test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_pipeline import TinyPipeline
from vqgen import VQGen
from vqgen.cli import main
from vqgen.config import load_config
from vqgen.data.samples import load_samples
from vqgen.errors import CheckpointError, ConfigError
from vqgen.models.export import export_model, read_export_info
from vqgen.models.pixelcnn import GatedPixelCNN

pytestmark = pytest.mark.usefixtures("single_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}


def vqgen_command(*args: str, procs: int = 1) -> list[str]:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    return [sys.executable, *launch, "-m", "vqgen.cli", *args]


def vqgen(*args: str, procs: int = 1, rc: int = 0) -> str:
    proc = subprocess.run(vqgen_command(*args, procs=procs), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generate")
    TinyPipeline(root, root / "no-inception-weights.pth")("run", sets=("evaluate.enabled=false",))
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def gen(run_dir) -> VQGen:
    return VQGen.from_pretrained(run_dir)


@pytest.fixture(scope="module")
def one_process(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    vqgen("sample", str(run_dir), "--num", "22", "--batch", "4", "--seed", "3", "--out", str(out))
    return out


def test_api_gives_the_sample_stage_images(run_dir, gen):
    cfg = load_config(run_dir / "config.toml").sample
    images, labels = gen.sample(cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, top=cfg.top, bottom=cfg.bottom)
    stage_images, stage_labels = load_samples(run_dir / "samples" / "samples.npz")
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 16, 16)
    assert np.array_equal(images.numpy(), stage_images) and np.array_equal(labels.numpy(), stage_labels)
    assert gen.class_names == ("circle", "square", "triangle", "ring", "cross")
    # Labels by name cycle over the images; codes decode back to the images' shape.
    named = gen.sample(5, labels=["ring", "cross"], seed=1, batch_size=2)
    assert named.labels.tolist() == [3, 4, 3, 4, 3]
    top, bottom = gen.encode(named.images)
    assert top.shape == (5, 2, 2) and bottom.shape == (5, 4, 4)
    assert gen.reconstruct(named.images).shape == named.images.shape
    assert torch.equal(gen.decode(top, bottom), gen.reconstruct(named.images))


def test_vqgen_sample_writes_pngs_npz_grid_and_manifest(run_dir, gen, one_process):
    images, labels = load_samples(one_process / "samples.npz")
    expected = gen.sample(22, seed=3, batch_size=4)
    assert np.array_equal(images, expected.images.numpy()) and np.array_equal(labels, expected.labels.numpy())
    pngs = sorted((one_process / "images").glob("*/*.png"))
    assert len(pngs) == 22 and {p.parent.name for p in pngs} <= {str(c) for c in range(5)}
    for png in pngs:  # one per image, in its class's folder, named by its index
        index = int(png.stem)
        assert int(png.parent.name) == labels[index]
        assert np.array_equal(np.asarray(Image.open(png)).transpose(2, 0, 1), images[index])
    assert (one_process / "grid.png").is_file() and not (one_process / "parts").exists()
    manifest = json.loads((one_process / "manifest.json").read_text())
    assert manifest["finished"] and manifest["count"] == 22 and manifest["settings"]["seed"] == 3
    assert manifest["settings"]["models"] == {c: read_export_info(run_dir / c)["sha256"]
                                              for c in ("vqvae", "prior-top", "prior-bottom")}


def test_two_processes_give_the_one_process_images(run_dir, one_process, tmp_path):
    out = tmp_path / "two"
    vqgen("sample", str(run_dir), "-n", "22", "--batch", "4", "--seed", "3", "--out", str(out), procs=2)
    one, two = load_samples(one_process / "samples.npz"), load_samples(out / "samples.npz")
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    files = sorted(p.relative_to(one_process) for p in one_process.rglob("*.png"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert all((one_process / f).read_bytes() == (out / f).read_bytes() for f in files)
    assert json.loads((out / "manifest.json").read_text())["processes"] == 2


def test_a_killed_run_resumes_to_the_uninterrupted_images(run_dir, gen, tmp_path):
    out = tmp_path / "cut"
    args = ("sample", str(run_dir), "--num", "240", "--batch", "4", "--class", "1,4", "--out", str(out))
    proc = subprocess.Popen(vqgen_command(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "parts").glob("batch-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not json.loads((out / "manifest.json").read_text())["finished"], "the run ended before the kill"

    vqgen(*args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and 0 < manifest["resumed_from_parts"] < 240
    expected = gen.sample(240, labels=[1, 4], batch_size=4)
    images, labels = load_samples(out / "samples.npz")
    assert np.array_equal(images, expected.images.numpy()) and np.array_equal(labels, expected.labels.numpy())
    assert len(list((out / "images").glob("*/*.png"))) == 240
    # The same command again has nothing to do; another setting into this folder is refused by name.
    assert "already complete" in vqgen(*args)
    err = vqgen(*args[:-2], "--temperature", "0.5", "--out", str(out), rc=2)
    assert "bottom.temperature: " in err and "was started with 1.0, this run asks for 0.5" in err


def test_bundle_round_trip(run_dir, gen, tmp_path, monkeypatch):
    run = tmp_path / "run"
    for item in ("vqvae", "prior-top", "prior-bottom"):
        shutil.copytree(run_dir / item, run / item, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(run_dir / "config.toml", run / "config.toml")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"fid": 123.456, "num_samples": 8}))
    bundle = tmp_path / "bundle"
    assert main(["export", str(run), str(bundle)]) == 0
    for item in ("vqvae", "prior-top", "prior-bottom"):
        assert sorted(p.name for p in (bundle / item).iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((bundle / "config.json").read_text())
    assert meta["class_names"] == list(gen.class_names) and (meta["image_size"], meta["channels"]) == (16, 3)
    assert meta["normalization"]["range"] == [-1.0, 1.0]
    card = (bundle / "README.md").read_text()
    assert "| prior-top | 8 |" in card and "| fid | 123.5 |" in card and "procedural" in card

    loaded = VQGen.from_pretrained(bundle)
    assert loaded.class_names == gen.class_names
    for a, b in zip(loaded.sample(6, labels=[0, 2], seed=5, batch_size=4), gen.sample(6, labels=[0, 2], seed=5, batch_size=4)):
        assert torch.equal(a, b)
    # A Hub repo id goes through huggingface_hub (stood in for here: no network), bundle files only.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: fetched.append((repo_id, allow_patterns)) or str(bundle))
    assert VQGen.from_pretrained("someone/tiny-shapes").class_names == gen.class_names
    assert fetched == [("someone/tiny-shapes", ["*.json", "*.safetensors", "*.md"])]

    assert main(["export", str(run), str(bundle)]) == 0  # an older bundle is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["export", str(run), str(tmp_path / "other")]) == 2


def _bundle_copy(run_dir: Path, root: Path, name: str) -> Path:
    """A copy of the run's bundle, exported once into ``root``, to break."""
    bundle = root / "bundle"
    if not bundle.exists():
        assert main(["export", str(run_dir), str(bundle)]) == 0
    shutil.copytree(bundle, root / name)
    return root / name


def test_named_errors(run_dir, gen, tmp_path):
    missing = _bundle_copy(run_dir, tmp_path, "missing")
    (missing / "prior-top" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"component 'prior-top' is missing"):
        VQGen.from_pretrained(missing)

    other_codebook = _bundle_copy(run_dir, tmp_path, "other-codebook")
    prior = gen.prior_top
    stranger = GatedPixelCNN(prior.config, replace(prior.layout, num_codes=16))
    export_model(stranger, tmp_path / "stranger")
    shutil.copy(tmp_path / "stranger" / "model.json", other_codebook / "prior-top" / "config.json")
    shutil.copy(tmp_path / "stranger" / "model.safetensors", other_codebook / "prior-top" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mismatched codebook sizes.*prior-top has a codebook size of 16, "
                                              r"the VQ-VAE's top codebook 32"):
        VQGen.from_pretrained(other_codebook)

    truncated = _bundle_copy(run_dir, tmp_path, "truncated")
    weights = truncated / "vqvae" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"vqvae/model.safetensors does not match the sha256.*truncated"):
        VQGen.from_pretrained(truncated)

    with pytest.raises(ConfigError, match=r"labels: class 5 is outside this model's 5 classes \(0 to 4\)"):
        gen.sample(2, labels=[1, 5])
    with pytest.raises(ConfigError, match=r"unknown class name 'hexagon' \(classes: circle, square"):
        gen.sample(2, labels="hexagon")
    with pytest.raises(CheckpointError, match="neither a run folder"):
        VQGen.from_pretrained(tmp_path)

    assert "labels: class 9 is outside" in vqgen("sample", str(run_dir), "-n", "2", "--class", "9",
                                                "--out", str(tmp_path / "x"), rc=2)
    assert "belongs to the pipeline's sample stage" in vqgen("sample", str(run_dir), "-n", "2",
                                                            "--out", str(run_dir / "samples"), rc=2)
    assert not (tmp_path / "x").exists()


def test_readme_example_runs_as_written(run_dir):
    section = README.read_text().split("## Generating from a trained model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"runs/demo"' in code  # the example documents a run folder; the tiny run stands in for it
    namespace: dict = {}
    exec(code.replace('"runs/demo"', repr(str(run_dir))), namespace)
    assert namespace["images"].shape[1:] == (3, 16, 16) and namespace["images"].dtype == torch.uint8


def test_a_sample_label_outside_the_classes_names_its_config_key(run_dir):
    config = run_dir / "config.toml"  # the run's resolved config: `vqgen stage` on it reruns the stage
    err = vqgen("stage", "sample", str(config), "--set", "sample.label=99", rc=2)
    assert "sample.label: class 99 is outside this model's 5 classes" in err
