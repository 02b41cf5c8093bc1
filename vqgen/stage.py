"""What a stage is to the pipeline runner: its name and folder, the config sections it reads, the
stages whose outputs it reads, and ``run(sections, run_dir, accelerator) -> StageResult``.

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

__all__ = ["Stage", "StageResult", "section"]


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


def section(cfg: Any, path: str) -> Any:
    """The config section at a dotted ``path`` of the pipeline config."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg
