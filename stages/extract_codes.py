"""Stage extract-codes: encode every image once with the exported VQ-VAE into LMDB code stores.

Writes ``codes/codes.lmdb`` (training split), ``codes/eval.lmdb`` (evaluation split, if configured)
and ``codes/manifest.json`` last. Each process encodes its own shard (no padding, so no image is
written twice); with ``codes.hflip`` the training store also holds every image flipped
(records ``N`` to ``2N - 1``), each likewise once. An interrupted extraction resumes by skipping the records already written, and a
store whose metadata is not marked complete is never read as finished. A store's metadata names
the VQ-VAE export and the data config its codes came from: a store of another model or other data
is never resumed, and a complete one of the same is left untouched (not even reopened for writing,
so its bytes, and with them the priors that read it, stay current).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vqgen.config import CodesStageConfig
from vqgen.configtools import split_by_role
from vqgen.data import CodeLevel, CodeStoreWriter, inspect_store, make_meta, read_store_meta, store_checksum
from vqgen.data.datasets import DataConfig, WithFlippedCopies, build_dataset, skipped_files_report
from vqgen.distributed import shard_indices
from vqgen.stage import Stage, StageResult, folder_index_dir, check_data
from vqgen.models.export import load_model
from vqgen.utils import sha256_json

DIR = "codes"


SAME_SOURCE = ("source_checksum", "data_sha256", "levels", "count", "num_classes")
"""Metadata that must match for a store's records to be this extraction's."""


def store_meta(model, data: DataConfig, split: str, num_classes: int, checksum: str, count: int) -> dict:
    levels = [CodeLevel(level.name, tuple(shape), level.num_codes)
              for level, shape in zip(model.config.hierarchy, model.latent_shapes(data.image_size))]
    meta = make_meta(levels, num_classes=num_classes, source_checksum=checksum, count=count)
    meta["data_sha256"] = sha256_json({"data": split_by_role(data)[0], "split": split})
    return meta


def _same_source(existing: dict | None, meta: dict) -> bool:
    return existing is not None and all(existing.get(k) == meta[k] for k in SAME_SOURCE)


def read_batches(dataset, todo: list[int], cfg: CodesStageConfig):
    """``(indices, images [B, C, H, W], labels)`` for the items ``todo`` in order, batch by batch; the
    images are read by ``cfg.num_workers`` worker processes (0: here) while the model encodes."""
    batches = [todo[first : first + cfg.batch_size] for first in range(0, len(todo), cfg.batch_size)]
    if cfg.num_workers == 0:
        loaded = (torch.utils.data.default_collate([dataset[i] for i in indices]) for indices in batches)
    else:
        loaded = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers)
    for indices, (images, labels) in zip(batches, loaded):
        yield indices, images, [int(label) for label in labels]


@torch.no_grad()
def extract_split(model, dataset, path: Path, meta: dict, cfg: CodesStageConfig, accelerator: Accelerator) -> tuple[int, float]:
    """Encode ``dataset`` into the store at ``path``; return this process's image count and rate."""
    existing = read_store_meta(path)
    accelerator.wait_for_everyone()  # every process has read the metadata before anyone changes it
    if _same_source(existing, meta) and existing["complete"]:
        return 0, 0.0
    if existing is not None and not _same_source(existing, meta):
        # Codes of another VQ-VAE or another dataset: they cannot be resumed, start over.
        if accelerator.is_main_process:
            shutil.rmtree(path)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with CodeStoreWriter(path, commit_every=cfg.commit_every) as writer:
            writer.write_meta(meta, complete=False)
    accelerator.wait_for_everyone()
    start, done = time.perf_counter(), 0
    with CodeStoreWriter(path, commit_every=cfg.commit_every) as writer:
        written = writer.existing_indices()
        todo = [i for i in shard_indices(len(dataset), accelerator.process_index, accelerator.num_processes) if i not in written]
        bar = tqdm(total=len(todo), desc=f"encode {path.name}", disable=not accelerator.is_main_process)
        for indices, images, labels in read_batches(dataset, todo, cfg):
            with accelerator.autocast():
                codes = model.encode(images.to(accelerator.device))
            writer.put_batch(indices, [level_codes.cpu() for level_codes in codes], labels)
            done += len(indices)
            bar.update(len(indices))
        bar.close()
    rate = done / max(time.perf_counter() - start, 1e-9)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with CodeStoreWriter(path, commit_every=cfg.commit_every) as writer:
            writer.finalize(len(dataset))
    accelerator.wait_for_everyone()
    return done, rate


def run(sections: dict, run_dir: Path, accelerator: Accelerator) -> StageResult:
    cfg: CodesStageConfig = sections["codes"]
    data: DataConfig = sections["data"]
    stage_dir = run_dir / DIR
    stage_dir.mkdir(parents=True, exist_ok=True)
    model, vq_cfg, checksum = load_model(run_dir / "vqvae", device=accelerator.device)
    splits = [("train", "codes.lmdb")] + ([("eval", "eval.lmdb")] if cfg.include_eval else [])
    metrics, outputs = {}, {}
    for split, name in splits:
        dataset = build_dataset(data, split, index_dir=folder_index_dir(run_dir))
        skipped, lines = skipped_files_report(**{split: dataset})
        for line in lines:
            accelerator.print(f"[vqgen] {line}")
        metrics.update(skipped)
        if split == "train" and cfg.hflip:
            dataset = WithFlippedCopies(dataset)
        meta = store_meta(model, data, split, dataset.num_classes, checksum, len(dataset))
        done, rate = extract_split(model, dataset, stage_dir / name, meta, cfg, accelerator)
        metrics[f"{split}_images_per_sec"] = accelerator.reduce(torch.tensor(rate, device=accelerator.device), "sum").item()
        metrics[f"{split}_images_per_process"] = accelerator.gather(torch.tensor([done], device=accelerator.device)).tolist()
        outputs[split] = {"store": name, "count": len(dataset)}
    content = {}
    if accelerator.is_main_process:
        for split, name in splits:
            info = inspect_store(stage_dir / name)
            metrics[f"{split}_usage"] = {lvl["name"]: lvl["usage_fraction"] for lvl in info["levels"]}
            content[f"{name}/data.mdb"] = store_checksum(stage_dir / name)
    outputs["vqvae_sha256"] = checksum
    return StageResult(outputs, metrics, files=tuple(content), content=content)


STAGES = (Stage("extract-codes", DIR, ("run", "data", "codes"), ("train-vqvae",), run, preflight=check_data),)
