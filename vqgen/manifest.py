"""Stage manifests: written last and atomically; a stage without one did not finish.

A manifest records the hash of the stage's config section (and data section where it reads
images) and the hashes of the manifests of the stages it read from, so the runner can tell whether
a finished stage is still valid for the current config and inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqgen.utils import atomic_write_json, read_json, sha256_json

MANIFEST = "manifest.json"


@dataclass
class StageResult:
    """What a stage returns to the runner, which records it in the manifest."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def manifest_hash(stage_dir: Path) -> str | None:
    manifest = read_manifest(stage_dir)
    return None if manifest is None else sha256_json(manifest)


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError:
        return None  # a damaged manifest counts as "not finished": the stage runs again


def write_manifest(
    stage_dir: Path, stage: str, config_hash: str, inputs: dict[str, str | None], outputs: dict[str, Any], metrics: dict[str, Any]
) -> dict:
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": metrics,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    return manifest


def is_current(stage_dir: Path, config_hash: str, inputs: dict[str, str | None]) -> bool:
    """True when the stage finished with this config and these upstream manifests."""
    manifest = read_manifest(stage_dir)
    return manifest is not None and manifest.get("config_hash") == config_hash and manifest.get("inputs") == inputs
