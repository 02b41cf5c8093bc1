"""End to end at toy size: all stages run, a kill during prior training resumes, a re-run skips all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TOY = """
[run]
name = "toy"
out_dir = "{out}"
[data]
procedural_size = 64
num_eval = 16
image_size = 16
[vqvae.model]
hidden_channels = 16
res_channels = 8
num_res_blocks = 1
num_codes = 32
code_dim = 8
[vqvae.train]
steps = 3
batch_size = 8
[prior.bottom]
class_conditional = true
[prior.bottom.model]
channels = 16
num_layers = 2
condition_channels = 16
condition_res_blocks = 1
dropout = 0.0
[prior.bottom.train]
steps = 3
batch_size = 8
num_workers = 1
[prior.top]
class_conditional = true
[prior.top.model]
channels = 16
num_layers = 2
attention_every = 1
num_heads = 2
dropout = 0.0
[prior.top.train]
steps = 400
batch_size = 8
checkpoint_every = 20
log_every = 20
eval_every = 0
image_every = 0
[sample]
num_samples = 6
batch_size = 4
[evaluate]
num_real = 16
inception_weights = "{weights}"
"""


def vqgen(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vqgen.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_pipeline_end_to_end_with_kill_and_resume(tmp_path, shared_data):
    weights = shared_data / "inception" / "pt_inception-2015-12-05-nofc.pth"
    config = tmp_path / "toy.toml"
    config.write_text(TOY.format(out=tmp_path / "runs", weights=weights))
    run = tmp_path / "runs" / "toy"

    # Kill the first invocation once the top prior has written a checkpoint.
    proc = vqgen("run", str(config), cwd=tmp_path)
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

    out = finish(vqgen("run", str(config), cwd=tmp_path))
    for stage in ("train-vqvae", "extract-codes", "train-prior-bottom"):
        assert f"{stage}: up to date, skipped" in out
    assert "resumed from" in out
    top = json.loads((run / "prior-top" / "manifest.json").read_text())
    assert top["outputs"]["steps"] == 400
    with np.load(run / "samples" / "samples.npz") as samples:
        assert samples["images"].shape == (6, 3, 16, 16) and samples["images"].dtype == np.uint8
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["fid_num_samples"] == 6
    # Scoring the samples file alone gives the evaluate stage's FID (same cached reference statistics).
    scored = finish(vqgen("fid", str(config), str(run / "samples" / "samples.npz"), cwd=tmp_path))
    scored = json.loads(scored.splitlines()[-1])
    assert scored == {"fid": pytest.approx(metrics["fid"], rel=1e-6), "fid_num_samples": 6, "fid_num_real": 16}
    for picture in ("vqvae/recon.png", "prior-top/samples.png", "samples/grid.png", "eval/report.png"):
        assert (run / picture).stat().st_size > 0

    again = finish(vqgen("run", str(config), cwd=tmp_path))
    assert again.count("up to date, skipped") == 6, again
