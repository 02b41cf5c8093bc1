"""pipelines/slurm.sbatch, run by bash with fake ``srun``, ``scontrol`` and ``accelerate`` first on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "pipelines" / "slurm.sbatch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# srun runs its command once per node, as SLURM does, with that node's SLURM_NODEID.
FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD/srun"
while [[ $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] || { echo "unexpected: $*" >&2; exit 1; }
printf 'gpu-07\\ngpu-08\\n'
"""
FAKE_ACCELERATE = """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD/accelerate.$SLURM_NODEID"
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "accelerate": FAKE_ACCELERATE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _submit(tmp_path: Path, *args: str, **slurm: str) -> subprocess.CompletedProcess:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "MASTER_PORT"}
    env.update(PATH=f"{_fake_bin(tmp_path)}{os.pathsep}{env['PATH']}", RECORD=str(record), **slurm)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def _argv(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_node_gets_its_rank_and_the_arguments_intact(tmp_path):
    args = ["pipelines/imagenet256.toml", "--set", "data.root=/data/image net", "--set", 'run.name=it\'s "a" run']
    result = _submit(tmp_path, *args, SLURM_JOB_NODELIST="gpu-[07-08]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4")
    assert result.returncode == 0, result.stderr
    srun = _argv(tmp_path / "record" / "srun")
    assert srun[:3] == ["--kill-on-bad-exit=1", "bash", "-c"] and srun[-len(args):] == args
    for node in (0, 1):
        assert _argv(tmp_path / "record" / f"accelerate.{node}") == [
            "launch", "--multi_gpu", "--mixed_precision", "bf16",
            "--num_machines", "2", "--num_processes", "8",
            "--machine_rank", str(node), "--main_process_ip", "gpu-07", "--main_process_port", "29500",
            "-m", "vqgen.cli", "run", *args,
        ]


def test_outside_slurm_it_says_to_use_sbatch(tmp_path):
    result = _submit(tmp_path, "pipelines/demo.toml")
    assert result.returncode != 0 and "submit this script with sbatch" in result.stderr
    assert not (tmp_path / "record" / "srun").exists()


def test_the_log_folder_is_named_in_the_header():
    # SLURM opens --output before the script runs: the header must tell the user to create it.
    text = SCRIPT.read_text()
    assert "#SBATCH --output=logs/" in text and "mkdir -p logs" in text.split("#SBATCH", 1)[0]
