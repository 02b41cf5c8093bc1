"""Training-loader throughput: an image folder against the same images packed as tar shards.

    OMP_NUM_THREADS=1 python benchmarks/shard_reader.py [--images 20000] [--workers 2] [--batch 64]
        [--workdir /tmp/vqgen-shard-bench] [--json results.json]

Makes ``--images`` 64x64 RGB PNGs of procedural shapes in class subfolders under ``--workdir``
(a temporary folder when not given; kept and reused when given), packs them with ``vqgen data
pack``, then for each reader (``data.kind = "folder"`` and ``"shards"``) builds the dataset and the
training loader exactly as ``vqgen.train.fit`` does (``_train_loader`` + ``accelerator.prepare``,
``--workers`` persistent workers) and times one epoch: the dataset's build, the time to the first
batch (worker start-up and the first reads) and images per second over the epoch. The folder's
file index is built before timing (the stages' warm case). Files are in the page cache after
being written: on cold or network storage both readers pay more per open, the folder far more.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from accelerate import Accelerator
from PIL import Image

from vqgen.data.datasets import DataConfig, build_dataset
from vqgen.data.procedural import SHAPE_NAMES, ProceduralShapes
from vqgen.data.shards import pack
from vqgen.train import TrainConfig, _train_loader, make_accelerator

SIZE = 64


def make_folder(root: Path, count: int) -> None:
    """``count`` procedural PNGs, ``root/<shape>/NNNNNN.png``; skipped when ``root`` already exists."""
    if root.exists():
        return
    shapes = ProceduralShapes(count, SIZE, seed=0)
    tmp = root.with_name(root.name + ".partial")  # a run cut short does not leave a short folder
    for i in range(count):
        image, label = shapes.load(i)
        path = tmp / SHAPE_NAMES[label] / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    tmp.rename(root)


def time_epoch(cfg: DataConfig, args: argparse.Namespace, workdir: Path, accelerator: Accelerator) -> dict[str, float]:
    """Build time, time to the first batch and images/s of one epoch of the training loader."""
    index_dir = workdir / "folder-index"
    build_dataset(cfg, "train", index_dir=index_dir)  # the folder's header checks, indexed: not timed
    start = time.perf_counter()
    dataset = build_dataset(cfg, "train", index_dir=index_dir)
    built = time.perf_counter() - start
    train = TrainConfig(batch_size=args.batch, num_workers=args.workers)
    loader = accelerator.prepare(_train_loader(dataset, train, accelerator))
    loader.set_epoch(0)
    start = time.perf_counter()
    first, images = None, 0
    for batch_images, _ in loader:
        images += len(batch_images)
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"items": len(dataset), "build_s": built, "first_batch_s": first or 0.0,
            "epoch_s": seconds, "images_per_sec": images / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, help="keep the images and shards here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vqgen-shard-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        folder, shards = workdir / f"folder-{args.images}", workdir / f"shards-{args.images}"
        make_folder(folder, args.images)
        if not (shards / "index.json").is_file():
            pack(folder, shards, shard_size=args.shard_size, progress=False)
        accelerator = make_accelerator(workdir / "stage", tracker="none", seed=0)
        results = {}
        for kind, root in (("folder", folder), ("shards", shards)):
            cfg = DataConfig(kind=kind, root=str(root), image_size=SIZE)
            results[kind] = time_epoch(cfg, args, workdir, accelerator)
    print(f"one training epoch, {args.images} images of {SIZE}x{SIZE} (train split), batch {args.batch}, "
          f"{args.workers} workers")
    print(f"{'reader':8s} {'items':>7s} {'build s':>8s} {'first batch s':>14s} {'epoch s':>8s} {'images/s':>9s}")
    for kind, r in results.items():
        print(f"{kind:8s} {r['items']:7d} {r['build_s']:8.2f} {r['first_batch_s']:14.2f} {r['epoch_s']:8.2f} "
              f"{r['images_per_sec']:9.0f}")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "batch": args.batch, "workers": args.workers,
                                         "readers": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
