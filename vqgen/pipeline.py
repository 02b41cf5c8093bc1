"""The pipeline runner: every stage in order, skipping those whose manifests are current.

A stage is current when its manifest exists and records the hash of the stage's config section
and the hashes of the manifests it read from; anything else runs it again, and a training stage
that runs again resumes from its latest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from accelerate import Accelerator

from vqgen.config import PipelineConfig, config_to_toml
from vqgen.distributed import process_state
from vqgen.errors import ConfigError
from vqgen.manifest import StageResult, is_current, manifest_hash, read_manifest, write_manifest
from vqgen.train import make_accelerator
from vqgen.utils import atomic_write_text


@dataclass(frozen=True)
class Stage:
    name: str
    dir: str
    upstream: tuple[str, ...]
    run: Callable[[PipelineConfig, Path, Accelerator], StageResult]
    config_hash: Callable[[PipelineConfig], str]


def _stages() -> tuple[Stage, ...]:
    # Imported here: each stage module pulls in its models, which `vqgen --help` does not need.
    from vqgen.stages import evaluate, extract_codes, sample, train_prior, train_vqvae

    def prior(level):
        return Stage(
            f"train-prior-{level}",
            train_prior.stage_dir_name(level),
            ("extract-codes",),
            lambda cfg, run_dir, acc: train_prior.run(getattr(cfg.prior, level), level, run_dir, acc),
            lambda cfg: train_prior.config_hash(getattr(cfg.prior, level), level),
        )

    return (
        Stage("train-vqvae", train_vqvae.DIR, (),
              lambda cfg, run_dir, acc: train_vqvae.run(cfg.vqvae, cfg.data, run_dir, acc),
              lambda cfg: train_vqvae.config_hash(cfg.vqvae, cfg.data)),
        Stage("extract-codes", extract_codes.DIR, ("train-vqvae",),
              lambda cfg, run_dir, acc: extract_codes.run(cfg.codes, cfg.data, run_dir, acc),
              lambda cfg: extract_codes.config_hash(cfg.codes, cfg.data)),
        # Bottom first, so the top prior's training pictures are full ancestral samples.
        prior("bottom"),
        prior("top"),
        Stage("sample", sample.DIR, ("train-vqvae", "train-prior-top", "train-prior-bottom"),
              lambda cfg, run_dir, acc: sample.run(cfg.sample, run_dir, acc),
              lambda cfg: sample.config_hash(cfg.sample)),
        Stage("evaluate", evaluate.DIR, ("sample", "extract-codes"),
              lambda cfg, run_dir, acc: evaluate.run(cfg.evaluate, cfg.data, run_dir, acc),
              lambda cfg: evaluate.config_hash(cfg.evaluate, cfg.data)),
    )


def stage_names() -> list[str]:
    return [s.name for s in _stages()]


def _write_resolved_config(cfg: PipelineConfig) -> None:
    if process_state().is_main_process:
        atomic_write_text(cfg.run_dir / "config.toml", config_to_toml(cfg))


def run_stage(cfg: PipelineConfig, stage: Stage, dirs: dict[str, str], force: bool = True) -> dict | None:
    """Run one stage unless (``force`` False and) its manifest is current. Returns the manifest."""
    run_dir = cfg.run_dir
    inputs = {name: manifest_hash(run_dir / dirs[name]) for name in stage.upstream}
    missing = [name for name, h in inputs.items() if h is None]
    if missing:
        raise ConfigError("", f"stage {stage.name} needs {', '.join(missing)} to have finished in {run_dir}")
    config_hash = stage.config_hash(cfg)
    if not force and is_current(run_dir / stage.dir, config_hash, inputs):
        process_state().print(f"[vqgen] {stage.name}: up to date, skipped")
        return read_manifest(run_dir / stage.dir)
    process_state().print(f"[vqgen] {stage.name}: running")
    accelerator = make_accelerator(
        run_dir / stage.dir, mixed_precision=cfg.run.mixed_precision, tracker=cfg.run.tracker, seed=cfg.run.seed
    )
    result = stage.run(cfg, run_dir, accelerator)
    accelerator.wait_for_everyone()
    manifest = None
    if accelerator.is_main_process:
        # Written last: the upstream manifests checked above make the next invocation's skip test.
        manifest = write_manifest(
            run_dir / stage.dir, stage.name, config_hash, inputs, result.outputs, result.metrics
        )
    accelerator.wait_for_everyone()
    return manifest


def run_pipeline(cfg: PipelineConfig, from_stage: str | None = None) -> None:
    """Run all stages in order. ``from_stage``: earlier stages are not run (they must have
    finished) and this one runs even if current; later ones run unless current."""
    stages = _stages()
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise ConfigError("--from", f"unknown stage {from_stage!r} (stages: {', '.join(names)})")
    dirs = {s.name: s.dir for s in stages}
    _write_resolved_config(cfg)
    start = names.index(from_stage) if from_stage else 0
    for i, stage in enumerate(stages[start:], start):
        run_stage(cfg, stage, dirs, force=(from_stage is not None and i == start))


def run_single_stage(cfg: PipelineConfig, name: str) -> dict | None:
    stages = {s.name: s for s in _stages()}
    if name not in stages:
        raise ConfigError("stage", f"unknown stage {name!r} (stages: {', '.join(stages)})")
    _write_resolved_config(cfg)
    return run_stage(cfg, stages[name], {s.name: s.dir for s in stages.values()}, force=True)
