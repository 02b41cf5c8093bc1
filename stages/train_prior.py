"""Stage train-prior: train the gated PixelCNN prior of one level on the extracted codes.

Writes ``prior-top/`` or ``prior-bottom/``: ``checkpoints/``, ``model.safetensors`` + ``model.json``,
``metrics.csv`` (train and validation bits/dim), ``samples.png`` while training, ``manifest.json``.
The bottom prior is trained first in a pipeline, so the top prior's ``samples.png`` shows full
ancestral samples (top codes → bottom codes → image); a bottom prior's samples are bottom codes
drawn for the top codes of real held-out images. The export holds the weights with the lowest
validation bits/dim among the evaluations (``train.export_best``): on small datasets the priors,
the bottom one especially, overfit long before the last step. With ``train.ema_decay`` the
evaluations, and so the export, are of the weight average (see ``vqgen/ema.py``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from vqgen.config import PriorStageConfig
from vqgen.data.code_dataset import CodeDataset
from vqgen.distributed import shard_loader
from vqgen.errors import ConfigError
from vqgen.evaluation import prior_bits_per_dim, prior_loss_fn
from vqgen.tracking import log_images
from vqgen.stage import Stage, StageResult
from vqgen.models.export import export_model, load_model
from vqgen.models.pixelcnn import GatedPixelCNN, PriorLayout
from vqgen.pictures import save_grid
from vqgen.sampling import SamplerConfig, sample
from vqgen.train import best_weights, fit

Level = Literal["top", "bottom"]


def stage_dir_name(level: Level) -> str:
    return f"prior-{level}"


def store_layout(store: CodeDataset, level: Level, class_conditional: bool) -> PriorLayout:
    """What the prior of ``level`` models and reads, as the code store holds it."""
    if class_conditional and store.num_classes == 0:
        raise ConfigError("class_conditional", "the code store holds no class labels")
    bottom = level == "bottom"
    return PriorLayout(
        num_codes=store.num_codes[level],
        shape=tuple(store.shapes[level]),
        num_classes=store.num_classes if class_conditional else 0,
        condition_num_codes=store.num_codes["top"] if bottom else 0,
        condition_shape=tuple(store.shapes["top"]) if bottom else (),
    )


@torch.no_grad()
def write_samples(prior, level: Level, run_dir: Path, eval_store, n: int, path: Path, device) -> None:
    """``samples.png``: decoded samples of the prior being trained (see the module docstring)."""
    vqvae, _, _ = load_model(run_dir / "vqvae", device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    labels = None
    if prior.layout.num_classes:
        labels = torch.arange(n, device=device) % prior.layout.num_classes
    real = [eval_store[i] for i in range(min(n, len(eval_store)))]
    if level == "top":
        top = sample(prior, len(real), labels=labels[: len(real)] if labels is not None else None,
                     config=SamplerConfig(), generator=generator)
        bottom_dir = run_dir / stage_dir_name("bottom")
        if (bottom_dir / "model.json").exists():
            bottom_prior, _, _ = load_model(bottom_dir, device=device)
            bottom = sample(bottom_prior, len(real), labels=labels[: len(real)] if bottom_prior.layout.num_classes else None,
                            condition=top, config=SamplerConfig(), generator=generator)
        else:  # no bottom prior yet: show the top samples over real bottom codes
            bottom = torch.stack([r["bottom"] for r in real]).to(device)
    else:
        top = torch.stack([r["top"] for r in real]).to(device)
        lab = torch.tensor([r["label"] for r in real], device=device) if prior.layout.num_classes else None
        bottom = sample(prior, len(real), labels=lab, condition=top, config=SamplerConfig(), generator=generator)
    save_grid(vqvae.decode_codes(top.to(device), bottom.to(device)).float().cpu(), path)


def run(sections: dict, run_dir: Path, accelerator: Accelerator, *, level: Level) -> StageResult:
    cfg: PriorStageConfig = sections[f"prior.{level}"]
    stage_dir = run_dir / stage_dir_name(level)
    codes_dir = run_dir / "codes"
    train_store = CodeDataset(codes_dir / "codes.lmdb")
    eval_path = codes_dir / "eval.lmdb"
    eval_store = CodeDataset(eval_path) if eval_path.exists() else train_store
    layout = store_layout(train_store, level, cfg.class_conditional)
    model = GatedPixelCNN(cfg.model, layout)
    eval_loader = shard_loader(eval_store, cfg.train.batch_size, accelerator, cfg.train.num_workers)

    def evaluate(model):
        bpd = prior_bits_per_dim(model, eval_loader, accelerator, level, cfg.class_conditional, cfg.eval_batches)
        return {"val_bits_per_dim": bpd}

    def snapshot(model, step):
        if accelerator.is_main_process and cfg.num_sample_images:
            write_samples(model, level, run_dir, eval_store, cfg.num_sample_images, stage_dir / "samples.png", accelerator.device)
            log_images(accelerator, {"samples": stage_dir / "samples.png"}, step)

    loss_fn = prior_loss_fn(level, cfg.class_conditional)
    state = fit(model, train_store, cfg.train, accelerator, stage_dir, loss_fn, evaluate, snapshot, "val_bits_per_dim")
    model = best_weights(accelerator.unwrap_model(model), state, stage_dir)
    bpd = prior_bits_per_dim(model, eval_loader, accelerator, level, cfg.class_conditional)
    checksum = export_model(model, stage_dir) if accelerator.is_main_process else None
    outputs = {"model": "model.safetensors", "model_sha256": checksum, "steps": state.step,
               "exported_step": state.best_step if state.best_step >= 0 else state.step}
    metrics = {"val_bits_per_dim": bpd, "uniform_bits_per_dim": math.log2(layout.num_codes)}
    return StageResult(outputs, metrics, files=("model.safetensors", "model.json"))


# Bottom first: the top prior's training pictures are then full ancestral samples.
STAGES = tuple(
    Stage(f"train-prior-{level}", stage_dir_name(level), ("run", f"prior.{level}"), ("extract-codes",),
          functools.partial(run, level=level))
    for level in ("bottom", "top")
)
