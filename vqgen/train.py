"""The training loop shared by every trainable stage (VQ-VAE and both priors).

``fit`` follows the Accelerate examples' order: prepare → loop with ``accelerator.accumulate`` →
checkpoint with ``save_state``. It leaves the process group and the trackers to the caller (the
pipeline runner finishes the trackers after the stage and tears the group down once, at exit): a stage
still gathers metrics and exports after ``fit`` returns, and later stages reuse the group. Progress (optimizer step, epoch, batch within the
epoch) lives in a :class:`TrainState` saved inside each checkpoint, so a run killed mid-epoch resumes
at the next batch with the same data order, RNG states and optimizer state.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from accelerate.utils.constants import RNG_STATE_NAME
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from vqgen.configtools import added_field, schedule_field
from vqgen.ema import EMA_FILE, WeightEMA
from vqgen.errors import CheckpointError, ConfigError
from vqgen.manifest import read_started
from vqgen.models.export import save_weights
from vqgen.tracking import TrackerKind, make_trackers
from vqgen.utils import atomic_write_json, read_json, storage_errors


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping for one trainable stage."""

    steps: int = schedule_field(10_000)
    """Optimizer steps in total (each step is ``grad_accum_steps`` micro-batches). Raising it on a
    finished stage continues training from its last checkpoint (a cosine schedule is stretched to the
    new length from there on)."""
    batch_size: int = 32
    """Micro-batch size per process."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate shape after warm-up; cosine decays to ``min_lr_ratio * lr`` at ``steps``."""
    min_lr_ratio: float = 0.1
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    log_every: int = schedule_field(25)
    checkpoint_every: int = schedule_field(500)
    keep_checkpoints: int = schedule_field(2)
    eval_every: int = schedule_field(500)
    """Validation metrics every N steps and at the end (0: only at the end)."""
    image_every: int = schedule_field(1000)
    """Write the stage's pictures (reconstructions / samples) every N steps and at the end (0: end only)."""
    num_workers: int = schedule_field(0)
    channels_last: bool = schedule_field(True)
    compile: bool = schedule_field(False)
    """Wrap the model in ``torch.compile`` (GPU runs; the export holds the uncompiled weights)."""
    export_best: bool = schedule_field(True)
    """Export the weights of the evaluation (every ``eval_every`` steps and at the end) with the best
    validation figure instead of the last weights: small datasets overfit (the stage's docstring
    names the figure)."""
    ema_decay: float = added_field(0.0)
    """Keep an exponential moving average of the weights with this decay (0: off; 0.999 or 0.9999
    are usual for priors): evaluation, the best-weights choice, the pictures and the export then use
    the average, while training goes on with the raw weights. The update after the n-th step past
    ``ema_start`` uses ``min(ema_decay, n / (n + 9))`` (TensorFlow's warm-up), so the average is not
    held near the weights of ``ema_start`` for ``1 / (1 - ema_decay)`` steps. Parameters only:
    buffers (the VQ codebooks and their statistics) are the raw model's (see ``vqgen/ema.py``)."""
    ema_start: int = added_field(0)
    """Optimizer steps before the average starts: up to then it equals the raw weights."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "image_every", "num_workers", "ema_start"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0, got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1) (0: no weight average), got {self.ema_decay}")


@dataclass
class TrainState:
    """Where training stands; saved as JSON in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of ``epoch`` already consumed (the resume point inside the epoch)."""
    best_step: int = -1
    """Step of the best validation figure so far (-1: none yet); its weights are ``best.safetensors``."""
    best_value: float = math.inf

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = (int(state[k]) for k in ("step", "epoch", "batch_in_epoch"))
        self.best_step, self.best_value = int(state.get("best_step", -1)), float(state.get("best_value", math.inf))


TRAIN_STATE = "train_state.json"
BEST_WEIGHTS = "best.safetensors"

LossFn = Callable[[torch.nn.Module, object], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
"""``loss_fn(model, batch) -> (loss, metrics)``: one micro-batch's loss and scalars to log."""


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX). Without it, bf16
    autocast is emulated and slower than float32. ``VQGEN_CPU_BF16=0`` in the environment says no
    (the test suite sets it, so that its figures do not depend on the machine's CPU)."""
    if os.environ.get("VQGEN_CPU_BF16") == "0":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def resolve_mixed_precision(mode: str) -> str:
    """``run.mixed_precision`` as Accelerate takes it. "auto": bf16 where the hardware computes in
    it, on CUDA GPUs that support it and on CPUs with AVX512-BF16 or AMX (the demo ran 22 s faster in
    bf16 on a 2-core AVX512-BF16 CPU, with a lower FID: NOTES.md), else float32 ("no")."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_computes_bf16() else "no"


def make_accelerator(
    stage_dir: Path, *, mixed_precision: str = "auto", tracker: TrackerKind = "csv", seed: int = 0
) -> Accelerator:
    """An Accelerator for one stage: trackers write into ``stage_dir``; ``mixed_precision`` as
    :func:`resolve_mixed_precision` reads it.

    DDP must not broadcast rank 0's buffers each forward: the VQ codebooks are buffers that every
    rank updates identically from all-reduced statistics.
    """
    mixed_precision = resolve_mixed_precision(mixed_precision)
    stage_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=make_trackers(tracker, stage_dir) or None,
        project_dir=str(stage_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    accelerator.init_trackers(stage_dir.name)
    set_seed(seed)
    return accelerator


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Checkpointer:
    """Accelerate state checkpoints in ``stage_dir/checkpoints``, written atomically.

    ``save_state`` writes into a temporary folder that is renamed once complete; ``latest.json``
    (written atomically after the rename) names the newest finished checkpoint, so a kill during a
    save never leaves a half-written checkpoint that resume would pick up.

    Loop progress and the LR schedule go into ``train_state.json`` rather than through
    ``register_for_checkpointing``, whose objects Accelerate unpickles with ``weights_only=False``;
    everything else Accelerate loads with ``weights_only=True``. The weight average, when there is
    one (``ema``), goes into ``ema.safetensors`` beside them.
    """

    def __init__(self, accelerator: Accelerator, stage_dir: Path, keep: int, ema: WeightEMA | None = None):
        self.accelerator = accelerator
        self.root = stage_dir / "checkpoints"
        self.keep = keep
        self.ema = ema
        started = read_started(stage_dir)  # written by the pipeline runner before the stage runs
        self.definition_hash = started.get("definition_hash") if started else None

    def latest(self) -> Path | None:
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        try:
            path = self.root / read_json(pointer)["name"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{pointer} is corrupt ({err}); delete it to start the stage afresh") from None
        if not path.is_dir():
            raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
        self._check_definition(path)
        return path

    def _check_definition(self, path: Path) -> None:
        """Refuse a checkpoint made under another definition of the stage (other data, model or
        optimiser settings): resuming it would mix two experiments in one result."""
        try:
            saved = read_json(path / TRAIN_STATE).get("definition_hash")
        except (OSError, ValueError, AttributeError):
            return  # a damaged train_state.json is reported by load()
        if saved and self.definition_hash and saved != self.definition_hash:
            raise CheckpointError(
                f"checkpoint {path} was written under another config of this stage than the one "
                f"running now; delete {self.root} to start the stage afresh (`vqgen run` restarts "
                "such a stage by itself)"
            )

    def save(self, step: int, train_state: dict) -> None:
        """A full disk (or a read-only one) raises StorageError with the half-written folder
        removed; the previous checkpoint and ``latest.json`` are untouched, so resume still works."""
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        with storage_errors(tmp, f"checkpoint {final}", cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            self.accelerator.save_state(str(tmp))
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                # Every rank holds the same average (see WeightEMA): the main process's is the file.
                if self.ema is not None:
                    self.ema.save(tmp / EMA_FILE, step)
                atomic_write_json(tmp / TRAIN_STATE, {**train_state, "definition_hash": self.definition_hash})
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            # latest.json still names the previous checkpoint if this write fails: drop the new one.
            with storage_errors(final, f"checkpoint {final}", cleanup=lambda: shutil.rmtree(final, ignore_errors=True)):
                atomic_write_json(self.root / "latest.json", {"name": name, "step": step})
            finished = sorted(p for p in self.root.glob("step-*") if p.is_dir())
            for old in finished[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load(self, path: Path) -> dict:
        """Restore model, optimizer, RNG states and the weight average; return the saved
        ``train_state`` dict."""
        try:
            self.accelerator.load_state(str(path))
            saved = read_json(path / TRAIN_STATE)
        except Exception as err:  # torch/safetensors/json raise many types for a damaged file
            raise CheckpointError(
                f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); "
                f"delete {self.root} to start the stage afresh"
            ) from err
        self._check_rng_restored(path)
        if self.ema is not None:
            self.ema.load(path / EMA_FILE, int(saved["loop"]["step"]))
        return saved

    def _check_rng_restored(self, path: Path) -> None:
        """Accelerate logs and ignores an RNG-state file it cannot load: resume would then go on with
        other random numbers than the interrupted run, silently. Load it the way Accelerate does
        (``weights_only``) and check that the torch RNG now holds its state."""
        rng_file = path / f"{RNG_STATE_NAME}_{self.accelerator.process_index}.pkl"
        needed = {"random_state", "numpy_random_seed", "torch_manual_seed"}
        if torch.cuda.is_available():
            needed.add("torch_cuda_manual_seed")
        try:
            states = accelerate_load(rng_file, weights_only=True)
            problem = None
            if missing := needed - set(states):
                problem = f"no {', '.join(sorted(missing))}"
            elif not torch.equal(torch.get_rng_state(), states["torch_manual_seed"]):
                problem = "Accelerate did not restore it"
        except Exception as err:  # missing, truncated, not a pickle, or more than plain data
            problem = _short_reason(err)
        if problem is not None:
            raise CheckpointError(
                f"damaged RNG state {rng_file} ({problem}); delete the checkpoint folder {path} and point "
                f"{self.root / 'latest.json'} at the previous one to resume from it, or delete {self.root} "
                "to start the stage afresh"
            )


def _short_reason(err: Exception) -> str:
    """The gist of a load error. torch's own text runs to paragraphs, and for a file that holds more
    than plain data it suggests ``weights_only=False``, which is not to be followed."""
    if isinstance(err, pickle.UnpicklingError):
        if "Unsupported global" in str(err):
            return "it holds more than plain data, and loading that could run code"
        return "not a readable torch file"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    first = str(err).strip().split("\n")[0].split(". ")[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    save_weights(model, path, f"best weights {path}")


def best_weights(model: torch.nn.Module, state: TrainState, stage_dir: Path, cfg: TrainConfig) -> tuple[torch.nn.Module, int]:
    """``(model, step)``: the best-validation weights kept by :func:`fit` loaded into ``model`` and
    their step, or ``model`` as it is and the last step when none were kept or ``cfg.export_best``
    is off (also when it was switched off after the best was kept: the stage then continues from its
    last checkpoint, and exports the weights of that step).

    With a weight average (``train.ema_decay``) they are the average's, evaluated at its best step,
    and without a best ``model`` already holds the last average: either way the stage exports what
    its evaluations measured."""
    path = stage_dir / BEST_WEIGHTS
    if cfg.export_best and state.best_step >= 0 and path.exists():
        model.load_state_dict(load_file(str(path), device="cpu"))
        return model, state.best_step
    return model, state.step


def _with_average(ema: WeightEMA | None, model: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
    """``model`` holding the weight average inside the block when there is one, else ``model`` as it is."""
    return ema.applied(model) if ema is not None else nullcontext(model)


def _train_loader(train_set: Dataset, cfg: TrainConfig, accelerator: Accelerator) -> DataLoader:
    """The shuffled training loader, with a generator of its own.

    Every new iterator of a ``DataLoader`` draws its workers' base seed from ``generator``, the
    global RNG when none is given. A resumed run makes iterators the uninterrupted run does not (the
    one that skips the consumed batches; with persistent workers, the first epoch's in a new process)
    right after the checkpoint restored the RNG, which shifted the model's dropout masks. The order of
    the items comes from Accelerate's seedable sampler, which reseeds its own generator every epoch,
    or from the dataset's own sampler when it has one (``train_sampler(seed)``: tar shards are read
    a few at a time). That one is seeded alike on every process and set to each epoch by
    ``loader.set_epoch``, so Accelerate deals its batches out as it does the seedable sampler's.
    """
    data_seed = accelerator.dataloader_config.data_seed or 0
    own = getattr(train_set, "train_sampler", None)
    sampler = own(data_seed) if own is not None else None
    return DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler if sampler is not None else RandomSampler(train_set),
        drop_last=True, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(data_seed + accelerator.process_index),
    )


def _batches(loader: DataLoader, accelerator: Accelerator, state: TrainState):
    """Micro-batches forever, epoch after epoch, starting at ``state``'s place in its epoch."""
    while True:
        loader.set_epoch(state.epoch)
        epoch_loader = loader
        if state.batch_in_epoch:
            epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
        for batch in epoch_loader:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over every parameter. On a GPU, the fused implementation: one kernel updates all
    parameters instead of a few launches per group of tensors. (On a CPU the fused kernel took the
    demo's top-prior optimizer step from about 5 to 1.7 ms, but the demo run with it was not faster
    as a whole: NOTES.md, "bf16 on this CPU"; kept as it was until measured further.)"""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


def train_step(model, batch, loss_fn: LossFn, optimizer, scheduler, accelerator, cfg: TrainConfig):
    """One micro-batch: forward, backward, and (at the accumulation boundary) clip and step."""
    with accelerator.accumulate(model):
        loss, metrics = loss_fn(model, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.grad_clip > 0:
            metrics["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}


def fit(
    model: torch.nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    accelerator: Accelerator,
    stage_dir: Path,
    loss_fn: LossFn,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    snapshot: Callable[[torch.nn.Module, int], None] | None = None,
    best_metric: str | None = None,
) -> TrainState:
    """Train ``model`` for ``cfg.steps`` optimizer steps, resuming from the latest checkpoint.

    ``evaluate(model)`` returns validation metrics (called on every process: gather inside it);
    ``snapshot(model, step)`` writes pictures (called on every process; write on the main one).
    ``best_metric``: a key of ``evaluate``'s result, lower is better; with ``cfg.export_best`` the
    weights at its best value are kept in ``stage_dir/best.safetensors`` (see :func:`best_weights`).

    With ``cfg.ema_decay`` a moving average of the weights is updated after every optimizer step
    and saved in every checkpoint; ``evaluate``, ``snapshot`` and ``best.safetensors`` see the
    average, training goes on with the raw weights, and ``model`` holds the average when ``fit``
    returns (the raw weights are in the last checkpoint).
    """
    accelerator.gradient_accumulation_steps = cfg.grad_accum_steps
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    loader = _train_loader(train_set, cfg, accelerator)
    if len(train_set) < cfg.batch_size * accelerator.num_processes:
        raise ConfigError("batch_size", f"{cfg.batch_size} per process is more than the {len(train_set)} training items allow")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    raw_model = accelerator.unwrap_model(model)
    ema = WeightEMA(raw_model, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay > 0 else None
    state = TrainState()
    checkpointer = Checkpointer(accelerator, stage_dir, cfg.keep_checkpoints, ema)
    if (latest := checkpointer.latest()) is not None:
        saved = checkpointer.load(latest)
        state.load_state_dict(saved["loop"])
        # Stepped by hand once per optimizer step (not prepared: Accelerate's wrapper would step it
        # once per process), so its state travels with the loop's.
        scheduler.load_state_dict(saved["scheduler"])
        accelerator.print(f"resumed from {latest} at step {state.step}")
    forward_model = torch.compile(model) if cfg.compile else model

    progress = tqdm(total=cfg.steps, initial=state.step, disable=not accelerator.is_main_process, desc=stage_dir.name)
    window: dict[str, list[torch.Tensor]] = {}
    images_per_step = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    window_start, window_steps = time.perf_counter(), 0
    batches = _batches(loader, accelerator, state)
    while state.step < cfg.steps:
        forward_model.train()
        metrics = train_step(forward_model, next(batches), loss_fn, optimizer, scheduler, accelerator, cfg)
        for key, value in metrics.items():
            window.setdefault(key, []).append(value.float())
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        if ema is not None:
            ema.update(raw_model, state.step)
        window_steps += 1
        progress.update(1)
        last = state.step == cfg.steps
        if state.step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            logs = {k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in window.items()}
            logs["lr"] = scheduler.get_last_lr()[0]
            logs["images_per_sec"] = images_per_step * window_steps / max(elapsed, 1e-9)
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            window, window_start, window_steps = {}, time.perf_counter(), 0
        due_eval = evaluate is not None and (last or (cfg.eval_every and state.step % cfg.eval_every == 0))
        due_snapshot = snapshot is not None and (last or (cfg.image_every and state.step % cfg.image_every == 0))
        if due_eval or due_snapshot:
            # What is measured and drawn is what the stage would export: the average, if any.
            with _with_average(ema, raw_model) as shown:
                if due_eval:
                    val = evaluate(shown)
                    accelerator.log(val, step=state.step)
                    if cfg.export_best and best_metric is not None and val[best_metric] < state.best_value:
                        state.best_step, state.best_value = state.step, float(val[best_metric])
                        if accelerator.is_main_process:
                            _save_weights(shown, stage_dir / BEST_WEIGHTS)
                if due_snapshot:
                    snapshot(shown, state.step)
        if last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            checkpointer.save(state.step, {"loop": state.state_dict(), "scheduler": scheduler.state_dict()})
        if state.step % cfg.log_every == 0:
            window_start = time.perf_counter()  # evaluation and checkpoints do not count as training time
    progress.close()
    if ema is not None:
        ema.copy_to(raw_model)
    return state
