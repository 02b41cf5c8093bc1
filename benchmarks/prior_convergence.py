"""Validation bits/dim against training time for two prior configurations, trained alternately.

    python benchmarks/prior_convergence.py RUN_DIR --level bottom --budget 600 \
        --b run.mixed_precision=bf16 --b prior.bottom.train.lr=5e-3 --out DIR

``RUN_DIR`` is a finished run's folder up to extract-codes (its ``config.toml`` and ``codes/``):
the code store is fixed, so both arms see the same data. Arm ``a`` is the run's own config with
the ``--a`` overrides (none: today's defaults, the baseline), arm ``b`` the same with ``--b``;
the keys are the pipeline's (``prior.LEVEL.*``, and ``run.mixed_precision`` / ``run.seed``).

The arms train in turns of ``--turn`` seconds each, so that whatever else slows the machine
slows both alike; each arm evaluates its validation bits/dim (in fp32, on the first
``--eval-batches`` batches of the eval store, the same set every time) every ``--eval-every``
seconds of its own training time, which excludes evaluation; with ``train.ema_decay`` the weight
average is updated every step (in the training time) and is what is evaluated. An arm stops at its configured
steps (its learning-rate schedule is the stage's) or at ``--budget`` seconds of training.

Written to ``--out``: ``curve.csv`` (arm, step, train_seconds, val_bits_per_dim), ``curve.png``,
and ``summary.json``: each arm's last validation bits/dim, and the training time each arm took
to first reach arm a's last value (linear between evaluations), with their ratio: the speed-up
of b over a at equal likelihood.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from vqgen.config import load_config
from vqgen.data.code_dataset import CodeDataset
from vqgen.ema import WeightEMA
from vqgen.evaluation import prior_inputs
from vqgen.metrics.image import bits_per_dim
from vqgen.models.pixelcnn import GatedPixelCNN
from vqgen.pictures import draw_curves
from vqgen.train import build_optimizer, lr_lambda, resolve_mixed_precision
from vqgen.stages.train_prior import levels_above, store_layout


@dataclass
class Arm:
    """One configuration being trained: its model, optimizer, data and curve."""

    name: str
    model: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: object
    steps: int
    bf16: bool
    conditional: bool
    above: tuple[str, ...]
    """The levels whose codes condition this one (top first)."""
    ema: WeightEMA | None = None
    """The weight average (``train.ema_decay`` > 0): evaluation reads it, as the stage's does."""
    train_seconds: float = 0.0
    step: int = 0
    next_eval: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= self.steps


def forever(loader: DataLoader):
    while True:
        yield from loader


def build_arm(name: str, run_dir: Path, level: str, overrides: list[str], device: torch.device) -> Arm:
    cfg = load_config(run_dir / "config.toml", overrides)
    stage = cfg.prior[level]
    store = CodeDataset(run_dir / "codes" / "codes.lmdb")
    torch.manual_seed(cfg.run.seed)
    model = GatedPixelCNN(stage.model, store_layout(store, level, stage.class_conditional)).to(device)
    if stage.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, stage.train, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage.train))
    loader = DataLoader(store, batch_size=stage.train.batch_size, sampler=RandomSampler(store), drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.run.seed))
    bf16 = resolve_mixed_precision(cfg.run.mixed_precision) == "bf16"
    forward = torch.compile(model) if stage.train.compile else model
    ema = WeightEMA(model, stage.train.ema_decay, stage.train.ema_start) if stage.train.ema_decay > 0 else None
    return Arm(name, model, forward, optimizer, scheduler, forever(loader), stage.train.steps, bf16,
               stage.class_conditional, levels_above(store, level), ema)


def train_turn(arm: Arm, level: str, seconds: float, budget: float, device: torch.device, grad_clip: float = 1.0) -> None:
    """Optimizer steps of ``arm`` for about ``seconds`` of its training time."""
    arm.forward.train()
    end = min(arm.train_seconds + seconds, budget)
    while arm.train_seconds < end and not arm.done:
        batch = {k: v.to(device) for k, v in next(arm.batches).items()}
        start = time.perf_counter()
        codes, labels, condition = prior_inputs(batch, level, arm.conditional, arm.above)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if arm.bf16 else nullcontext()
        with autocast:
            logits = arm.forward(codes, labels=labels, condition=condition)
        loss = torch.nn.functional.cross_entropy(logits.float(), codes)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(arm.model.parameters(), grad_clip)
        arm.optimizer.step()
        arm.scheduler.step()
        arm.optimizer.zero_grad(set_to_none=True)
        if arm.ema is not None:
            arm.ema.update(arm.model, arm.step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        arm.train_seconds += time.perf_counter() - start
        arm.step += 1


@torch.no_grad()
def validation_bpd(model: torch.nn.Module, batches: list[dict], level: str, conditional: bool,
                   above: tuple[str, ...] = ()) -> float:
    model.eval()
    nll, count = 0.0, 0
    for batch in batches:
        codes, labels, condition = prior_inputs(batch, level, conditional, above)
        logits = model(codes, labels=labels, condition=condition)
        nll += torch.nn.functional.cross_entropy(logits.float(), codes, reduction="sum").item()
        count += codes.numel()
    return float(bits_per_dim(torch.tensor(nll / count)))


def time_to_reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at which ``curve`` first reaches ``target`` (linear between points)."""
    previous = None
    for _, seconds, value in curve:
        if value <= target:
            if previous is None or previous[1] == value:
                return seconds
            t0, v0 = previous
            return t0 + (seconds - t0) * (v0 - target) / (v0 - value)
        previous = (seconds, value)
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--level", default="bottom", help="the level whose prior is trained (top, bottom, or another of vqvae.model.levels)")
    parser.add_argument("--a", action="append", default=[], help="an override of arm a (KEY=VALUE; repeat)")
    parser.add_argument("--b", action="append", default=[], help="an override of arm b (KEY=VALUE; repeat)")
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per arm at most")
    parser.add_argument("--turn", type=float, default=15.0, help="training seconds per turn")
    parser.add_argument("--eval-every", type=float, default=30.0, help="evaluate every N training seconds")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    arms = [build_arm("a", args.run_dir, args.level, args.a, device),
            build_arm("b", args.run_dir, args.level, args.b, device)]
    eval_store = CodeDataset(args.run_dir / "codes" / "eval.lmdb")
    loader = DataLoader(eval_store, batch_size=64, shuffle=False)
    eval_batches = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(args.eval_batches), loader)]

    def evaluate(arm: Arm) -> None:
        with arm.ema.applied(arm.model) if arm.ema is not None else nullcontext(arm.model) as model:
            value = validation_bpd(model, eval_batches, args.level, arm.conditional, arm.above)
        arm.curve.append((arm.step, arm.train_seconds, value))
        arm.next_eval = arm.train_seconds + args.eval_every
        print(f"arm {arm.name}: step {arm.step}, {arm.train_seconds:.0f} s, val bits/dim {value:.4f}", flush=True)

    for arm in arms:
        evaluate(arm)
    while any(not arm.done and arm.train_seconds < args.budget for arm in arms):
        for arm in arms:
            if arm.done or arm.train_seconds >= args.budget:
                continue
            train_turn(arm, args.level, min(args.turn, arm.next_eval - arm.train_seconds), args.budget, device)
            if arm.train_seconds >= arm.next_eval or arm.done or arm.train_seconds >= args.budget:
                evaluate(arm)
    return write_results(arms, args)


def write_results(arms: list[Arm], args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "step", "train_seconds", "val_bits_per_dim"])
        for arm in arms:
            writer.writerows((arm.name, step, f"{s:.3f}", f"{v:.5f}") for step, s, v in arm.curve)
    panel = {f"arm {arm.name}": [(s, v) for _, s, v in arm.curve] for arm in arms}
    draw_curves({f"{args.level} prior: validation bits/dim": panel}, log_scale=("bits/dim",),
                x_label="training seconds").save(args.out / "curve.png")
    target = arms[0].curve[-1][2]
    reach = {arm.name: time_to_reach(arm.curve, target) for arm in arms}
    summary = {
        "level": args.level, "overrides": {"a": args.a, "b": args.b}, "target_bits_per_dim": target,
        "final": {arm.name: {"step": arm.step, "train_seconds": arm.train_seconds, "val_bits_per_dim": arm.curve[-1][2]}
                  for arm in arms},
        "seconds_to_target": reach,
        "speedup_b_over_a": (reach["a"] / reach["b"]) if reach["b"] else None,
        "threads": torch.get_num_threads(), "device": args.device,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
