"""Stage train-classifier: the image classifier that scores samples for classifier-based rejection
sampling (``sample.rejection``; Razavi et al. 2019, section 4), trained on the labelled training
split with cross-entropy.

Off unless ``classifier.enabled``; it reads only the data, so it can run at any point before the
sample stage that reads it. The export holds the weights with the lowest validation cross-entropy
among the evaluations (``train.export_best``): rejection sampling thresholds the classifier's
probabilities, so how well they are calibrated matters as much as which class wins. Writes
``classifier/``: ``checkpoints/`` (for resume), ``model.safetensors`` + ``model.json``,
``metrics.csv`` (train loss and accuracy, validation accuracy and loss) and ``manifest.json`` last,
with the accuracy on the whole eval split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from vqgen.config import ClassifierStageConfig
from vqgen.data.datasets import DataConfig, build_dataset, build_source, skipped_files_report
from vqgen.distributed import on_main_process, shard_loader
from vqgen.errors import ConfigError
from vqgen.evaluation import classification_metrics, classifier_loss_fn
from vqgen.models.classifier import ClassifierLayout, ResNetClassifier
from vqgen.models.export import export_model
from vqgen.stage import Stage, StageResult, check_data, folder_index_dir
from vqgen.train import best_weights, fit

DIR = "classifier"


def augmentation(cfg: ClassifierStageConfig):
    """The training images' random flips and shifts (None when both are off). Drawn from the
    global torch RNG of the images' device, which checkpoints restore: resume stays exact."""
    if not cfg.hflip and not cfg.max_shift:
        return None

    def augment(images: torch.Tensor) -> torch.Tensor:
        if cfg.hflip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if cfg.max_shift:
            images = random_shift(images, cfg.max_shift)
        return images

    return augment


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Each image moved by its own random offset of up to ``max_shift`` pixels along each axis,
    the border filled by reflection."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), device=images.device))
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [B, W]
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around the channel slice: the result is [B, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def layout_of(data: DataConfig, num_classes: int) -> ClassifierLayout:
    return ClassifierLayout(in_channels=data.channels, image_size=data.image_size, num_classes=num_classes)


def _unlabelled(data: DataConfig) -> ConfigError:
    where = f" ({data.root})" if data.root else ""
    return ConfigError("classifier.enabled", f"data.kind = {data.kind!r}{where} has no class labels, and the "
                                             "classifier learns them: use labelled data (a folder's labels are "
                                             "its first-level subfolders) or switch the classifier off")


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    cfg: ClassifierStageConfig = sections["classifier"]
    data: DataConfig = sections["data"]
    stage_dir = run_dir / DIR
    train_set = build_dataset(data, "train", index_dir=folder_index_dir(run_dir))
    eval_set = build_dataset(data, "eval", index_dir=folder_index_dir(run_dir))
    if train_set.num_classes < 2:
        raise _unlabelled(data)
    model = ResNetClassifier(cfg.model, layout_of(data, train_set.num_classes))
    eval_loader = shard_loader(eval_set, cfg.train.batch_size, accelerator, cfg.train.num_workers)

    def evaluate(model):
        return classification_metrics(model, eval_loader, accelerator, max_batches=cfg.eval_batches)

    loss_fn = classifier_loss_fn(augmentation(cfg))
    state = fit(model, train_set, cfg.train, accelerator, stage_dir, loss_fn, evaluate, None, "val_loss")
    model, exported_step = best_weights(accelerator.unwrap_model(model), state, stage_dir, cfg.train)
    metrics = classification_metrics(model, eval_loader, accelerator)  # the whole eval split
    checksum = export_model(model, stage_dir) if accelerator.is_main_process else None
    outputs = {"model": "model.safetensors", "model_sha256": checksum, "steps": state.step,
               "exported_step": exported_step,
               "num_classes": train_set.num_classes}
    skipped, lines = skipped_files_report(train=train_set, eval=eval_set)
    for line in lines:
        accelerator.print(f"[vqgen] {line}")
    metrics.update(skipped)
    return StageResult(outputs, metrics, files=("model.safetensors", "model.json"))


def preflight(sections: dict) -> None:
    """Before the run's first stage: the data root, labels in the training split, and an
    architecture that fits the images (a training run that could only fail does not start)."""
    cfg: ClassifierStageConfig = sections["classifier"]
    data: DataConfig = sections["data"]
    check_data(sections)
    if cfg.max_shift >= data.image_size:
        raise ConfigError("classifier.max_shift", f"must be less than data.image_size ({data.image_size})")
    run = sections["run"]
    index_dir = folder_index_dir(Path(run.out_dir) / run.name)
    num_classes = on_main_process(lambda: build_source(data, "train", index_dir).num_classes)
    if num_classes < 2:
        raise _unlabelled(data)
    if data.image_size < 2**cfg.model.stages:
        raise ConfigError("classifier.model.stages", f"{cfg.model.stages} halvings of {data.image_size}-pixel "
                                                     "images leave less than one pixel")


STAGES = (Stage("train-classifier", DIR, ("run", "data", "classifier"), (), run, preflight=preflight,
                enabled=lambda sections: sections["classifier"].enabled, switch="classifier.enabled"),)
