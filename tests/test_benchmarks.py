"""The benchmark scripts run end to end: kernel scripts through ``--smoke`` (tiny shapes, Triton's
interpreter on a CPU), the end-to-end scripts at toy sizes. These check the scripts, not speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=BENCHMARKS.parent)


def test_run_all_smoke_runs_every_script(tmp_path):
    """The whole GPU plan at toy sizes: every kernel benchmark, ceilings, training and sampling."""
    pytest.importorskip("triton")
    result = run_script("run_all.py", "--smoke", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "run.log").read_text()
    tables = [line.split(" [smoke run on")[0].split(",")[0] for line in log.splitlines()
              if line.endswith("single calls, not measurements]")]
    assert tables == ["nearest_code", "gated_residual forward", "strictly causal attention"]
    assert "WARNING" not in log and "OOM" not in log
    summary = (tmp_path / "summary.md").read_text()
    status = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in summary.splitlines()[2:])}
    assert status.pop("cuda-tests") in ("ok", "skipped: needs a GPU")
    assert set(status) >= {"ceilings", "bench_gated", "bench_vq_search", "bench_attention", "train-top-prior",
                           "train-top-prior-torch-kernels", "sample-toy-b2", "sample-toy-b2-bf16", "train-vqvae-32",
                           "train-vqvae-32-torch-kernels"}
    assert set(status.values()) == {"ok"}, summary
    figures = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_step = {f["step"]: f for f in figures}
    assert "mfu" in by_step["train-top-prior"], log  # the ceilings step's bf16 rate reached the MFU step
    assert by_step["train-top-prior"]["mfu"] > 0
    assert by_step["sample-toy-b2"]["cached_samples_per_sec"] > 0
    bf16 = by_step["sample-toy-b2-bf16"]
    assert bf16["precision"] == "bf16" and 0 <= bf16["draws_differing"] <= 1 and bf16["mean_kl_nats"] >= 0


def test_run_all_stops_starting_steps_when_the_budget_is_spent(tmp_path):
    result = run_script("run_all.py", "--smoke", "--results", str(tmp_path), "--budget-min", "0")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("not run: budget spent") >= 9


FIGURES_THEN_A_WARNING = "import json; print(json.dumps({'images_per_sec': 12.5})); print('a warning')"


def test_run_all_records_failed_and_stopped_steps(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all

    steps = [
        run_all.Step("fails", ["-c", "import sys; print('partial'); sys.exit(3)"], 60),
        run_all.Step("too-slow", ["-c", "import time; time.sleep(30)"], 60),
        run_all.Step("figures", ["-c", FIGURES_THEN_A_WARNING], 60),
    ]
    with open(tmp_path / "run.log", "w") as log:
        run_all.run_step(steps[0], 60, log)
        run_all.run_step(steps[1], 1, log)
        run_all.run_step(steps[2], 60, log)
    assert [s.status for s in steps] == ["exit 3", "stopped at 1 s", "ok"]
    assert steps[2].figures == {"images_per_sec": 12.5}
    run_all.write_summary(steps, tmp_path)
    assert "| fails | exit 3 |" in (tmp_path / "summary.md").read_text()
    assert "partial" in (tmp_path / "run.log").read_text()
    assert json.loads((tmp_path / "results.jsonl").read_text()) == {"step": "figures", "images_per_sec": 12.5}


def test_smoke_run_writes_no_results():
    result = run_script("bench_vq_search.py", "--smoke", "--out", "results.md")
    assert result.returncode != 0
    assert "writes no --out file" in result.stderr
    assert not (BENCHMARKS.parent / "results.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_timed_run_without_gpu_says_why():
    result = run_script("bench_gated.py")
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr and "nothing was measured" in result.stderr


def test_smoke_run_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """The smoke check compares every provider with eager: a kernel off by a little must fail it."""
    pytest.importorskip("triton")
    from vqgen.kernels import gated

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored afterwards; the script sets it on a CPU
    monkeypatch.setattr(sys, "argv", ["bench_gated.py", "--smoke"])
    reference = gated.gated_residual_reference

    def off_by_a_little(**x):
        out, gated_out = reference(**x)
        return out + 0.2, gated_out

    monkeypatch.setattr(gated, "gated_residual_triton", off_by_a_little)
    import bench_gated

    try:
        with pytest.raises(SystemExit, match="smoke check failed: triton.*differs from eager"):
            bench_gated.main()
    finally:
        torch._dynamo.reset()


def test_markdown_results_name_the_machine(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from common import Table, append_markdown

    table = Table("nearest_code", ["N", "ms"])
    table.add(512, "0.125 (0.120-0.130)")
    out = tmp_path / "BENCH.md"
    out.write_text("# earlier results\n")
    append_markdown(str(out), "nearest_code (bench_vq_search.py)", [table], ["ceiling: 1 TFLOP/s"])
    text = out.read_text()
    assert text.startswith("# earlier results\n")  # appended, nothing lost
    assert "### nearest_code (bench_vq_search.py)" in text
    assert f"torch {torch.__version__}" in text and "- ceiling: 1 TFLOP/s" in text
    assert "| 512 | 0.125 (0.120-0.130) |" in text


@pytest.mark.parametrize("model", ["prior-top", "prior-bottom"])
def test_prior_flops_count_the_fused_projection(monkeypatch, model):
    """FLOPs come from the reference path, so the same model counts the same with fused kernels on."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import argparse

    import train_throughput

    args = dict(model=model, shape=[4, 4], batch=2, channels=16, codes=32, layers=2, kernel=5,
                attention_every=1, heads=2, cond_blocks=1, device="cpu")
    counts = {b: train_throughput.prior_flops(argparse.Namespace(**args, backend=b)) for b in ("torch", "triton")}
    assert counts["torch"] == counts["triton"] > 0


def test_shard_reader_smoke(tmp_path):
    """The folder-against-shards loader benchmark end to end at a toy size (times mean nothing here)."""
    out = tmp_path / "shards.json"
    result = run_script("shard_reader.py", "--images", "120", "--batch", "8", "--shard-size", "25",
                        "--workdir", str(tmp_path), "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())["readers"]
    assert set(figures) == {"folder", "shards"}
    assert figures["folder"]["items"] == figures["shards"]["items"] == 108  # the hold-out takes 1 in 10
    assert all(f["images_per_sec"] > 0 for f in figures.values())
    assert "shards" in result.stdout.splitlines()[-1]
