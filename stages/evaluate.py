"""Stage evaluate: FID of the samples, reconstruction PSNR and rFID, code usage, bits/dim, report.

Writes ``eval/metrics.json`` and ``eval/report.png`` (samples, originals above reconstructions, and
the training curves). The reference statistics of the real evaluation images are cached in
``stats_cache`` (by default next to the runs), keyed by the dataset config, image count and
Inception weights, so scoring new samples does not encode the real data again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from vqgen.config import EvaluateStageConfig
from vqgen.data.code_inspection import inspect_store
from vqgen.data.datasets import DataConfig, to_uint8
from vqgen.data.samples import load_samples
from vqgen.manifest import read_manifest
from vqgen.stage import Stage, StageResult
from vqgen.metrics import InceptionFeatures, score_images
from vqgen.metrics.image import psnr
from vqgen.models.export import load_model
from vqgen.pictures import draw_curves, image_grid, save_png, stack_panels
from vqgen.scoring import real_batches, reference_stats
from vqgen.tracking import read_metrics_csv
from vqgen.utils import atomic_write_json

DIR = "eval"


@torch.no_grad()
def reconstructions(vqvae, dataset, count: int, batch_size: int, device):
    """(originals, reconstructions) as uint8 ``[count, C, H, W]``."""
    originals, recons = [], []
    for batch in real_batches(dataset, count, batch_size):
        images = batch.float().div(127.5).sub(1).to(device)
        recons.append(to_uint8(vqvae.decode_codes(*vqvae.encode(images)).float()).cpu())
        originals.append(batch)
    return torch.cat(originals), torch.cat(recons)


def training_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The curves worth a look: VQ-VAE reconstruction error, priors' train and validation bits/dim."""
    wanted = {"vqvae": ("recon_mse", "val_psnr"), "prior-top": ("bits_per_dim", "val_bits_per_dim"),
              "prior-bottom": ("bits_per_dim", "val_bits_per_dim")}
    curves = {}
    for stage, names in wanted.items():
        path = run_dir / stage / "metrics.csv"
        if path.exists():
            series = read_metrics_csv(path)
            curves.update({f"{stage}/{n}": series[n] for n in names if n in series})
    return curves


def write_report(path: Path, samples: np.ndarray, originals, recons, run_dir: Path, metrics: dict) -> None:
    n = min(16, len(originals))
    panels = [
        (f"samples (FID {metrics['fid']:.2f} over {metrics['fid_num_samples']} samples)", image_grid(torch.from_numpy(samples[:64]))),
        (f"originals / reconstructions (PSNR {metrics['recon_psnr']:.2f} dB, rFID {metrics['rfid']:.2f})",
         image_grid(torch.cat([originals[:n], recons[:n]]), ncol=n)),
    ]
    curves = training_curves(run_dir)
    if curves:
        panels.append(("training curves", draw_curves(curves, size=(760, 220))))
    save_png(stack_panels(panels), path)


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    cfg, data = sections["evaluate"], sections["data"]
    metrics: dict = {}
    if accelerator.is_main_process:  # FID is computed on one process; the others wait
        metrics = evaluate(cfg, data, run_dir, accelerator.device)
    accelerator.wait_for_everyone()
    return StageResult({"metrics": "metrics.json", "report": "report.png"}, metrics, files=("metrics.json",))


def evaluate(cfg: EvaluateStageConfig, data: DataConfig, run_dir: Path, device) -> dict:
    stage_dir = run_dir / DIR
    extractor = InceptionFeatures(cfg.inception_weights or None, device=device)
    reference, eval_set, num_real = reference_stats(cfg, data, run_dir.parent, extractor)
    num_recon = min(cfg.num_recon or num_real, len(eval_set))
    samples, _ = load_samples(run_dir / "samples" / "samples.npz")
    vqvae, _, _ = load_model(run_dir / "vqvae", device=device)
    originals, recons = reconstructions(vqvae, eval_set, num_recon, cfg.batch_size, device)
    metrics = {
        "fid": score_images(samples, reference, extractor, batch_size=cfg.batch_size, progress=True),
        "fid_num_samples": int(len(samples)),
        "fid_num_real": num_real,
        "rfid": score_images(recons, reference, extractor, batch_size=cfg.batch_size, progress=True),
        "recon_psnr": psnr(recons, originals, data_range=255.0)[1],
        "recon_num_images": num_recon,
    }
    store = run_dir / "codes" / ("eval.lmdb" if (run_dir / "codes" / "eval.lmdb").exists() else "codes.lmdb")
    for level in inspect_store(store)["levels"]:
        metrics[f"codebook_usage_{level['name']}"] = level["usage_fraction"]
    for level in ("top", "bottom"):
        manifest = read_manifest(run_dir / f"prior-{level}") or {}
        metrics[f"bits_per_dim_{level}"] = manifest.get("metrics", {}).get("val_bits_per_dim")
    sample_manifest = read_manifest(run_dir / "samples") or {}
    metrics["samples_per_sec"] = sample_manifest.get("metrics", {}).get("samples_per_sec")
    atomic_write_json(stage_dir / "metrics.json", metrics)
    write_report(stage_dir / "report.png", samples, originals, recons, run_dir, metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


# The VQ-VAE (reconstructions), the codes (usage), the priors (bits/dim) and the samples.
STAGES = (Stage("evaluate", DIR, ("run", "data", "evaluate"),
                ("train-vqvae", "extract-codes", "train-prior-top", "train-prior-bottom", "sample"), run),)
