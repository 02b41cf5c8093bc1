"""Metric trackers for Accelerate: a CSV file per stage (the default), any tracker Accelerate knows
by name (TensorBoard, W&B, MLflow, ...) next to that file, or none; and pictures for the trackers
that take them."""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import accelerate
import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, get_available_trackers
from accelerate.utils import LoggerType
from PIL import Image

from vqgen.errors import ConfigError
from vqgen.utils import storage_errors

OWN_TRACKERS = ("csv", "none")
ACCELERATE_TRACKERS = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)
"""The trackers the installed Accelerate builds by name. Its "all" is left out: it means whatever
happens to be installed, so the same config would log to different places on different machines."""

# Built from Accelerate's list, so the config loader checks ``run.tracker`` against it as against any
# other Literal and a newer Accelerate's trackers need no change here; a static checker sees a str.
TrackerKind = Literal[OWN_TRACKERS + ACCELERATE_TRACKERS]  # type: ignore[valid-type]

ImageLike = Image.Image | str | os.PathLike
"""A picture to log: a PIL image, or the path of an image file (the stages' PNGs)."""


def require_tracker(kind: str) -> None:
    """A ConfigError naming ``run.tracker`` when ``kind`` cannot be used here. Accelerate itself drops
    a tracker whose package is missing with a debug message only, so a run would log nowhere."""
    if kind in OWN_TRACKERS or LoggerType(kind) in get_available_trackers():
        return
    if importlib.util.find_spec(kind) is None:  # each tracker's module and PyPI package share its name
        raise ConfigError("run.tracker", f"{kind!r} needs the {kind} package, which is not installed: "
                                         f"pip install {kind} (or choose another tracker)")
    raise ConfigError("run.tracker", f"{kind!r}: the installed {kind} is a version that accelerate "
                                     f"{accelerate.__version__} cannot use: pip install a version it supports")


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
    """Tracker objects and names for ``Accelerator(log_with=...)``; a ConfigError when ``kind``'s
    package is missing (see :func:`require_tracker`)."""
    require_tracker(kind)
    if kind == "none":
        return []
    csv_tracker = CSVTracker(stage_dir / "metrics.csv")
    # metrics.csv is written whatever else logs: the evaluation report reads it.
    return [csv_tracker] if kind == "csv" else [kind, csv_tracker]


def log_images(accelerator: Accelerator, images: Mapping[str, ImageLike], step: int | None = None) -> None:
    """Send pictures (``{"recon": stage_dir / "recon.png"}``) to the active trackers that take images
    (TensorBoard, W&B, Aim, ClearML, SwanLab); the others, ``metrics.csv`` among them, skip them: the
    PNG in the stage folder is the record. Main process only, as ``accelerator.log``."""
    if not accelerator.is_main_process:
        return
    takers = [t for t in accelerator.trackers if callable(getattr(t, "log_images", None))]
    if not takers:
        return  # no file is read when nothing would show it
    arrays = {key: _rgb_array(image) for key, image in images.items()}
    for tracker in takers:
        values, kwargs = _images_for(tracker.name, arrays)
        tracker.log_images(values, step=step, **kwargs)


def _rgb_array(image: ImageLike) -> np.ndarray:
    """uint8 [H, W, 3]: grey and palette PNGs too, so every tracker gets the same layout."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"))


def _images_for(name: str, arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(values, kwargs)`` for tracker ``name``'s ``log_images``: Accelerate's trackers disagree on
    what one key holds. TensorBoard's ``add_images`` takes a batch array (told it is NHWC), Aim and
    ClearML one image, W&B and SwanLab a list of images."""
    if name == "tensorboard":
        return {key: array[None] for key, array in arrays.items()}, {"dataformats": "NHWC"}
    if name in ("aim", "clearml"):
        return dict(arrays), {}
    return {key: [array] for key, array in arrays.items()}, {}
