"""End to end at toy size: all stages run, a kill during prior training resumes, a re-run skips all,
and `vqgen fid` scores the samples file as the evaluate stage did."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

LONG_TOP = ("prior.top.train.steps=400", "prior.top.train.checkpoint_every=20", "prior.top.train.log_every=20")


@pytest.mark.slow
def test_pipeline_end_to_end_with_kill_and_resume(tiny_pipeline):
    run = tiny_pipeline.run_dir

    # Kill the first invocation once the top prior has written a checkpoint.
    proc = tiny_pipeline.start("run", sets=LONG_TOP)
    pointer = run / "prior-top" / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline ended before the top prior's first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "prior-top" / "manifest.json").exists()
    killed_at = json.loads(pointer.read_text())["step"]
    assert killed_at < 400

    out = tiny_pipeline("run", sets=LONG_TOP)
    for stage in ("train-vqvae", "extract-codes", "train-prior-bottom"):
        assert f"{stage}: up to date, skipped" in out
    assert "resumed from" in out
    top = json.loads((run / "prior-top" / "manifest.json").read_text())
    assert top["outputs"]["steps"] == 400
    with np.load(run / "samples" / "samples.npz") as samples:
        assert samples["images"].shape == (8, 3, 16, 16) and samples["images"].dtype == np.uint8
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["num_samples"] == 8 and metrics["num_real"] == 16
    assert metrics["kid_std"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["reference"] == "eval split" and metrics["resize"].startswith("torch:")
    assert "no Inception Score" in metrics["isc_unavailable"]  # FID-only weights: no logits
    # Scoring the samples file alone gives the evaluate stage's figures (the same cached reference).
    scored = tiny_pipeline("fid", str(run / "samples" / "samples.npz"), sets=LONG_TOP)
    scored = json.loads(scored[scored.index("{"):])
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert scored[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert (scored["num_samples"], scored["num_real"], scored["reference"]) == (8, 16, "eval split")
    for picture in ("vqvae/recon.png", "prior-top/samples.png", "samples/grid.png", "eval/report.png"):
        assert (run / picture).stat().st_size > 0

    again = tiny_pipeline("run", sets=LONG_TOP)
    assert again.count("up to date, skipped") == 6, again
