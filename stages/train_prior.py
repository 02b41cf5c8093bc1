"""Stage train-prior: train the gated PixelCNN prior of one level on the extracted codes.

Writes ``prior-LEVEL/`` (``prior-top/``, ``prior-bottom/``, ...): ``checkpoints/``,
``model.safetensors`` + ``model.json``, ``metrics.csv`` (train and validation bits/dim),
``samples.png`` while training, ``manifest.json``. The priors are trained bottom first in a
pipeline, so the top prior's ``samples.png`` shows full ancestral samples (top codes → the codes
below → image); a lower prior's samples are its codes drawn for the codes above of real held-out
images. The export holds the weights with the lowest
validation bits/dim among the evaluations (``train.export_best``): on small datasets the priors,
the bottom one especially, overfit long before the last step. With ``train.ema_decay`` the
evaluations, and so the export, are of the weight average (see ``vqgen/ema.py``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from accelerate import Accelerator

from vqgen.config import PriorStageConfig
from vqgen.data.code_dataset import CodeDataset
from vqgen.distributed import shard_loader
from vqgen.errors import ConfigError
from vqgen.evaluation import prior_bits_per_dim, prior_loss_fn
from vqgen.tracking import log_images
from vqgen.stage import Stage, StageResult
from vqgen.models.export import export_model, load_model
from vqgen.models.pixelcnn import GatedPixelCNN, PriorLayout
from vqgen.pictures import save_grid
from vqgen.sampling import SamplerConfig, sample
from vqgen.train import best_weights, fit

def stage_dir_name(level: str) -> str:
    return f"prior-{level}"


def levels_above(store: CodeDataset, level: str) -> tuple[str, ...]:
    """The levels whose codes condition ``level``'s prior: every one above it, top first."""
    names = tuple(store.shapes)
    if level not in names:
        raise ConfigError("levels", f"the code store has no level {level!r} (it holds {', '.join(names)})")
    return names[: names.index(level)]


def store_layout(store: CodeDataset, level: str, class_conditional: bool) -> PriorLayout:
    """What the prior of ``level`` models and reads, as the code store holds it."""
    if class_conditional and store.num_classes == 0:
        raise ConfigError("class_conditional", "the code store holds no class labels")
    above = levels_above(store, level)
    nearest, upper = (above[-1], above[:-1]) if above else (None, ())
    return PriorLayout(
        num_codes=store.num_codes[level],
        shape=tuple(store.shapes[level]),
        num_classes=store.num_classes if class_conditional else 0,
        condition_num_codes=store.num_codes[nearest] if nearest else 0,
        condition_shape=tuple(store.shapes[nearest]) if nearest else (),
        upper_num_codes=tuple(store.num_codes[name] for name in upper),
        upper_shapes=tuple(tuple(store.shapes[name]) for name in upper),
    )


@torch.no_grad()
def write_samples(prior, level: str, run_dir: Path, eval_store, n: int, path: Path, device) -> None:
    """``samples.png``: decoded samples of the prior being trained. The levels above it are real
    held-out codes, ``level`` is drawn from ``prior``, and the levels below are drawn from their
    priors when every one of them has been exported (the priors train bottom first, so the top
    prior's pictures are full ancestral samples), else real codes."""
    vqvae, _, _ = load_model(run_dir / "vqvae", device=device)
    names = tuple(eval_store.shapes)
    generator = torch.Generator(device="cpu").manual_seed(0)
    real = [eval_store[i] for i in range(min(n, len(eval_store)))]
    labels = torch.tensor([r["label"] for r in real], device=device) if eval_store.num_classes else None
    if prior.layout.num_classes and labels is None:
        labels = torch.arange(len(real), device=device) % prior.layout.num_classes
    index = names.index(level)
    codes = [torch.stack([r[name] for r in real]).to(device) for name in names[:index]]
    codes.append(_draw(prior, len(real), codes, labels, generator))
    below = [run_dir / stage_dir_name(name) for name in names[index + 1 :]]
    if all((folder / "model.json").exists() for folder in below):
        for folder in below:
            codes.append(_draw(load_model(folder, device=device)[0], len(real), codes, labels, generator))
    else:
        codes += [torch.stack([r[name] for r in real]).to(device) for name in names[index + 1 :]]
    save_grid(vqvae.decode_codes(*codes).float().cpu(), path)


def _draw(prior, n: int, above: list[torch.Tensor], labels, generator) -> torch.Tensor:
    """``n`` code maps of one level drawn from ``prior`` given the levels ``above`` it."""
    return sample(prior, n, labels=labels if prior.layout.num_classes else None, condition=tuple(above) or None,
                  config=SamplerConfig(), generator=generator)


def run(sections: dict, run_dir: Path, accelerator: Accelerator, *, level: str) -> StageResult:
    cfg: PriorStageConfig = sections[f"prior.{level}"]
    stage_dir = run_dir / stage_dir_name(level)
    codes_dir = run_dir / "codes"
    train_store = CodeDataset(codes_dir / "codes.lmdb")
    eval_path = codes_dir / "eval.lmdb"
    eval_store = CodeDataset(eval_path) if eval_path.exists() else train_store
    layout = store_layout(train_store, level, cfg.class_conditional)
    above = levels_above(train_store, level)
    model = GatedPixelCNN(cfg.model, layout)
    eval_loader = shard_loader(eval_store, cfg.train.batch_size, accelerator, cfg.train.num_workers)

    def evaluate(model):
        bpd = prior_bits_per_dim(model, eval_loader, accelerator, level, cfg.class_conditional, cfg.eval_batches, above)
        return {"val_bits_per_dim": bpd}

    def snapshot(model, step):
        if accelerator.is_main_process and cfg.num_sample_images:
            write_samples(model, level, run_dir, eval_store, cfg.num_sample_images, stage_dir / "samples.png", accelerator.device)
            log_images(accelerator, {"samples": stage_dir / "samples.png"}, step)

    loss_fn = prior_loss_fn(level, cfg.class_conditional, above)
    state = fit(model, train_store, cfg.train, accelerator, stage_dir, loss_fn, evaluate, snapshot, "val_bits_per_dim")
    model, exported_step = best_weights(accelerator.unwrap_model(model), state, stage_dir, cfg.train)
    bpd = prior_bits_per_dim(model, eval_loader, accelerator, level, cfg.class_conditional, above=above)
    checksum = export_model(model, stage_dir) if accelerator.is_main_process else None
    outputs = {"model": "model.safetensors", "model_sha256": checksum, "steps": state.step,
               "exported_step": exported_step}
    metrics = {"val_bits_per_dim": bpd, "uniform_bits_per_dim": math.log2(layout.num_codes)}
    return StageResult(outputs, metrics, files=("model.safetensors", "model.json"))


def stages(levels: tuple[str, ...]) -> tuple[Stage, ...]:
    """One train-prior stage per level (``levels`` top first), the bottom one first: the priors
    above then draw full ancestral samples in their training pictures."""
    return tuple(
        Stage(f"train-prior-{level}", stage_dir_name(level), ("run", f"prior.{level}"), ("extract-codes",),
              functools.partial(run, level=level))
        for level in reversed(levels)
    )
