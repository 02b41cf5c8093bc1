"""What a stage is to the pipeline runner: its name and folder, the config sections it reads, the
stages whose outputs it reads, and ``run(sections, run_dir, accelerator) -> StageResult``;
optionally a ``preflight(sections)`` that the runner calls for every stage it is about to run before
the first one starts (so a run that cannot finish refuses to start), ``enabled(sections)`` with the
``switch`` key behind it, and ``conditional_upstream(sections)``: stages read under some settings only.

Each stage module declares its ``STAGES``; the runner and the CLI read the one table made from them
(:func:`vqgen.pipeline.stage_table`). The runner hashes the declared sections itself (see
:mod:`vqgen.pipeline`), so a stage never computes its own config hash and never sees a section it
did not declare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from vqgen.manifest import StageResult

__all__ = ["Stage", "StageResult", "check_data", "folder_index_dir", "section"]


@dataclass(frozen=True)
class Stage:
    name: str
    dir: str
    """The stage's folder inside the run folder."""
    sections: tuple[str, ...]
    """Dotted config paths it reads (``"data"``, ``"prior.top"``); they, with the upstream outputs,
    define and schedule it."""
    upstream: tuple[str, ...]
    """Stages whose outputs it reads."""
    run: Callable[[dict[str, Any], Path, Accelerator], StageResult]
    preflight: Callable[[dict[str, Any]], None] | None = None
    """Checks that the stage will get what it needs (files, weights, folders); raises a VQGenError
    that names the fix. Cheap, or done once (a download): it runs before the pipeline's first stage."""
    enabled: Callable[[dict[str, Any]], bool] | None = None
    """False: the runner skips the stage and says so at the start (None: always enabled)."""
    switch: str = ""
    """The dotted config key behind ``enabled`` (``"classifier.enabled"``), named in messages."""
    conditional_upstream: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    """Stages whose outputs it reads under some settings only (the sample stage reads the
    classifier when rejection sampling is on): they join ``upstream`` then, and only then, so a
    setting at its default leaves the stage's definition as it was."""

    def is_enabled(self, sections: dict[str, Any]) -> bool:
        return self.enabled is None or self.enabled(sections)

    def upstream_of(self, sections: dict[str, Any]) -> tuple[str, ...]:
        """The stages it reads with these config sections."""
        extra = self.conditional_upstream(sections) if self.conditional_upstream is not None else ()
        return self.upstream + tuple(name for name in extra if name not in self.upstream)


def check_data(sections: dict[str, Any]) -> None:
    """The preflight of a stage that reads images: the data root exists (or will be downloaded)."""
    from vqgen.data.datasets import check_data_root

    check_data_root(sections["data"])


def folder_index_dir(run_dir: Path) -> Path:
    """Where the stages keep image folders' file indexes: beside the runs (``out_dir/folder-index``),
    shared by every run and stage that reads the same folder, and never inside the data folder."""
    return run_dir.parent / "folder-index"


def section(cfg: Any, path: str) -> Any:
    """The config section at a dotted ``path`` of the pipeline config."""
    for part in path.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg
