"""Dataset-level figures computed during and after training, correct under several processes.

Each function runs on every process over its shard of a prepared DataLoader and reduces across
processes, so every rank returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from vqgen.metrics.image import bits_per_dim, psnr, usage_from_counts
from vqgen.utils import eval_mode


def vqvae_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """train-vqvae's micro-batch loss: reconstruction MSE + weighted commitment terms."""
    images = batch[0]
    out = model(images)
    return out.loss, {
        "recon_mse": out.recon_loss,
        "commitment": out.commitment_loss,
        **{f"perplexity_{level}": value for level, value in out.perplexity.items()},
    }


@torch.no_grad()
def reconstruction_metrics(model, loader, accelerator: Accelerator, max_batches: int = 0) -> dict[str, float]:
    """Reconstruction MSE and PSNR (on [-1, 1] images, data range 2) and per-level codebook usage.

    Usage is the fraction of each level's codes that the evaluated images use at least once.
    """
    counts = {level.name: torch.zeros(level.num_codes, device=accelerator.device)
              for level in model.config.hierarchy}
    sq_err, psnr_sum, n = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device), 0
    with eval_mode(model):
        for i, (images, _) in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            images = images.to(accelerator.device)
            codes = model.encode(images)
            recon = model.decode_codes(*codes).float().clamp(-1, 1)
            sq_err += (recon - images).pow(2).mean(dim=(1, 2, 3)).sum()
            psnr_sum += psnr(recon, images, data_range=2.0)[0].sum().float()
            n += images.shape[0]
            for level, level_codes in zip(counts, codes):
                counts[level] += torch.bincount(level_codes.flatten(), minlength=counts[level].numel())
    total = accelerator.reduce(torch.tensor(float(n), device=accelerator.device), "sum").item()
    sq_err, psnr_sum = accelerator.reduce(sq_err, "sum"), accelerator.reduce(psnr_sum, "sum")
    metrics = {"val_recon_mse": sq_err.item() / total, "val_psnr": psnr_sum.item() / total, "val_images": total}
    for level, level_counts in counts.items():
        used, perplexity = usage_from_counts(accelerator.reduce(level_counts, "sum"))
        metrics[f"val_usage_{level}"] = used
        metrics[f"val_perplexity_{level}"] = perplexity
    return metrics


def prior_inputs(batch: dict, level: str, conditional: bool, above: tuple[str, ...] = ()):
    """(target codes, labels or None, the code maps of the levels ``above`` or None) of one
    code-store batch."""
    labels = batch["label"] if conditional else None
    condition = tuple(batch[name] for name in above) or None
    return batch[level], labels, condition


def prior_loss_fn(level: str, conditional: bool, above: tuple[str, ...] = ()):
    """train-prior's micro-batch loss (cross-entropy in nats) for one level, conditioned on the
    levels ``above`` it (top first)."""

    def loss_fn(model, batch):
        codes, labels, condition = prior_inputs(batch, level, conditional, above)
        logits = model(codes, labels=labels, condition=condition)
        loss = torch.nn.functional.cross_entropy(logits.float(), codes)
        return loss, {"bits_per_dim": bits_per_dim(loss.detach())}  # a tensor: no host read per step

    return loss_fn


@torch.no_grad()
def prior_bits_per_dim(model, loader, accelerator: Accelerator, level: str, conditional: bool, max_batches: int = 0,
                       above: tuple[str, ...] = ()) -> float:
    """Mean negative log-likelihood of held-out codes, in bits per code position."""
    nll, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            codes, labels, condition = prior_inputs(batch, level, conditional, above)
            logits = model(codes, labels=labels, condition=condition)
            nll += torch.nn.functional.cross_entropy(logits.float(), codes, reduction="sum")
            count += codes.numel()
    return bits_per_dim(accelerator.reduce(nll, "sum") / accelerator.reduce(count, "sum")).item()


def classifier_loss_fn(augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """train-classifier's micro-batch loss: cross-entropy of the labels (after ``augment`` of the
    images, when given), with the batch's accuracy to log."""

    def loss_fn(model, batch):
        images, labels = batch
        if augment is not None:
            images = augment(images)
        logits = model(images).float()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(dim=1) == labels).float().mean()}

    return loss_fn


@torch.no_grad()
def classification_metrics(model, loader, accelerator: Accelerator, max_batches: int = 0) -> dict[str, float]:
    """Accuracy and mean cross-entropy (nats) of the classifier over the evaluated images, summed
    on every process and reduced, so each image counts once whatever the number of processes."""
    device = accelerator.device
    loss_sum, correct, n = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(3))
    with eval_mode(model):
        for i, (images, labels) in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            correct += (logits.argmax(dim=1) == labels).sum()
            n += labels.numel()
    loss_sum, correct, n = (accelerator.reduce(t, "sum").item() for t in (loss_sum, correct, n))
    return {"val_accuracy": correct / max(n, 1), "val_loss": loss_sum / max(n, 1), "val_images": int(n)}
