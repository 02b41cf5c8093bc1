"""Trackers: any Accelerate tracker by name, a missing package named at start-up, and pictures."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import LoggerType
from PIL import Image

import vqgen.tracking as tracking
from vqgen.config import load_config
from vqgen.errors import ConfigError
from vqgen.tracking import CSVTracker, TrackerKind, log_images, make_trackers, read_metrics_csv
from vqgen.train import make_accelerator

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


class Recorder(GeneralTracker):
    """A tracker that takes images and keeps what it is given; ``name`` picks the format it gets."""

    requires_logging_directory = False

    def __init__(self, name: str):
        self.name = name
        super().__init__()
        self.calls: list[tuple[dict, int | None, dict]] = []

    @property
    def tracker(self) -> "Recorder":
        return self

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.calls.append((values, step, kwargs))


def _grey_png(path: Path) -> Path:
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, mode="L").save(path)
    return path


def _accelerator(tmp_path: Path, *trackers: GeneralTracker) -> Accelerator:
    accelerator = Accelerator(log_with=list(trackers), project_dir=str(tmp_path))
    accelerator.init_trackers("stage")
    return accelerator


def test_every_accelerate_tracker_is_a_choice_and_all_is_not():
    choices = set(get_args(TrackerKind))
    assert choices == {"csv", "none"} | {t.value for t in LoggerType if t is not LoggerType.ALL}
    assert {"tensorboard", "wandb", "mlflow"} <= choices and "all" not in choices


def test_loading_a_config_does_not_need_the_trackers_package():
    # `vqgen config` on a laptop shows a cluster config whose tracker is installed only there.
    assert load_config(None, ["run.tracker=mlflow"]).run.tracker == "mlflow"
    with pytest.raises(ConfigError, match=r"^run\.tracker: expected one of \[.*'wandb'.*\], got 'tensorbord'"):
        load_config(None, ["run.tracker=tensorbord"])


def test_a_missing_package_names_the_key_and_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^run\.tracker: 'wandb' needs the wandb package.*pip install wandb"):
        make_accelerator(tmp_path / "stage", tracker="wandb")
    assert not (tmp_path / "stage" / "metrics.csv").exists()  # nothing was started


def test_an_unusable_installed_version_is_not_called_missing(monkeypatch):
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ConfigError, match=r"^run\.tracker: 'aim': the installed aim is a version that accelerate"):
        tracking.require_tracker("aim")


@pytest.mark.skipif(HAVE_TENSORBOARD, reason="tensorboard is installed: the missing-package error cannot happen")
def test_tensorboard_missing_is_an_error_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"^run\.tracker: 'tensorboard' needs .*pip install tensorboard"):
        make_accelerator(tmp_path / "stage", tracker="tensorboard")


def test_metrics_csv_is_written_next_to_any_other_tracker(tmp_path, monkeypatch):
    assert make_trackers("none", tmp_path) == []  # csv and none need no package
    (only,) = make_trackers("csv", tmp_path)
    assert isinstance(only, CSVTracker) and only.path == tmp_path / "metrics.csv"
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [LoggerType.MLFLOW])
    kind, csv_tracker = make_trackers("mlflow", tmp_path)
    assert kind == "mlflow" and isinstance(csv_tracker, CSVTracker)


def test_csv_logs_metrics_and_skips_pictures(tmp_path):
    accelerator = make_accelerator(tmp_path, tracker="csv")
    accelerator.log({"loss": 0.5}, step=1)
    log_images(accelerator, {"recon": tmp_path / "not-written.png"}, step=1)  # not even opened
    assert read_metrics_csv(tmp_path / "metrics.csv") == {"loss": [(1, 0.5)]}


def test_pictures_reach_each_tracker_in_the_format_it_takes(tmp_path):
    png = _grey_png(tmp_path / "recon.png")
    trackers = {name: Recorder(name) for name in ("tensorboard", "wandb", "aim")}
    accelerator = _accelerator(tmp_path, *trackers.values(), CSVTracker(tmp_path / "metrics.csv"))
    log_images(accelerator, {"recon": png, "grid": Image.open(png)}, step=7)

    (values, step, kwargs), = trackers["tensorboard"].calls
    assert step == 7 and kwargs == {"dataformats": "NHWC"} and values["recon"].shape == (1, 3, 4, 3)
    (values, _, kwargs), = trackers["wandb"].calls
    assert kwargs == {} and [a.shape for a in values["grid"]] == [(3, 4, 3)]
    (values, _, _), = trackers["aim"].calls
    rgb = values["recon"]
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 3)
    assert np.array_equal(rgb[..., 0], np.asarray(Image.open(png))) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_only_the_main_process_logs_pictures(tmp_path, monkeypatch):
    recorder = Recorder("wandb")
    accelerator = _accelerator(tmp_path, recorder)
    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))
    log_images(accelerator, {"recon": tmp_path / "only-on-rank-0.png"})
    assert recorder.calls == []


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_gets_metrics_and_pictures_and_csv_still_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage_dir = tmp_path / "train-vqvae"
    accelerator = make_accelerator(stage_dir, tracker="tensorboard")
    accelerator.log({"loss": 0.25}, step=3)
    log_images(accelerator, {"recon": _grey_png(tmp_path / "recon.png")}, step=3)
    for tracker in accelerator.trackers:
        tracker.finish()

    (events,) = {p.parent for p in stage_dir.rglob("events.out.tfevents*")}
    run = EventAccumulator(str(events))
    run.Reload()
    assert [(e.step, e.value) for e in run.Scalars("loss")] == [(3, 0.25)]
    (image,) = run.Images("recon")
    assert image.step == 3 and (image.width, image.height) == (4, 3)
    assert read_metrics_csv(stage_dir / "metrics.csv") == {"loss": [(3, 0.25)]}
