"""What a stage folder records about the work in it, and the runner's decision to skip, continue or
restart the stage.

Two records per stage folder:

- ``stage.json``, written before a stage does any work: the stage's *definition* (the config values
  that define its result, and the output fingerprints of the stages it reads) and its hash. Every
  checkpoint in the folder was made under this definition.
- ``manifest.json``, written last and atomically: the definition and *schedule* (the config values
  that only schedule the work, see :func:`vqgen.configtools.schedule_field`) it finished with, its
  outputs, metrics, and a record (size, mtime, sha256) of each output file that later stages read.
  A stage without a manifest did not finish.

The output fingerprint (one hash over the output files' checksums) is what a downstream stage's
definition holds, so a stage whose outputs changed makes every stage that reads them start over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vqgen.utils import atomic_write_json, read_json, sha256_file, sha256_json

MANIFEST = "manifest.json"
STARTED = "stage.json"


@dataclass
class StageResult:
    """What a stage returns to the runner, which records it in the manifest.

    ``files``: paths (relative to the stage folder) of the outputs later stages read; their
    checksums make the stage's output fingerprint and are checked before the stage is skipped.
    ``content``: for files whose bytes vary with the same content (an LMDB store's page layout, a
    zip's timestamps), a checksum of the content to use in the fingerprint instead.
    """

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    content: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """A stage's definition and schedule for one invocation (plain JSON-able dicts)."""

    definition: dict[str, Any]
    schedule: dict[str, Any]

    @property
    def definition_hash(self) -> str:
        return sha256_json(self.definition)

    @property
    def schedule_hash(self) -> str:
        return sha256_json(self.schedule)


Action = Literal["skip", "run", "restart"]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    damaged: tuple[str, ...] = ()
    """Output files (relative to the stage folder) to delete before running: they no longer match
    their records, and a stage that continues must not take them for finished work."""


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except ValueError:
        return None  # a damaged record counts as no record
    return data if isinstance(data, dict) else None


def read_manifest(stage_dir: Path) -> dict | None:
    return _read(stage_dir / MANIFEST)


def read_started(stage_dir: Path) -> dict | None:
    return _read(stage_dir / STARTED)


def output_fingerprint(stage_dir: Path) -> str | None:
    """The fingerprint of a finished stage's output files (None: the stage has not finished)."""
    manifest = read_manifest(stage_dir)
    return None if manifest is None else manifest.get("fingerprint")


def file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def file_problem(stage_dir: Path, name: str, record: dict[str, Any]) -> str | None:
    """Why the output file ``name`` no longer matches its record, or None when it does.

    Size first (a truncated file); then the checksum, recomputed only when the modification time
    changed, so checking a large, untouched code store costs one ``stat``.
    """
    path = stage_dir / name
    try:
        stat = path.stat()
    except OSError:
        return f"{path} is missing"
    if stat.st_size != record.get("size"):
        return f"{path} has {stat.st_size} bytes, {record.get('size')} when the stage finished"
    if stat.st_mtime_ns != record.get("mtime_ns") and sha256_file(path) != record.get("sha256"):
        return f"{path} was modified since the stage finished (checksum differs)"
    return None


def damaged_outputs(stage_dir: Path, manifest: dict) -> dict[str, str]:
    """``{file name: problem}`` for the recorded output files that no longer match their records."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return {MANIFEST: f"{stage_dir / MANIFEST} records no output files"}
    return {name: p for name, rec in sorted(files.items()) if (p := file_problem(stage_dir, name, rec))}


def write_started(stage_dir: Path, spec: StageSpec) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / STARTED, {"definition_hash": spec.definition_hash, "definition": spec.definition})


def write_manifest(stage_dir: Path, stage: str, spec: StageSpec, result: StageResult) -> dict:
    files = {name: file_record(stage_dir / name) for name in result.files}
    manifest = {
        "stage": stage,
        "definition_hash": spec.definition_hash,
        "definition": spec.definition,
        "schedule_hash": spec.schedule_hash,
        "schedule": spec.schedule,
        "fingerprint": sha256_json({name: result.content.get(name, rec["sha256"]) for name, rec in files.items()}),
        "files": files,
        "outputs": result.outputs,
        "metrics": result.metrics,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    return manifest


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def describe_changes(old: dict, new: dict, limit: int = 4) -> str:
    """``"data.procedural.seed: 0 -> 7, inputs.train-vqvae changed"``: what differs between two definitions."""
    before, after = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<unset>") == after.get(key, "<unset>"):
            continue
        if key.startswith("inputs."):
            changes.append(f"the outputs of {key[len('inputs.'):]} changed")
        else:
            changes.append(f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


def decide(stage_dir: Path, spec: StageSpec, force: bool = False) -> Decision:
    """Skip (finished with this definition and schedule, outputs intact), run (continue from the
    stage's own checkpoints and partial outputs) or restart (the folder holds work of another
    definition, or work with no record of its definition: it is deleted)."""
    started = read_started(stage_dir)
    if started is None:
        if stage_dir.exists() and any(stage_dir.iterdir()):
            return Decision("restart", f"{stage_dir} holds files with no record of the config that made them")
        return Decision("run", "not run before")
    if started.get("definition_hash") != spec.definition_hash:
        changes = describe_changes(started.get("definition") or {}, spec.definition)
        return Decision("restart", f"its inputs changed ({changes or 'definition differs'})")
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("definition_hash") != spec.definition_hash:
        return Decision("run", "did not finish; continuing")
    damaged = damaged_outputs(stage_dir, manifest)
    if damaged:
        problems = "; ".join(damaged.values())
        return Decision("run", f"outputs damaged ({problems}); making them again", tuple(damaged))
    if manifest.get("schedule_hash") != spec.schedule_hash:
        changes = describe_changes(manifest.get("schedule") or {}, spec.schedule)
        return Decision("run", f"schedule changed ({changes}); continuing from its checkpoints")
    if force:
        return Decision("run", "asked to run")
    return Decision("skip", "up to date")
