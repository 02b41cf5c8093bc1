"""Two CPU processes (gloo, launched with torchrun): data-parallel training and code extraction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vqgen.models.vqvae2 import VQVAE2

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from ddp_train_vqvae import TINY, RankImages  # noqa: E402

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(*args: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


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


TINY_PIPELINE = """
[run]
name = "{name}"
out_dir = "{out}"
[data]
procedural_size = 37
num_eval = 7
image_size = 16
[vqvae.model]
hidden_channels = 16
res_channels = 8
num_res_blocks = 1
num_codes = 32
code_dim = 8
[vqvae.train]
steps = 2
batch_size = 8
[codes]
batch_size = 4
commit_every = 3
"""


def store_records(path: Path) -> dict[bytes, bytes]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = {k: v for k, v in txn.cursor() if k != b"__meta__"}
    env.close()
    return records


def test_two_process_extraction_writes_each_image_once(tmp_path):
    import shutil

    from vqgen.config import load_config
    from vqgen.pipeline import run_single_stage

    single = tmp_path / "single.toml"
    single.write_text(TINY_PIPELINE.format(name="single", out=tmp_path))
    cfg = load_config(single)
    run_single_stage(cfg, "train-vqvae")
    run_single_stage(cfg, "extract-codes")
    # The same VQ-VAE export, extracted again by two processes.
    shutil.copytree(tmp_path / "single" / "vqvae", tmp_path / "double" / "vqvae")
    double = tmp_path / "double.toml"
    double.write_text(TINY_PIPELINE.format(name="double", out=tmp_path))
    torchrun("-m", "vqgen.cli", "stage", "extract-codes", str(double))
    for store, count in (("codes.lmdb", 37), ("eval.lmdb", 7)):
        one = store_records(tmp_path / "single" / "codes" / store)
        two = store_records(tmp_path / "double" / "codes" / store)
        assert sorted(two) == [f"{i:09d}".encode() for i in range(count)]
        assert one == two
