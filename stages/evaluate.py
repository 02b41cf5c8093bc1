"""Stage evaluate: the samples' FID, KID, Inception Score, precision/recall and per-class FID, the
reconstructions' PSNR, rFID and KID, code usage, bits/dim, and the report.

Writes ``eval/metrics.json`` (with the reference, the image counts, the feature extractor and the
resize convention) and ``eval/report.png`` (samples, originals above reconstructions, the training
curves). Every process encodes its share of the images (:mod:`vqgen.scoring`). The reference
features are cached in ``stats_cache`` (by default next to the runs), keyed by the dataset config,
split, image count, weights and resize, so scoring new samples does not encode the real data again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from vqgen.config import EvaluateStageConfig
from vqgen.data.code_inspection import inspect_store
from vqgen.data.datasets import DataConfig, build_dataset, to_uint8
from vqgen.data.samples import load_samples
from vqgen.manifest import read_manifest
from vqgen.distributed import on_main_process
from vqgen.metrics.inception_weights import check_inception_weights
from vqgen.tracking import log_images
from vqgen.stage import Stage, StageResult, folder_index_dir, check_data
from vqgen.metrics.image import psnr
from vqgen.models.export import load_model
from vqgen.pictures import draw_curves, image_grid, labelled_grid, save_png, stack_panels
from vqgen.scoring import (
    array_images, dataset_images, extractor_info, features_of, gather_rows, load_stats_file, make_extractor,
    reference_features, sample_metrics,
)
from vqgen.tracking import read_metrics_csv
from vqgen.utils import atomic_write_json, check_writable

DIR = "eval"


def reconstruction_images(vqvae, dataset, device, psnr_of: dict[int, float]):
    """:data:`~vqgen.scoring.ImagesAt` of the VQ-VAE's reconstructions of ``dataset``'s images;
    records each image's PSNR (dB, against its original) in ``psnr_of``."""

    @torch.no_grad()
    def images_at(indices):
        originals, labels = dataset_images(dataset)(indices)
        recons = to_uint8(vqvae.decode_codes(*vqvae.encode(originals.float().div(127.5).sub(1).to(device))).float()).cpu()
        per_image, _ = psnr(recons, originals, data_range=255.0)
        psnr_of.update(zip(indices, per_image.tolist()))
        return recons, labels

    return images_at


def training_curves(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The curves worth a look, one panel per quantity with its training and validation series:
    the VQ-VAE's reconstruction error and PSNR, each prior's bits/dim."""
    panels = {"vqvae: loss": {"train": "loss", "val recon MSE": "val_recon_mse", "train recon MSE": "recon_mse"},
              "vqvae: PSNR (dB)": {"val": "val_psnr"}}
    for folder in sorted(run_dir.glob("prior-*"), reverse=True):  # prior-top, prior-middle, prior-bottom
        panels[f"{folder.name}: bits/dim"] = {"train": "bits_per_dim", "val": "val_bits_per_dim"}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for title, wanted in panels.items():
        path = run_dir / title.split(":")[0] / "metrics.csv"
        if path.exists():
            series = read_metrics_csv(path)
            curves[title] = {label: series[name] for label, name in wanted.items() if series.get(name)}
    return curves


def write_report(path: Path, samples: np.ndarray, labels: np.ndarray | None, class_names: tuple[str, ...],
                 originals, recons, run_dir: Path, metrics: dict) -> None:
    n = min(16, len(originals))
    images = torch.from_numpy(samples[:256])
    conditional = labels is not None and (labels >= 0).any()
    grid = labelled_grid(images, labels[:256], class_names) if conditional else image_grid(images[:64])
    panels = [
        (f"samples{' by class' if conditional else ''} (FID {metrics['fid']:.2f}, KID {_kid_text(metrics)} "
         f"over {metrics['num_samples']} samples)", grid),
        (f"originals / reconstructions (PSNR {metrics['recon_psnr']:.2f} dB, rFID {metrics['rfid']:.2f})",
         image_grid(torch.cat([originals[:n], recons[:n]]), ncol=n)),
    ]
    curves = training_curves(run_dir)
    if curves:
        panels.append(("training curves", draw_curves(curves, size=(760, 220), log_scale=("loss",))))
    save_png(stack_panels(panels), path)


def _kid_text(metrics: dict) -> str:
    if "kid_mean" not in metrics:
        return "n/a"
    return f"{metrics['kid_mean'] * 1e3:.2f}e-3 ± {metrics['kid_std'] * 1e3:.2f}e-3"


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    metrics = evaluate(sections["evaluate"], sections["data"], run_dir, accelerator.device)
    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    log_images(accelerator, {"report": run_dir / DIR / "report.png"})
    return StageResult({"metrics": "metrics.json", "report": "report.png"}, metrics, files=("metrics.json",))


def evaluate(cfg: EvaluateStageConfig, data: DataConfig, run_dir: Path, device) -> dict:
    """Every process encodes its share of the images; the main process computes the metrics and
    writes ``metrics.json`` and the report, and every process returns them."""
    stage_dir = run_dir / DIR
    extractor = make_extractor(cfg, device)
    cache_dir = stats_cache_dir(cfg, run_dir.parent)
    reference = reference_features(cfg, data, cache_dir, extractor)
    samples, labels = load_samples(run_dir / "samples" / "samples.npz")
    fake = features_of(array_images(samples, labels), len(samples), extractor, cfg.batch_size, "sample features")
    eval_set = build_dataset(data, "eval", index_dir=folder_index_dir(run_dir))
    num_recon = min(cfg.num_recon or reference.info["num_real"] or len(eval_set), len(eval_set))
    vqvae, _, _ = load_model(run_dir / "vqvae", device=device)
    psnr_of: dict[int, float] = {}
    recon = features_of(reconstruction_images(vqvae, eval_set, device, psnr_of), num_recon, extractor,
                        cfg.batch_size, "reconstruction features")
    mine = sorted(psnr_of)
    psnr_all = gather_rows(torch.tensor([psnr_of[i] for i in mine], dtype=torch.float64), num_recon)

    def finish() -> dict:
        metrics = {**sample_metrics(cfg, reference, fake), **reference.info, "num_samples": int(len(samples)),
                   **extractor_info(extractor)}
        recon_metrics = sample_metrics(cfg, reference, recon)
        metrics.update({"rfid": recon_metrics.pop("fid"), "recon_psnr": float(psnr_all.mean()), "recon_num_images": num_recon})
        metrics.update({f"recon_{name}": value for name, value in recon_metrics.items()
                        if name.startswith(("kid", "precision", "recall"))})
        metrics.update(_upstream_figures(run_dir))
        atomic_write_json(stage_dir / "metrics.json", metrics)
        originals, recons = reconstruction_pictures(vqvae, eval_set, min(16, num_recon), device)
        write_report(stage_dir / "report.png", samples, labels, eval_set.class_names, originals, recons, run_dir, metrics)
        print(json.dumps(metrics, indent=2))
        return metrics

    return on_main_process(finish)


def reconstruction_pictures(vqvae, dataset, count: int, device):
    """``(originals, reconstructions)`` uint8 of the first ``count`` images, for the report."""
    indices = list(range(count))
    recons, _ = reconstruction_images(vqvae, dataset, device, {})(indices)
    return dataset_images(dataset)(indices)[0], recons


def _upstream_figures(run_dir: Path) -> dict:
    """Code usage, the priors' validation bits/dim, the sampling speed and (with rejection
    sampling) its acceptance rate, from the earlier stages."""
    figures: dict = {}
    store = run_dir / "codes" / ("eval.lmdb" if (run_dir / "codes" / "eval.lmdb").exists() else "codes.lmdb")
    for level in inspect_store(store)["levels"]:
        figures[f"codebook_usage_{level['name']}"] = level["usage_fraction"]
    for level in inspect_store(store)["levels"]:
        manifest = read_manifest(run_dir / f"prior-{level['name']}") or {}
        figures[f"bits_per_dim_{level['name']}"] = manifest.get("metrics", {}).get("val_bits_per_dim")
    sample_manifest = read_manifest(run_dir / "samples") or {}
    figures["samples_per_sec"] = sample_manifest.get("metrics", {}).get("samples_per_sec")
    for key in ("acceptance_rate", "mean_intended_probability"):  # rejection sampling, when it was on
        if key in sample_manifest.get("metrics", {}):
            figures[f"sample_{key}"] = sample_manifest["metrics"][key]
    return figures


def preflight(sections: dict) -> None:
    """Before the run's first stage: the weights (fetched now if missing and allowed), the data
    root, a readable statistics file when that is the reference, and a writable statistics cache."""
    cfg: EvaluateStageConfig = sections["evaluate"]
    check_data(sections)
    check_inception_weights(cfg.inception_weights or None, url=cfg.inception_url or None, download=cfg.download_weights)
    if cfg.reference_split is None:
        load_stats_file(Path(cfg.reference).expanduser())
    check_writable(stats_cache_dir(cfg, Path(sections["run"].out_dir)), "the reference statistics cache (evaluate.stats_cache)")


def stats_cache_dir(cfg: EvaluateStageConfig, out_dir: Path) -> Path:
    return Path(cfg.stats_cache) if cfg.stats_cache else out_dir / "fid-stats"


def stages(levels: tuple[str, ...]) -> tuple[Stage, ...]:
    """The evaluate stage of a hierarchy with ``levels``: it reads the VQ-VAE (reconstructions), the
    codes (usage), every prior (bits/dim) and the samples."""
    upstream = ("train-vqvae", "extract-codes", *(f"train-prior-{level}" for level in levels), "sample")
    return (Stage("evaluate", DIR, ("run", "data", "evaluate"), upstream, run,
                  preflight=lambda sections: on_main_process(lambda: preflight(sections)),
                  enabled=lambda sections: sections["evaluate"].enabled),)
