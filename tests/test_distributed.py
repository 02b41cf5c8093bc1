"""Two CPU processes (gloo, launched with torchrun): data-parallel training and code extraction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny_pipeline import TINY_PIPELINE, tiny_config
from vqgen.models.vqvae2 import VQVAE2

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from ddp_train_vqvae import TINY, RankImages  # noqa: E402

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(*args: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]


def codebook_fit(model: VQVAE2, images: torch.Tensor) -> float:
    """Commitment loss (distance of encoder outputs to their codes) of both levels, no update."""
    model.eval()
    with torch.no_grad():
        return model(images).commitment_loss.item()


def test_ddp_training_keeps_ranks_identical(tmp_path):
    torchrun(str(SCRIPTS / "ddp_train_vqvae.py"), str(tmp_path))
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    initial = load_file(str(tmp_path / "initial.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    for key in ("quantizer_top.codebook", "quantizer_bottom.codebook", "decoder.0.weight"):
        assert not torch.equal(rank0[key], initial[key]), f"{key} did not train"
    # The shared codebook moved towards both ranks' data: each rank's images are quantized with
    # less error by the trained codebooks than by the initial ones (same encoder, swapped codebooks).
    model = VQVAE2(TINY)
    model.load_state_dict(rank0)
    model.eval()
    for rank in (0, 1):
        images = RankImages(rank).images
        trained = codebook_fit(model, images)
        codebooks = {k: v for k, v in initial.items() if k.endswith(("codebook", "ema_cluster_size", "ema_embed_sum"))}
        model.load_state_dict({**rank0, **codebooks})
        untrained = codebook_fit(model, images)
        model.load_state_dict(rank0)
        assert trained < untrained, f"rank {rank}: codebooks did not move towards its data ({trained} >= {untrained})"


# Uneven splits: 37 = 19 + 18 training and 7 = 4 + 3 evaluation images, 11 samples in 4 batches.
SPLITS = ("data.procedural.size=37", "data.num_eval=7", "codes.batch_size=4", "codes.commit_every=3",
          "sample.num_samples=11", "sample.batch_size=3")


def tiny_cli_args(root: Path, name: str) -> list[str]:
    """The tiny pipeline with :data:`SPLITS`, as ``vqgen`` command arguments."""
    sets = [f"run.out_dir={root}", f"run.name={name}", "run.tracker=none", *SPLITS]
    return [str(TINY_PIPELINE), *(item for s in sets for item in ("--set", s))]


def store_records(path: Path) -> dict[bytes, bytes]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = {k: v for k, v in txn.cursor() if k != b"__meta__"}
    env.close()
    return records


def test_two_process_extraction_writes_each_image_once(tmp_path):
    import shutil

    from vqgen.pipeline import run_single_stage

    cfg = tiny_config(tmp_path, "single", *SPLITS)
    run_single_stage(cfg, "train-vqvae")
    run_single_stage(cfg, "extract-codes")
    # The same VQ-VAE export, extracted again by two processes.
    shutil.copytree(tmp_path / "single" / "vqvae", tmp_path / "double" / "vqvae")
    torchrun("-m", "vqgen.cli", "stage", "extract-codes", *tiny_cli_args(tmp_path, "double"))
    metrics = json.loads((tmp_path / "double" / "codes" / "manifest.json").read_text())["metrics"]
    # The work was split: 37 = 19 + 18 and 7 = 4 + 3 images, each encoded by one process only.
    assert metrics["train_images_per_process"] == [19, 18]
    assert metrics["eval_images_per_process"] == [4, 3]
    for store, count in (("codes.lmdb", 37), ("eval.lmdb", 7)):
        one = store_records(tmp_path / "single" / "codes" / store)
        two = store_records(tmp_path / "double" / "codes" / store)
        assert sorted(two) == [f"{i:09d}".encode() for i in range(count)]
        assert one == two


def test_two_process_sampling_splits_batches_exactly(tmp_path):
    import shutil

    import numpy as np

    from vqgen.pipeline import run_single_stage

    cfg = tiny_config(tmp_path, "single", *SPLITS)
    for stage in ("train-vqvae", "extract-codes", "train-prior-bottom", "train-prior-top", "sample"):
        run_single_stage(cfg, stage)
    for stage_dir in ("vqvae", "codes", "prior-top", "prior-bottom"):
        shutil.copytree(tmp_path / "single" / stage_dir, tmp_path / "double" / stage_dir)
    torchrun("-m", "vqgen.cli", "stage", "sample", *tiny_cli_args(tmp_path, "double"))
    # 11 samples in 4 batches over 2 processes: each batch drawn once, seeded by its global index,
    # so the two-process samples are exactly the single-process ones, in order.
    with np.load(tmp_path / "single" / "samples" / "samples.npz") as one, \
         np.load(tmp_path / "double" / "samples" / "samples.npz") as two:
        assert one["images"].shape[0] == two["images"].shape[0] == 11
        assert np.array_equal(one["images"], two["images"])
        assert np.array_equal(one["labels"], two["labels"])
    # batches 0 and 2 (3 + 3 samples) on rank 0, batches 1 and 3 (3 + 2) on rank 1
    metrics = json.loads((tmp_path / "double" / "samples" / "manifest.json").read_text())["metrics"]
    assert metrics["samples_per_process"] == [6, 5]
