"""Metric trackers for Accelerate: a CSV file per stage (the default), or TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

from accelerate.tracking import GeneralTracker

from vqgen.utils import storage_errors

TrackerKind = Literal["csv", "tensorboard", "none"]


class CSVTracker(GeneralTracker):
    """Appends one row per ``log`` call to ``metrics.csv``: ``step`` then one column per metric.

    Metrics logged at different intervals (train loss every step, validation every N steps) share
    the file; a column that a row does not log is left empty. When a new metric name appears, the
    file is rewritten with the wider header, so a resumed run keeps its earlier rows.
    """

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self.columns = header

    @property
    def tracker(self) -> "CSVTracker":
        return self

    def store_init_configuration(self, values: dict) -> None:  # the resolved config.toml holds it
        pass

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        row = {"step": step, **{k: _scalar(v) for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        with storage_errors(self.path, f"metrics log {self.path}"):
            if new:
                self._widen(self.columns + new)
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def _widen(self, columns: list[str]) -> None:
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns = columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Columns of a ``metrics.csv`` as ``{name: [(step, value), ...]}``, skipping empty cells."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def make_trackers(kind: TrackerKind, stage_dir: Path) -> list:
    """Tracker objects for ``Accelerator(log_with=...)``."""
    if kind == "csv":
        return [CSVTracker(stage_dir / "metrics.csv")]
    if kind == "tensorboard":  # metrics.csv is always written: the evaluation report reads it
        return ["tensorboard", CSVTracker(stage_dir / "metrics.csv")]
    return []
