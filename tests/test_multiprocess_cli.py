"""The whole pipeline under ``torchrun`` with two processes (gloo on the CPU), as cluster users
launch it: every stage finishes; extraction and sampling give exactly the one-process outputs for
the same models and seed; a SIGKILL of the whole launch mid-training resumes to the uninterrupted
result, with dropout on; and a second command cannot use the run folder meanwhile."""

from __future__ import annotations

import json
import shutil
import signal
import time

import numpy as np
import psutil
import pytest

from test_reruns import DIRS, STAGES, actions, manifest, samples

pytestmark = pytest.mark.slow

# Enough top-prior steps (dropout 0.1 in tiny.toml) for the kill to land between checkpoints.
TOP = ("prior.top.train.steps=300", "prior.top.train.checkpoint_every=20")


def kill_launch(proc) -> None:
    """SIGKILL the launcher and every process under it at once, as a cluster scheduler ends a job
    (torchrun starts its workers in sessions of their own, so a process-group kill would miss them)."""
    launcher = psutil.Process(proc.pid)
    everyone = [launcher, *launcher.children(recursive=True)]
    for process in everyone:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=60)
    proc.wait()


def wait_for(path, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and path.exists(), f"the launch ended before writing {path}"


def test_two_processes_end_to_end_kill_and_resume(tiny_pipeline):
    # Uninterrupted, two processes.
    out = tiny_pipeline("run", procs=2, sets=TOP)
    run_dir = tiny_pipeline.run_dir
    assert set(actions(out).values()) == {"run"} and len(actions(out)) == 6
    for stage in STAGES:
        assert (run_dir / DIRS[stage] / "manifest.json").exists(), stage
    assert manifest(run_dir, "extract-codes")["metrics"]["train_images_per_process"] == [32, 32]
    assert manifest(run_dir, "sample")["metrics"]["samples_per_process"] == [4, 4]
    reference = {stage: manifest(run_dir, stage)["fingerprint"] for stage in ("train-prior-top", "sample")}

    # The same run in another folder, killed (every process of the launch) once the top prior has
    # checkpointed; meanwhile a second command is refused the folder.
    killed = type(tiny_pipeline)(tiny_pipeline.root, tiny_pipeline.weights, name="killed")
    proc = killed.start("run", procs=2, sets=TOP)
    wait_for(killed.run_dir / "vqvae" / "stage.json", proc)
    refused = killed("run", rc=2, sets=TOP)
    assert "is in use by another vqgen command" in refused and "Traceback" not in refused
    pointer = killed.run_dir / "prior-top" / "checkpoints" / "latest.json"
    wait_for(pointer, proc)
    kill_launch(proc)
    assert not (killed.run_dir / "prior-top" / "manifest.json").exists()
    assert json.loads(pointer.read_text())["step"] < 300

    out = killed("run", procs=2, sets=TOP)
    assert actions(out)["train-prior-top"] == "run" and "resumed from" in out
    for stage in ("train-vqvae", "extract-codes", "train-prior-bottom"):
        assert actions(out)[stage] == "skip"
    resumed = {stage: manifest(killed.run_dir, stage)["fingerprint"] for stage in reference}
    assert resumed == reference  # the same top prior, bit for bit, and so the same samples

    # One process from the two-process models: the codes (the priors' input fingerprint, so the
    # copied priors stay current) and the samples are exactly those of two processes.
    one = type(tiny_pipeline)(tiny_pipeline.root, tiny_pipeline.weights, name="one")
    shutil.copytree(run_dir, one.run_dir)
    for stage_dir in ("codes", "samples", "eval"):
        shutil.rmtree(one.run_dir / stage_dir)
    out = one("run", sets=TOP)
    assert actions(out) == {"train-vqvae": "skip", "extract-codes": "run", "train-prior-bottom": "skip",
                            "train-prior-top": "skip", "sample": "run", "evaluate": "run"}, out[-3000:]
    assert manifest(one.run_dir, "extract-codes")["fingerprint"] == manifest(run_dir, "extract-codes")["fingerprint"]
    np.testing.assert_array_equal(samples(one.run_dir), samples(run_dir))



def test_accelerate_launch_three_processes(tiny_pipeline):
    """`accelerate launch` (the README's command) with three processes: every stage finishes, each
    image is encoded by exactly one process and each sample batch drawn by one."""
    out = tiny_pipeline("run", procs=3, launcher="accelerate")
    assert set(actions(out).values()) == {"run"} and len(actions(out)) == 6, out[-3000:]
    run_dir = tiny_pipeline.run_dir
    assert manifest(run_dir, "extract-codes")["metrics"]["train_images_per_process"] == [22, 21, 21]
    assert manifest(run_dir, "sample")["metrics"]["samples_per_process"] == [4, 4, 0]
    assert tiny_pipeline("run", procs=3, launcher="accelerate").count("up to date, skipped") == 6
    # Evaluation on every process: the three ranks' shares of the features, gathered, give the
    # metrics of one process encoding everything.
    three = json.loads((run_dir / "eval" / "metrics.json").read_text())
    tiny_pipeline("stage", "evaluate")
    one = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert one.keys() == three.keys()
    # Not bit for bit: a rank's reconstruction batches hold other images, and a convolution's float
    # sums depend on its batch. abs=1e-6 against metrics of ~0.1-300 (KID's std over identical
    # subsets is itself such noise, ~1e-7).
    for key, value in one.items():
        assert three[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
