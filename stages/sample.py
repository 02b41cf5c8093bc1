"""Stage sample: ancestral sampling of top codes, then bottom codes, then the VQ-VAE decoder.

Samples are made in global batches ``b = 0, 1, ...`` of ``batch_size``; batch ``b`` is drawn with
its own generator seeded from ``(seed, b)``, so the samples do not depend on the number of
processes, and process ``p`` makes batches ``p, p + world, ...`` (no index twice, none missing).
Each finished batch is saved at once (``samples/parts/``), so an interrupted run resumes at the
next unfinished batch. The end product: ``samples/samples.npz`` (uint8 images ``[N, C, H, W]`` and
labels) and ``samples/grid.png``.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from vqgen.config import SampleStageConfig
from vqgen.configtools import split_by_role
from vqgen.distributed import shard_indices
from vqgen.stage import Stage, StageResult
from vqgen.models.export import load_model, read_export_info
from vqgen.data.datasets import to_uint8
from vqgen.data.samples import load_samples, save_samples
from vqgen.pictures import save_grid
from vqgen.sampling import sample
from vqgen.utils import atomic_write_bytes, sha256_json

DIR = "samples"


def parts_key(cfg: SampleStageConfig) -> str:
    """What fixes the images of every batch: the defining settings (not ``cached``, ``cuda_graphs``
    or the grid, which give the same codes)."""
    return sha256_json({"sample": split_by_role(cfg)[0]})


def _models_key(run_dir: Path) -> str:
    return "".join(read_export_info(run_dir / d)["sha256"] for d in ("vqvae", "prior-top", "prior-bottom"))


def _reset_parts_if_stale(parts: Path, key: str) -> None:
    """Finished batches are kept for resume only if they came from this config and these models."""
    stamp = parts / "key.txt"
    if parts.exists() and (not stamp.exists() or stamp.read_text() != key):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stamp, key.encode())


@torch.no_grad()
def sample_batch(cfg: SampleStageConfig, models, batch: int, n: int, device, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of global batch ``batch``: uint8 ``[n, C, H, W]`` and labels (-1 if none)."""
    vqvae, top_prior, bottom_prior = models
    # A CPU generator: every random number is drawn on the CPU and moved, so a seed gives the same
    # samples on any device and any number of processes.
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + batch)
    num_classes = top_prior.layout.num_classes
    labels = None
    if num_classes:
        labels = (torch.full((n,), cfg.label) if cfg.label >= 0 else torch.randint(num_classes, (n,), generator=generator)).to(device)
    top = sample(top_prior, n, labels=labels, config=cfg.top, generator=generator, cached=cfg.cached,
                 cuda_graphs=cfg.cuda_graphs, progress=progress)
    bottom_labels = labels if bottom_prior.layout.num_classes else None
    bottom = sample(bottom_prior, n, labels=bottom_labels, condition=top, config=cfg.bottom, generator=generator,
                    cached=cfg.cached, cuda_graphs=cfg.cuda_graphs, progress=progress)
    images = to_uint8(vqvae.decode_codes(top, bottom).float()).cpu()
    return images, (labels.cpu() if labels is not None else torch.full((n,), -1))


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    cfg: SampleStageConfig = sections["sample"]
    stage_dir = run_dir / DIR
    parts = stage_dir / "parts"
    if accelerator.is_main_process:
        _reset_parts_if_stale(parts, parts_key(cfg) + _models_key(run_dir))
    accelerator.wait_for_everyone()
    device = accelerator.device
    models = tuple(load_model(run_dir / d, device=device)[0] for d in ("vqvae", "prior-top", "prior-bottom"))
    num_batches = -(-cfg.num_samples // cfg.batch_size)
    mine = shard_indices(num_batches, accelerator.process_index, accelerator.num_processes)
    todo = [b for b in mine if not (parts / f"batch-{b:06d}.npz").exists()]
    start, made = time.perf_counter(), 0
    for b in tqdm(todo, desc="sample batches", disable=not accelerator.is_main_process):
        n = min(cfg.batch_size, cfg.num_samples - b * cfg.batch_size)
        images, labels = sample_batch(cfg, models, b, n, device, progress=accelerator.is_main_process)
        save_samples(parts / f"batch-{b:06d}.npz", images.numpy(), labels.numpy())
        made += n
    rate = made / max(time.perf_counter() - start, 1e-9)
    metrics = {
        "samples_per_sec": accelerator.reduce(torch.tensor(rate, device=device), "sum").item(),
        "samples_per_process": accelerator.gather(torch.tensor([made], device=device)).tolist(),
    }
    accelerator.wait_for_everyone()
    content = {}
    if accelerator.is_main_process:
        batches = [load_samples(parts / f"batch-{b:06d}.npz") for b in range(num_batches)]
        images = np.concatenate([imgs for imgs, _ in batches])
        labels = np.concatenate([labs for _, labs in batches])
        save_samples(stage_dir / "samples.npz", images, labels)
        save_grid(torch.from_numpy(images[: cfg.grid_size]), stage_dir / "grid.png")
        # The zip's timestamps differ between writes of the same arrays: fingerprint the arrays.
        content["samples.npz"] = hashlib.sha256(repr(images.shape).encode() + images.tobytes() + labels.tobytes()).hexdigest()
    return StageResult({"samples": "samples.npz", "grid": "grid.png", "count": cfg.num_samples}, metrics,
                       files=("samples.npz",), content=content)


STAGES = (Stage("sample", DIR, ("run", "sample"), ("train-vqvae", "train-prior-top", "train-prior-bottom"), run),)
