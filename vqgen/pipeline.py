"""The pipeline runner: every stage in order, each skipped, continued or restarted as its inputs say.

A stage's *definition* is everything its result depends on: the defining values of the config
sections it reads (its own, ``data`` where it reads images, ``run``) and the output fingerprints of
the stages it reads. Its *schedule* is the rest of those sections (steps, logging, checkpoint and
picture intervals, workers; see :func:`vqgen.configtools.schedule_field`). Then:

- same definition, same schedule, finished, outputs intact → skipped;
- same definition, otherwise → run, continuing from its own checkpoints and partial outputs (a
  longer ``train.steps`` continues training; damaged outputs are deleted and made again);
- another definition, or a folder with no record of the definition its files came from →
  restarted from an empty folder, so nothing made under the old inputs survives in the run, and
  since the stage's outputs change, every stage that reads them restarts in turn. The old folder is
  set aside in ``RUN/.previous/`` until the new one finishes, and deleted then: a change that fails
  (a typo in a data path, a corrupt file) loses nothing, and going back to the old config brings
  the old folder back instead of redoing its work.

The decision is taken on the main process and shared, so all processes of a launch agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vqgen.config import PipelineConfig, config_to_toml
from vqgen.configtools import split_by_role
from vqgen.distributed import on_main_process, process_state
from vqgen.errors import ConfigError, VQGenError
from vqgen.manifest import (
    MANIFEST, STARTED, Decision, StageSpec, damaged_outputs, decide, output_fingerprint,
    read_manifest, read_started, write_manifest, write_started,
)
from vqgen.runlock import RunLock
from vqgen.stage import Stage, section
from vqgen.tracking import require_tracker
from vqgen.train import make_accelerator
from vqgen.utils import atomic_write_text


def stage_table(cfg: PipelineConfig | None = None) -> tuple[Stage, ...]:
    """Every stage in pipeline order, with one prior stage per level of ``cfg``'s VQ-VAE (the
    defaults' two without a config): the one table the runner and the CLI share."""
    # Imported here: each stage module pulls in its models, which `vqgen --help` does not need.
    from vqgen.stages import evaluate, extract_codes, sample, train_classifier, train_prior, train_vqvae

    levels = (cfg or PipelineConfig()).vqvae.model.level_names
    return (*train_vqvae.STAGES, *extract_codes.STAGES, *train_prior.stages(levels), *train_classifier.STAGES,
            *sample.stages(levels), *evaluate.stages(levels))


def stage_names(cfg: PipelineConfig | None = None) -> list[str]:
    return [s.name for s in stage_table(cfg)]


def stage_sections(cfg: PipelineConfig, stage: Stage) -> dict[str, Any]:
    return {path: section(cfg, path) for path in stage.sections}


def stage_spec(cfg: PipelineConfig, stage: Stage, inputs: dict[str, str]) -> StageSpec:
    definition: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    for name, values in stage_sections(cfg, stage).items():
        definition[name], schedule[name] = split_by_role(values)
    definition["inputs"] = inputs
    return StageSpec(definition, schedule)


def upstream_fingerprints(cfg: PipelineConfig, stage: Stage, dirs: dict[str, str]) -> dict[str, str]:
    """The output fingerprints of the stages ``stage`` reads; each must have finished, intact."""
    inputs = {}
    for name in stage.upstream_of(stage_sections(cfg, stage)):
        upstream_dir = cfg.run_dir / dirs[name]
        fingerprint = output_fingerprint(upstream_dir)
        if fingerprint is None:
            raise ConfigError("", f"stage {stage.name} needs {name} to have finished in {cfg.run_dir}"
                                  + _switched_off_hint(cfg, name))
        damaged = damaged_outputs(upstream_dir, read_manifest(upstream_dir) or {})
        if damaged:
            raise VQGenError(f"stage {stage.name} reads the outputs of {name}, which are damaged "
                             f"({'; '.join(damaged.values())}): run the pipeline again to remake them")
        inputs[name] = fingerprint
    return inputs


def _switched_off_hint(cfg: PipelineConfig, name: str) -> str:
    """``" (it is switched off: ...)"`` when stage ``name`` is switched off in ``cfg``, else ``""``."""
    upstream = {s.name: s for s in stage_table(cfg)}[name]
    if upstream.is_enabled(stage_sections(cfg, upstream)):
        return ""
    return (f" (it is switched off: set {upstream.switch or 'its enabled key'} = true, or run "
            f"`vqgen stage {name}` first)")


def check_upstream_switches(cfg: PipelineConfig, todo: tuple[Stage, ...]) -> None:
    """A ConfigError naming the switch when a stage that will run reads a switched-off stage that
    has not finished: said before the first stage, not after the training before it."""
    stages = {s.name: s for s in stage_table(cfg)}
    for stage in todo:
        for name in stage.upstream_of(stage_sections(cfg, stage)):
            upstream = stages[name]
            if upstream.is_enabled(stage_sections(cfg, upstream)) or output_fingerprint(cfg.run_dir / upstream.dir):
                continue
            raise ConfigError(upstream.switch, f"stage {stage.name} reads the outputs of {name}, which is "
                                               f"switched off and has not finished in {cfg.run_dir}: set "
                                               f"{upstream.switch or 'its enabled key'} = true")


PREVIOUS = ".previous"


def _delete(folder: Path) -> None:
    """Delete a stage folder. Its records go first: a kill midway leaves files with no record,
    which the next run sets aside as well."""
    for record in (STARTED, MANIFEST):
        (folder / record).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        raise VQGenError(f"cannot delete {folder}: remove it by hand")


def _swap_in_previous(stage_dir: Path, previous: Path, spec: StageSpec) -> bool:
    """Set the stage folder aside in ``previous``; when ``previous`` already holds the work of
    ``spec``'s definition (the config went back), that work comes back into the stage folder."""
    restore = (read_started(previous) or {}).get("definition_hash") == spec.definition_hash
    previous.parent.mkdir(exist_ok=True)
    swap = previous.with_name(previous.name + ".swap")
    if swap.exists():
        _delete(swap)
    if restore:
        previous.rename(swap)
    elif previous.exists():
        _delete(previous)
    if stage_dir.exists():
        stage_dir.rename(previous)
    if restore:
        swap.rename(stage_dir)
    return restore


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _prepare(cfg: PipelineConfig, stage: Stage, dirs: dict[str, str], force: bool,
             writable: bool) -> tuple[str, str, StageSpec]:
    """Main process: decide, then clear what the decision says must go and record the definition."""
    stage_dir = cfg.run_dir / stage.dir
    spec = stage_spec(cfg, stage, upstream_fingerprints(cfg, stage, dirs))
    decision: Decision = decide(stage_dir, spec, force)
    if decision.action == "skip":
        return decision.action, decision.reason, spec
    if not writable:
        raise VQGenError(f"run folder {cfg.run_dir} cannot be written (read-only?), and stage {stage.name} "
                         f"would have to run: {decision.reason}")
    previous = cfg.run_dir / PREVIOUS / stage.dir
    if decision.action == "restart" and _swap_in_previous(stage_dir, previous, spec):
        decision = decide(stage_dir, spec, force)
        if decision.action == "skip":  # finished work is back: the attempt it replaced goes
            _delete(previous)
            return "restored", decision.reason, spec
    (stage_dir / MANIFEST).unlink(missing_ok=True)  # the folder is about to change: not finished
    for name in decision.damaged:
        _remove(stage_dir / name)
    write_started(stage_dir, spec)
    return decision.action, decision.reason, spec


def run_stage(cfg: PipelineConfig, stage: Stage, dirs: dict[str, str], force: bool = False,
              writable: bool = True) -> dict | None:
    """Skip, continue or restart one stage (see the module docstring). Returns its manifest."""
    action, reason, spec = on_main_process(lambda: _prepare(cfg, stage, dirs, force, writable))
    state = process_state()
    previous = cfg.run_dir / PREVIOUS / stage.dir
    if action in ("skip", "restored"):
        kept = " (its folder from before the last config change, brought back)" if action == "restored" else ""
        state.print(f"[vqgen] {stage.name}: up to date, skipped{kept}")
        return read_manifest(cfg.run_dir / stage.dir)
    if action == "restart":
        state.print(f"[vqgen] {stage.name}: restarting from scratch ({reason}); the old folder waits in "
                    f"{previous} until this one finishes")
    else:
        state.print(f"[vqgen] {stage.name}: running ({reason})")
    stage_dir = cfg.run_dir / stage.dir
    accelerator = make_accelerator(
        stage_dir, mixed_precision=cfg.run.mixed_precision, tracker=cfg.run.tracker, seed=cfg.run.seed
    )
    result = stage.run(stage_sections(cfg, stage), cfg.run_dir, accelerator)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()

    def finish() -> dict:
        manifest = write_manifest(stage_dir, stage.name, spec, result)
        if previous.exists():  # the stage is done: what it replaced goes
            _delete(previous)
        return manifest

    return on_main_process(finish)


def _open_run(cfg: PipelineConfig) -> tuple[RunLock, bool]:
    """Lock the run folder (main process) and write the resolved config when it changed."""
    lock = RunLock(cfg.run_dir)

    def acquire() -> bool:
        writable = lock.acquire()
        if writable:
            path, text = cfg.run_dir / "config.toml", config_to_toml(cfg)
            if not path.exists() or path.read_text() != text:
                atomic_write_text(path, text)
        return writable

    return lock, on_main_process(acquire)


def preflight(cfg: PipelineConfig, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """The stages of ``stages`` that will run, after checking that each can get what it needs
    (:attr:`Stage.preflight`); a switched-off stage is named now, not after days of training."""
    require_tracker(cfg.run.tracker)  # Accelerate would drop a tracker whose package is missing, silently
    state = process_state()
    enabled = []
    for stage in stages:
        sections = stage_sections(cfg, stage)
        if not stage.is_enabled(sections):
            state.print(f"[vqgen] {stage.name}: switched off in the config; it will be skipped")
            continue
        if stage.preflight is not None:
            stage.preflight(sections)
        enabled.append(stage)
    check_upstream_switches(cfg, tuple(enabled))
    return tuple(enabled)


def run_pipeline(cfg: PipelineConfig, from_stage: str | None = None) -> None:
    """Run all stages in order. ``from_stage``: earlier stages are not run (they must have
    finished) and this one runs even if current; later ones run unless current."""
    stages = stage_table(cfg)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise ConfigError("--from", f"unknown stage {from_stage!r} (stages: {', '.join(names)})")
    dirs = {s.name: s.dir for s in stages}
    start = names.index(from_stage) if from_stage else 0
    todo = preflight(cfg, stages[start:])
    lock, writable = _open_run(cfg)
    try:
        for stage in todo:
            run_stage(cfg, stage, dirs, force=(from_stage is not None and stage.name == from_stage), writable=writable)
    finally:
        lock.release()


def run_single_stage(cfg: PipelineConfig, name: str) -> dict | None:
    stages = {s.name: s for s in stage_table(cfg)}
    if name not in stages:
        raise ConfigError("stage", f"unknown stage {name!r} (stages: {', '.join(stages)})")
    stage = stages[name]
    require_tracker(cfg.run.tracker)
    if stage.preflight is not None:  # `vqgen stage` runs the stage it names, even one switched off
        stage.preflight(stage_sections(cfg, stage))
    lock, writable = _open_run(cfg)
    try:
        return run_stage(cfg, stage, {s.name: s.dir for s in stages.values()}, force=True, writable=writable)
    finally:
        lock.release()
