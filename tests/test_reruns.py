"""Reruns through the ``vqgen`` command: a change to what defines a stage's result restarts exactly
that stage and the stages that read its outputs, from scratch; a change to what only schedules it
continues it; damaged outputs are made again; a run folder is used by one command at a time."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

STAGES = ("train-vqvae", "extract-codes", "train-prior-bottom", "train-prior-top", "sample", "evaluate")
DIRS = dict(zip(STAGES, ("vqvae", "codes", "prior-bottom", "prior-top", "samples", "eval")))
pytestmark = pytest.mark.slow


def actions(out: str) -> dict[str, str]:
    """``{stage: "skip" | "run" | "restart"}`` from the runner's console lines."""
    found = {}
    for stage, verb in re.findall(r"^\[vqgen\] ([a-z-]+): (up to date|running|restarting)", out, re.M):
        found[stage] = {"up to date": "skip", "running": "run", "restarting": "restart"}[verb]
    return found


def expect(out: str, **changed: str) -> None:
    """Every stage skipped except those named (``train_vqvae="restart"``, ...)."""
    want = {stage: changed.get(stage.replace("-", "_"), "skip") for stage in STAGES}
    assert actions(out) == want, out[-3000:]


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / DIRS[stage] / "manifest.json").read_text())


def checkpoint_steps(run_dir: Path, stage: str) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / DIRS[stage] / "checkpoints").glob("step-*"))


def samples(run_dir: Path) -> np.ndarray:
    with np.load(run_dir / "samples" / "samples.npz") as data:
        return data["images"]


def test_each_change_reruns_exactly_the_stages_that_depend_on_it(tiny_pipeline):
    run_dir = tiny_pipeline.run_dir
    sets: list[str] = []

    def rerun(*new: str, rc: int = 0) -> str:
        sets.extend(new)
        return tiny_pipeline("run", sets=tuple(sets), rc=rc)

    expect(rerun(), **{s.replace("-", "_"): "run" for s in STAGES})
    first_vqvae = manifest(run_dir, "train-vqvae")["fingerprint"]
    first_samples = samples(run_dir)
    expect(rerun())

    # The evaluation alone.
    expect(rerun("evaluate.num_real=8"), evaluate="restart")
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["num_real"] == 8

    # Sampling: new images, and the evaluation of the old ones goes.
    expect(rerun("sample.seed=3"), sample="restart", evaluate="restart")
    assert not np.array_equal(samples(run_dir), first_samples)

    # A prior's architecture: that prior, then everything that reads it. The bottom prior does not
    # read the top one's outputs, so it stays.
    out = rerun("prior.top.model.channels=8")
    expect(out, train_prior_top="restart", sample="restart", evaluate="restart")
    assert "prior.top.model.channels: 16 -> 8" in out
    assert checkpoint_steps(run_dir, "train-prior-top") == [4, 8]
    expect(rerun("prior.bottom.train.lr=1e-3"), train_prior_bottom="restart", sample="restart", evaluate="restart")

    # What only schedules a stage: it continues from its checkpoint. More steps change the prior's
    # weights, so what reads it starts over; a new logging interval changes nothing downstream.
    out = rerun("prior.top.train.steps=12")
    expect(out, train_prior_top="run", sample="restart", evaluate="restart")
    assert "resumed from" in out and manifest(run_dir, "train-prior-top")["outputs"]["steps"] == 12
    out = rerun("vqvae.train.log_every=2")
    expect(out, train_vqvae="run")
    assert manifest(run_dir, "train-vqvae")["fingerprint"] == first_vqvae

    # The data: every stage, from scratch, and nothing of the old codes survives.
    old_codes = manifest(run_dir, "extract-codes")["fingerprint"]
    out = rerun("data.procedural.seed=7")
    expect(out, **{s.replace("-", "_"): "restart" for s in STAGES})
    assert "data.procedural.seed: 0 -> 7" in out and "resumed from" not in out
    assert manifest(run_dir, "extract-codes")["fingerprint"] != old_codes
    assert manifest(run_dir, "train-vqvae")["fingerprint"] != first_vqvae
    assert not any((run_dir / ".previous").iterdir())  # each old folder went when its stage finished
    expect(rerun())

    # One stage through `vqgen stage`: the same rules (here: continue, as nothing changed).
    out = tiny_pipeline("stage", "train-prior", "--level", "top", sets=tuple(sets))
    assert actions(out) == {"train-prior-top": "run"} and "resumed from" in out


def test_damaged_outputs_are_made_again(tiny_pipeline):
    run_dir = tiny_pipeline.run_dir
    tiny_pipeline("run")

    # A truncated export: the prior re-exports from its checkpoint, byte for byte the same, so
    # nothing after it runs again.
    weights = run_dir / "prior-top" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tiny_pipeline("run")
    expect(out, train_prior_top="run")
    assert "model.safetensors has" in out

    # A shortened code record: the store is extracted again, with the same codes.
    store = run_dir / "codes" / "codes.lmdb"
    env = lmdb.open(str(store))
    with env.begin(write=True) as txn:
        txn.put(b"000000003", txn.get(b"000000003")[:-2])
    env.close()
    out = tiny_pipeline("run")
    expect(out, extract_codes="run")
    assert "codes.lmdb/data.mdb" in out

    # A stage folder whose files have no record of the config that made them is started afresh.
    shutil.rmtree(run_dir / "samples")
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "stray.npz").write_bytes(b"left by someone")
    (run_dir / "eval" / "stage.json").unlink()
    out = tiny_pipeline("run")
    expect(out, sample="restart", evaluate="restart")
    assert "holds files with no record" in out and not (run_dir / "samples" / "stray.npz").exists()


def test_one_command_per_run_folder_and_a_killed_one_leaves_no_lock(tiny_pipeline):
    long = ("prior.top.train.steps=100000", "prior.top.train.checkpoint_every=50")
    first = tiny_pipeline.start("run", sets=long)
    pointer = tiny_pipeline.run_dir / "prior-top" / "stage.json"
    deadline = time.time() + 300
    while not pointer.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[0][-3000:]

    refused = tiny_pipeline("run", sets=long, rc=2)
    assert "is in use by another vqgen command" in refused and f"pid {first.pid}" in refused
    assert "Traceback" not in refused

    first.send_signal(signal.SIGKILL)
    first.wait()
    out = tiny_pipeline("run")  # the lock died with its holder
    assert actions(out)["train-prior-top"] == "run" and "resumed from" in out


def _can_bind_read_only(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {folder} {folder}"], capture_output=True)
    return probe.returncode == 0


def test_read_only_run_folder(tiny_pipeline, tmp_path):
    if not _can_bind_read_only(tmp_path):
        pytest.skip("needs unshare -m and bind mounts (root) to make a read-only folder")
    tiny_pipeline("run")
    run_dir = tiny_pipeline.run_dir
    config_before = (run_dir / "config.toml").read_bytes()
    read_only = ("unshare", "-m", "sh", "-c", f"mount --bind -o ro {run_dir} {run_dir} && exec \"$@\"", "sh")

    out = tiny_pipeline("run", wrap=read_only)
    expect(out)
    out = tiny_pipeline("run", sets=("sample.seed=5",), rc=2, wrap=read_only)
    assert "cannot be written" in out and "stage sample would have to run" in out and "Traceback" not in out
    assert (run_dir / "config.toml").read_bytes() == config_before


def test_skipped_corrupt_images_are_logged_and_counted(tiny_pipeline, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")
    cut = folder / "05.jpg"  # a train image (the hold-out takes every tenth)
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.9)])  # passes a header check
    data = ("data.kind=folder", f"data.root={folder}", "data.on_corrupt=skip")

    out = tiny_pipeline("stage", "train-vqvae", sets=data)
    assert "data (train split): skipped 1 corrupt image file (e.g. 05.jpg: truncated JPEG" in out
    metrics = manifest(tiny_pipeline.run_dir, "train-vqvae")["metrics"]
    assert metrics["train_num_skipped"] == 1 and metrics["eval_num_skipped"] == 0

    refused = tiny_pipeline("stage", "train-vqvae", sets=(*data[:2], "data.on_corrupt=error"), rc=2)
    assert "05.jpg" in refused and "Traceback" not in refused
    # The change failed, and lost nothing: back to the old config, the trained stage is there.
    unlabelled = ("prior.bottom.class_conditional=false", "prior.top.class_conditional=false")
    out = tiny_pipeline("run", sets=(*data, *unlabelled))
    assert "train-vqvae: up to date, skipped (its folder from before the last config change, brought back)" in out
    assert not (tiny_pipeline.run_dir / ".previous" / "vqvae").exists()
