"""Every GPU figure of BENCHMARKS.md in one run, most wanted first, within a time budget.

    python benchmarks/run_all.py --results DIR [--budget-min 9] [--full]
    python benchmarks/run_all.py --results DIR --smoke        # the whole plan at toy sizes, any device

Each step is a subprocess with its own time limit. A step that fails or runs out of time is
recorded and the run goes on; once the budget is spent, the steps left are listed as not run.
Order: the CUDA-only tests, the measured ceilings, the three kernel benchmarks, training
throughput of the paper-scale top prior (its model-FLOPs utilisation) and of the CIFAR-10 bottom
prior with the fused kernels and with the PyTorch references, cached sampling at the 256x256
latent sizes and at batch 1 / 64 / 512 (with and without CUDA graphs), then training with
``torch.compile`` and the VQ-VAE's throughput.

Writes into DIR (at most four files):
- ``kernels.md``: the kernel benchmarks' tables, under the GPU model, the date and the versions;
- ``results.jsonl``: one JSON object per end-to-end step (its name added as ``step``);
- ``summary.md``: one row per step: exit status, seconds, its figures;
- ``run.log``: every step's command, output, exit status and time.

The kernel benchmarks cover their ``--quick`` shapes and compile the references in torch.compile's
default mode, so the run fits in about ten minutes; ``--full`` runs every shape, with
max-autotune, and needs a budget of 30 minutes or more.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
KERNEL_SCRIPTS = ["bench_vq_search.py", "bench_gated.py", "bench_attention.py"]
# The paper-scale top prior (32x32 codes, 512 channels, 20 layers, attention every 5th).
TOP_PRIOR = ["prior-top", "--shape", "32", "32", "--channels", "512", "--layers", "20", "--attention-every", "5",
             "--batch", "32", "--precision", "bf16", "--channels-last"]
# The CIFAR-10 bottom prior's training (pipelines/cifar10.toml): 8x8 codes, 256 channels, batch 128.
CIFAR_BOTTOM_PRIOR = ["prior-bottom", "--shape", "8", "8", "--channels", "256", "--layers", "20", "--cond-blocks", "10",
                      "--batch", "128", "--precision", "bf16", "--channels-last"]
TOY_TOP_PRIOR = ["prior-top", "--shape", "4", "4", "--channels", "16", "--layers", "2", "--attention-every", "1",
                 "--heads", "2", "--codes", "32", "--batch", "2", "--steps", "2", "--warmup", "1"]
# Both levels of a 256x256 sample (pipelines/imagenet256.toml): 32x32 top codes, then 64x64 bottom
# codes conditioned on them. The target is the two together under a minute at batch 64.
TOP_256 = ["--level", "top", "--shape", "32", "32", "--channels", "512", "--layers", "20", "--attention-every", "5",
           "--heads", "8", "--batch", "64", "--skip-full"]
BOTTOM_256 = ["--level", "bottom", "--shape", "64", "64", "--channels", "512", "--layers", "20", "--cond-blocks", "20",
              "--batch", "64", "--skip-full"]
# The CIFAR-10 bottom prior (pipelines/cifar10.toml): 8x8 codes, 256 channels.
BOTTOM_CIFAR = ["--level", "bottom", "--shape", "8", "8", "--channels", "256", "--layers", "20", "--cond-blocks", "10"]
TOY_SAMPLING = ["--level", "bottom", "--shape", "4", "4", "--channels", "8", "--layers", "2", "--cond-blocks", "1",
                "--codes", "16", "--full-positions", "2"]
VQVAE_32 = ["vqvae", "--size", "32", "--batch", "32", "--precision", "bf16", "--channels-last"]
TOY_VQVAE = ["vqvae", "--size", "16", "--channels", "16", "--res-channels", "8", "--res-blocks", "1", "--codes", "32",
             "--code-dim", "8", "--batch", "2", "--steps", "2", "--warmup", "1"]


@dataclass
class Step:
    name: str
    argv: list[str]  # after the python executable
    limit_s: int
    gpu_only: bool = False
    figures: dict = field(default_factory=dict)  # the step's JSON line, for end-to-end scripts
    status: str = "not run"
    seconds: float = 0.0


def script(name: str, *args: str) -> list[str]:
    return [str(BENCHMARKS / name), *args]


def plan(smoke: bool, full: bool, results: Path) -> list[Step]:
    """The steps in priority order. ``--peak-tflops`` of the MFU step is filled in after ceilings."""
    out = [] if smoke else ["--out", str(results / "kernels.md")]
    shapes = ["--smoke"] if smoke else [] if full else ["--quick", "--compile-mode", "default"]
    steps = [
        Step("cuda-tests", ["-m", "pytest", "-q", "-rs", "tests/kernels", "tests/test_sampling.py"], 240,
             gpu_only=True),
        Step("ceilings", script("ceilings.py", "--json", *out, *(["--smoke"] if smoke else [])), 60),
    ]
    limit = 900 if full else 180
    steps += [Step(name.removesuffix(".py"), script(name, *out, *shapes), limit) for name in KERNEL_SCRIPTS]

    def train(name: str, *args: str, limit: int = 180) -> None:
        steps.append(Step(name, script("train_throughput.py", *args), limit))

    # Training throughput with the fused kernels and with the PyTorch references, eager.
    prior = TOY_TOP_PRIOR if smoke else TOP_PRIOR
    train("train-top-prior", *prior)
    train("train-top-prior-torch-kernels", *prior, "--backend", "torch")
    if not smoke:
        train("train-cifar-bottom-prior", *CIFAR_BOTTOM_PRIOR, limit=120)
        train("train-cifar-bottom-prior-torch-kernels", *CIFAR_BOTTOM_PRIOR, "--backend", "torch", limit=120)
    if smoke:
        sampling = [("sample-toy-b2", [*TOY_SAMPLING, "--batch", "2"]),
                    ("sample-toy-b2-bf16", [*TOY_SAMPLING, "--batch", "2", "--precision", "bf16"])]
    else:
        sampling = [("sample-256-top-b64", TOP_256), ("sample-256-bottom-b64", BOTTOM_256),
                    ("sample-256-bottom-b64-bf16", [*BOTTOM_256, "--precision", "bf16"])]
        sampling += [(f"sample-cifar-bottom-b{b}", [*BOTTOM_CIFAR, "--batch", str(b)]) for b in (1, 64, 512)]
    graphs = [] if smoke else ["--cuda-graphs"]
    steps += [Step(name, script("sampling_speed.py", *args, *graphs), 240) for name, args in sampling]

    if not smoke:  # inductor on a CPU would spend the smoke run compiling C++
        train("train-top-prior-compiled", *prior, "--compile", limit=300)
    vqvae = TOY_VQVAE if smoke else VQVAE_32
    train("train-vqvae-32", *vqvae, limit=120)
    train("train-vqvae-32-torch-kernels", *vqvae, "--backend", "torch", limit=120)
    if not smoke:
        train("train-vqvae-32-compiled", *vqvae, "--compile", limit=300)
        train("train-vqvae-256", "vqvae", "--size", "256", "--batch", "32", "--res-channels", "64",
              "--precision", "bf16", "--channels-last", limit=120)
    return steps


def run_step(step: Step, limit_s: float, log) -> None:
    command = [sys.executable, *step.argv]
    log.write(f"\n=== {step.name}: {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=limit_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output, step.status = done.stdout, "ok" if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        step.status = f"stopped at {limit_s:.0f} s"
    step.seconds = time.perf_counter() - start
    log.write(output)
    log.write(f"=== {step.name}: {step.status} in {step.seconds:.1f} s\n")
    log.flush()
    if step.status == "ok":
        step.figures = last_json_line(output)


def last_json_line(output: str) -> dict:
    """The figures a script prints as one JSON line (warnings may follow it in the output)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def write_summary(steps: list[Step], results: Path) -> None:
    lines = ["| step | status | seconds | figures |", "|---|---|---|---|"]
    for step in steps:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in step.figures.items())
        lines.append(f"| {step.name} | {step.status} | {step.seconds:.1f} | {figures} |")
    (results / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(results / "results.jsonl", "w", encoding="utf-8") as f:
        for step in steps:
            if step.figures:
                f.write(json.dumps({"step": step.name, **step.figures}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, type=Path,
                   help="folder for kernels.md, results.jsonl, summary.md and run.log")
    p.add_argument("--budget-min", type=float, default=9.0, help="no step starts after this many minutes")
    p.add_argument("--full", action="store_true", help="every shape, torch.compile in max-autotune mode")
    p.add_argument("--smoke", action="store_true", help="the plan at toy sizes on any device: checks this script")
    args = p.parse_args()
    if importlib.util.find_spec("vqgen") is None or importlib.util.find_spec("vqgen.kernels") is None:
        sys.exit("run_all.py: vqgen is not installed; from the repository root run `pip install -e .` "
                 "(without network access, with torch and Triton present: `pip install --no-deps "
                 "--no-build-isolation -e .`).")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        sys.exit("run_all.py: needs a CUDA GPU, and none is visible to torch; nothing was measured "
                 "(--smoke runs the plan at toy sizes).")

    args.results.mkdir(parents=True, exist_ok=True)
    steps = plan(args.smoke, args.full, args.results)
    deadline = time.perf_counter() + args.budget_min * 60
    with open(args.results / "run.log", "a", encoding="utf-8") as log:
        device = torch.cuda.get_device_name() if on_gpu else "CPU"
        log.write(f"# run_all.py on {device}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
        for step in steps:
            remaining = deadline - time.perf_counter()
            if step.gpu_only and not on_gpu:
                step.status = "skipped: needs a GPU"
            elif remaining < 20:
                step.status = "not run: budget spent"
            else:
                run_step(step, min(step.limit_s, remaining), log)
            if step.name == "ceilings" and step.figures:
                peak = f"{step.figures['bf16_tflops']:.6g}"
                for later in steps:
                    if later.name.startswith("train-top-prior"):
                        later.argv += ["--peak-tflops", peak]
            print(f"{step.name:40s} {step.status:24s} {step.seconds:7.1f} s", flush=True)
            write_summary(steps, args.results)  # after every step: a run cut short keeps what it measured
    failed = [s.name for s in steps if s.status not in ("ok", "not run: budget spent", "skipped: needs a GPU")]
    if failed:
        sys.exit(f"run_all.py: steps that did not finish: {', '.join(failed)}")


if __name__ == "__main__":
    main()
