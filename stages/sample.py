"""Stage sample: ancestral sampling of top codes, then bottom codes, then the VQ-VAE decoder.

Samples are made in global batches ``b = 0, 1, ...`` of ``batch_size``; batch ``b`` is drawn with
its own generator seeded from ``(seed, b)``, so the samples do not depend on the number of
processes, and process ``p`` makes batches ``p, p + world, ...`` (no index twice, none missing).
The drawing is :mod:`vqgen.generate`'s, the one that ``VQGen.sample`` and ``vqgen sample`` use: the
same models and settings give them this stage's images. Each finished batch is saved at once
(``samples/parts/``), so an interrupted run resumes at the next unfinished batch. The end product:
``samples/samples.npz`` (uint8 images ``[N, C, H, W]`` and labels, streamed from the parts, so
memory holds one batch) and ``samples/grid.png``.

With ``sample.rejection`` on, the classifier of the train-classifier stage (``RUN/classifier``, then
one of the stages this one reads) scores every drawn image, and each batch draws candidate rounds
of its own until it has its images (:mod:`vqgen.rejection`: the images still do not depend on the
number of processes). The manifest's metrics then hold the acceptance rate (kept / drawn, over
all batches) and the kept images' mean probability of their intended class.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from vqgen.bundle import CLASSIFIER, run_components
from vqgen.config import SampleStageConfig
from vqgen.errors import ConfigError
from vqgen.configtools import split_by_role
from vqgen.generate import (
    DrawnBatch, SamplePlan, VQGen, finish_parts, rejection_figures, unfinished_batches, write_parts,
)
from vqgen.models.export import load_model, read_export_info
from vqgen.tracking import log_images
from vqgen.stage import Stage, StageResult
from vqgen.utils import atomic_write_bytes, sha256_json

DIR = "samples"


def parts_key(cfg: SampleStageConfig) -> str:
    """What fixes the images of every batch: the defining settings (not ``cached``, ``cuda_graphs``
    or the grid, which give the same codes)."""
    return sha256_json({"sample": split_by_role(cfg)[0]})


def stage_plan(cfg: SampleStageConfig) -> SamplePlan:
    """The stage's settings as the library's plan (``label = -1``: labels drawn uniformly)."""
    return SamplePlan(num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed, top=cfg.top,
                      bottom=cfg.bottom, middle=cfg.middle, labels=(cfg.label,) if cfg.label >= 0 else (), rejection=cfg.rejection)


def model_dirs(run_dir: Path, cfg: SampleStageConfig) -> tuple[str, ...]:
    """The run's model folders this stage reads (the VQ-VAE, a prior per level); the classifier's
    only with rejection sampling."""
    components = run_components(run_dir)
    return (*components, CLASSIFIER) if cfg.rejection.active else components


def _models_key(run_dir: Path, cfg: SampleStageConfig) -> str:
    return "".join(read_export_info(run_dir / d)["sha256"] for d in model_dirs(run_dir, cfg))


def _reset_parts_if_stale(parts: Path, key: str) -> None:
    """Finished batches are kept for resume only if they came from this config and these models."""
    stamp = parts / "key.txt"
    if parts.exists() and (not stamp.exists() or stamp.read_text() != key):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stamp, key.encode())


def sample_batch(cfg: SampleStageConfig, models: VQGen, batch: int, n: int, device,
                 progress: bool = False) -> DrawnBatch:
    """Global batch ``batch`` (``n`` images, on ``device``: what the plan and the models give) drawn
    by the library's one batch function; the stage's hook, which tests wrap to count batches."""
    return models.draw(stage_plan(cfg), batch, progress=progress)


def _naming_key(key: str, check: Callable[[], object]) -> None:
    """``check()``, its ConfigError naming the config key ``key`` rather than the API's argument."""
    try:
        check()
    except ConfigError as err:
        raise ConfigError(key, str(err).split(": ", 1)[1]) from None


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    cfg: SampleStageConfig = sections["sample"]
    plan = stage_plan(cfg)
    stage_dir = run_dir / DIR
    parts = stage_dir / "parts"
    if accelerator.is_main_process:
        _reset_parts_if_stale(parts, parts_key(cfg) + _models_key(run_dir, cfg))
    accelerator.wait_for_everyone()
    device, main = accelerator.device, accelerator.is_main_process
    models = VQGen(*(load_model(run_dir / d, device=device)[0] for d in run_components(run_dir)),
                   classifier=load_model(run_dir / CLASSIFIER, device=device)[0] if cfg.rejection.active else None,
                   cached=cfg.cached, cuda_graphs=cfg.cuda_graphs)
    if cfg.label >= 0:
        _naming_key("sample.label", lambda: models.class_labels(cfg.label))
    _naming_key("sample.rejection", lambda: models.check_plan(plan))
    todo = unfinished_batches(parts, plan, accelerator.process_index, accelerator.num_processes)

    def draw(batch: int) -> DrawnBatch:
        return sample_batch(cfg, models, batch, len(plan.batch_indices(batch)), device, progress=main)

    made, seconds = write_parts(parts, todo, draw, progress=main)
    metrics = {
        "samples_per_sec": accelerator.reduce(torch.tensor(made / max(seconds, 1e-9), device=device), "sum").item(),
        "samples_per_process": accelerator.gather(torch.tensor([made], device=device)).tolist(),
    }
    accelerator.wait_for_everyone()
    content = {}
    if main:
        content["samples.npz"] = finish_parts(parts, plan, stage_dir, cfg.grid_size)
        log_images(accelerator, {"samples": stage_dir / "grid.png"})
        metrics.update(rejection_figures(parts, plan))  # from the parts: the same for any process count
    return StageResult({"samples": "samples.npz", "grid": "grid.png", "count": cfg.num_samples}, metrics,
                       files=("samples.npz",), content=content)


def _rejection_upstream(sections: dict) -> tuple[str, ...]:
    return ("train-classifier",) if sections["sample"].rejection.active else ()


def stages(levels: tuple[str, ...]) -> tuple[Stage, ...]:
    """The sample stage of a hierarchy with ``levels`` (top first): it reads every level's prior."""
    return (Stage("sample", DIR, ("run", "sample"), ("train-vqvae", *(f"train-prior-{level}" for level in levels)),
                  run, conditional_upstream=_rejection_upstream),)
