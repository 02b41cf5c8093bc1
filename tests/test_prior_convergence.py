"""benchmarks/prior_convergence.py end to end on the tiny pipeline's codes: both arms train in
turns, the curves and the summary are written, and the time-to-target arithmetic is right."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_pipeline import tiny_config
from vqgen.pipeline import run_single_stage

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prior_convergence.py"
pytestmark = pytest.mark.usefixtures("single_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("prior_convergence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_time_to_reach_interpolates_between_evaluations():
    script = load_script()
    curve = [(0, 0.0, 8.0), (10, 10.0, 6.0), (20, 20.0, 4.0)]
    assert script.time_to_reach(curve, 5.0) == pytest.approx(15.0)
    assert script.time_to_reach(curve, 8.0) == 0.0
    assert script.time_to_reach(curve, 3.9) is None


@pytest.mark.parametrize("level", ["top", "bottom"])
def test_two_arms_train_and_write_curves(tmp_path, level):
    cfg = tiny_config(tmp_path, "tiny")
    run_single_stage(cfg, "train-vqvae")
    run_single_stage(cfg, "extract-codes")
    out = tmp_path / "curve"
    summary = load_script().main([
        str(cfg.run_dir), "--level", level, "--budget", "2", "--turn", "0.5", "--eval-every", "1",
        "--eval-batches", "1", "--b", f"prior.{level}.train.lr=3e-3", "--b", f"prior.{level}.train.steps=4",
        "--out", str(out)])
    rows = list(csv.DictReader(open(out / "curve.csv")))
    arms = {row["arm"] for row in rows}
    assert arms == {"a", "b"}
    # Arm b stops at its 4 configured steps; each arm is evaluated before training and at its end.
    b_steps = [int(row["step"]) for row in rows if row["arm"] == "b"]
    assert b_steps[0] == 0 and b_steps[-1] == 4
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["final"]["b"]["step"] == 4
    assert summary["seconds_to_target"]["a"] is not None  # arm a reaches its own last value
    assert (out / "curve.png").stat().st_size > 0


def test_weight_average_is_updated_by_training_and_evaluated(tmp_path):
    cfg = tiny_config(tmp_path, "tiny")
    run_single_stage(cfg, "train-vqvae")
    run_single_stage(cfg, "extract-codes")
    script = load_script()
    device = torch.device("cpu")
    arm = script.build_arm("b", cfg.run_dir, "top", ["prior.top.train.ema_decay=0.5", "prior.top.train.steps=3"], device)
    assert arm.ema is not None
    start = [a.clone() for a in arm.ema.averages]
    script.train_turn(arm, "top", 60.0, 60.0, device)
    assert arm.step == 3
    raw = [p.detach().clone() for p in arm.model.parameters()]
    # After three steps at decay 0.5 the average is neither the initial weights nor the last ones.
    assert any(not torch.equal(a, s) for a, s in zip(arm.ema.averages, start))
    assert any(not torch.equal(a, r) for a, r in zip(arm.ema.averages, raw))
    batches = [next(arm.batches)]
    with arm.ema.applied(arm.model) as averaged:
        on_average = script.validation_bpd(averaged, batches, "top", arm.conditional, arm.above)
    on_raw = script.validation_bpd(arm.model, batches, "top", arm.conditional, arm.above)
    assert on_average != on_raw
    assert all(torch.equal(p, r) for p, r in zip(arm.model.parameters(), raw))
