"""Stage train-vqvae: train the hierarchical VQ-VAE-2 and export it for the later stages.

The export holds the weights with the lowest validation reconstruction MSE among the evaluations
(``train.export_best``); with ``train.ema_decay`` they are the weight average's (see
``vqgen/ema.py``). Writes ``vqvae/``: ``checkpoints/`` (for resume), ``model.safetensors`` +
``model.json``, ``metrics.csv``, ``recon.png`` (originals above reconstructions) and
``manifest.json`` last.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from vqgen.config import VQVAEStageConfig
from vqgen.data.datasets import DataConfig, build_dataset, skipped_files_report
from vqgen.distributed import shard_loader
from vqgen.evaluation import reconstruction_metrics, vqvae_loss
from vqgen.tracking import log_images
from vqgen.stage import Stage, StageResult, folder_index_dir, check_data
from vqgen.models.export import export_model
from vqgen.models.vqvae2 import VQVAE2
from vqgen.pictures import save_grid
from vqgen.train import best_weights, fit
from vqgen.utils import eval_mode

DIR = "vqvae"


def write_recon_grid(model: VQVAE2, images: torch.Tensor, path: Path) -> None:
    """``recon.png``: the originals in the top row, their reconstructions below."""
    with torch.no_grad(), eval_mode(model):
        recon = model.decode_codes(*model.encode(images))
    save_grid(torch.cat([images.cpu(), recon.float().cpu()]), path, ncol=images.shape[0])


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    cfg: VQVAEStageConfig = sections["vqvae"]
    data: DataConfig = sections["data"]
    stage_dir = run_dir / DIR
    train_set = build_dataset(data, "train", augment=data.hflip, index_dir=folder_index_dir(run_dir))
    eval_set = build_dataset(data, "eval", index_dir=folder_index_dir(run_dir))
    eval_loader = shard_loader(eval_set, cfg.train.batch_size, accelerator, cfg.train.num_workers)
    preview = torch.stack([eval_set[i][0] for i in range(min(cfg.num_recon_images, len(eval_set)))])
    model = VQVAE2(cfg.model)

    def evaluate(model):
        return reconstruction_metrics(model, eval_loader, accelerator, max_batches=cfg.eval_batches)

    def snapshot(model, step):
        if accelerator.is_main_process:
            write_recon_grid(model, preview.to(accelerator.device), stage_dir / "recon.png")
            log_images(accelerator, {"recon": stage_dir / "recon.png"}, step)

    state = fit(model, train_set, cfg.train, accelerator, stage_dir, vqvae_loss, evaluate, snapshot, "val_recon_mse")
    model, exported_step = best_weights(accelerator.unwrap_model(model), state, stage_dir, cfg.train)
    metrics = reconstruction_metrics(model, eval_loader, accelerator)  # the whole eval split
    checksum = export_model(model, stage_dir) if accelerator.is_main_process else None
    outputs = {"model": "model.safetensors", "model_sha256": checksum, "steps": state.step,
               "exported_step": exported_step}
    skipped, lines = skipped_files_report(train=train_set, eval=eval_set)
    for line in lines:
        accelerator.print(f"[vqgen] {line}")
    metrics.update(skipped)
    return StageResult(outputs, metrics, files=("model.safetensors", "model.json"))


STAGES = (Stage("train-vqvae", DIR, ("run", "data", "vqvae"), (), run, preflight=check_data),)
