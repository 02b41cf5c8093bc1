"""The tiny pipeline (``tests/pipelines/tiny.toml``) for tests: its config in-process, or the
``vqgen`` command on it as users run it. A module of its own, not conftest: test modules import it by
name, and ``tests/kernels`` has a conftest of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TINY_PIPELINE = Path(__file__).resolve().parent / "pipelines" / "tiny.toml"
TINY_THREE_LEVELS = TINY_PIPELINE.with_name("tiny-three-levels.toml")
# The real test data (Fashion-MNIST, the CIFAR-10 subset, the Inception weights); tests skip without it.
SHARED_DATA = Path(os.environ.get("VQGEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
INCEPTION_NOFC = Path("inception") / "pt_inception-2015-12-05-nofc.pth"


def tiny_config(root: Path, name: str = "tiny", *sets: str):
    """The tiny pipeline's config, run folder ``root/name``, with ``--set``-style overrides."""
    from vqgen.config import load_config

    return load_config(TINY_PIPELINE, [f"run.out_dir={root}", f"run.name={name}", "run.tracker=none", *sets])


class TinyPipeline:
    """``tests/pipelines/tiny.toml`` run through the ``vqgen`` command as users run it, in its own
    folder, with one process or several under ``torchrun`` (gloo on the CPU)."""

    def __init__(self, root: Path, weights: Path, name: str = "tiny", pipeline: Path = TINY_PIPELINE):
        self.root, self.weights, self.name, self.pipeline = root, weights, name, pipeline

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.name

    def command(self, *args: str, procs: int = 1, sets: tuple[str, ...] = (), launcher: str = "torchrun") -> list[str]:
        launch = [sys.executable]
        if procs > 1 and launcher == "torchrun":
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        elif procs > 1:  # accelerate's multi-process launcher; ACCELERATE_USE_CPU keeps it on gloo
            launch += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", "0"]
        base = [f"run.out_dir={self.root / 'runs'}", f"run.name={self.name}",
                f"evaluate.inception_weights={self.weights}"]
        overrides = [item for s in (*base, *sets) for item in ("--set", s)]
        # The config comes after the command (and the stage's name): `fid CONFIG SAMPLES` needs it there.
        head = 2 if args[0] == "stage" else 1
        return [*launch, "-m", "vqgen.cli", *args[:head], str(self.pipeline), *args[head:], *overrides]

    def start(self, *args: str, procs: int = 1, sets: tuple[str, ...] = (), wrap: tuple[str, ...] = (),
              launcher: str = "torchrun") -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
        # A session of its own, so a test can kill the launcher and every process it started.
        command = self.command(*args, procs=procs, sets=sets, launcher=launcher)
        return subprocess.Popen([*wrap, *command], cwd=self.root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def __call__(self, *args: str, procs: int = 1, sets: tuple[str, ...] = (), rc: int = 0,
                 wrap: tuple[str, ...] = (), launcher: str = "torchrun") -> str:
        proc = self.start(*args, procs=procs, sets=sets, wrap=wrap, launcher=launcher)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}:\n{out[-6000:]}"
        return out
