"""Which level's prior limits the samples: FID with the levels above a point taken from real images.

    python benchmarks/level_attribution.py RUN_DIR --num 2000 --out DIR [--batch 250] [--seed 0] \
        [--set evaluate.inception_weights=PATH ...]

For a run of L levels, row ``k`` (0..L) keeps the real codes of the first ``--num`` training
images for the ``k`` levels nearest the top and draws the levels below them from the priors, each
given the (real or drawn) levels above it and the image's real label:

- row 0 is plain sampling (every level drawn, the labels still the training images');
- row L is the VQ-VAE's reconstruction of those training images (nothing drawn);
- a large step between rows ``k`` and ``k + 1`` says the prior of level ``k`` costs that much FID.

Every row is scored by :mod:`vqgen.scoring` against the run's reference (its ``evaluate``
settings with the ``--set`` overrides): FID, KID, precision, recall. The real codes come from
training images, not the reference's test images, so a perfect prior of the upper levels would
reach the row's figure without having seen the reference.

Written to ``--out``: ``levels.csv`` and ``levels.md``, one row per split point.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from vqgen.config import load_config
from vqgen.data.datasets import build_dataset
from vqgen.generate import VQGen
from vqgen.scoring import array_images, features_of, make_extractor, reference_features, sample_metrics
from vqgen.stages.evaluate import stats_cache_dir

COLUMNS = ("real_levels", "drawn_levels", "fid", "kid_mean", "kid_std", "precision", "recall", "num_samples",
           "seconds")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num", type=int, required=True, help="training images (and samples) per row")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=250, help="images per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the run's config (its evaluate settings: weights, reference, counts)")
    return parser.parse_args(argv)


def training_batches(cfg, num: int, batch: int):
    """``(images float [B, C, S, S] in [-1, 1], labels [B])`` of the first ``num`` training images."""
    dataset = build_dataset(cfg.data, "train")
    if num > len(dataset):
        raise SystemExit(f"--num {num}: the training split has only {len(dataset)} images")
    for start in range(0, num, batch):
        items = [dataset[i] for i in range(start, min(start + batch, num))]
        yield torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def images_with_real_levels(gen: VQGen, images: torch.Tensor, labels: torch.Tensor, real: int,
                            generator: torch.Generator) -> torch.Tensor:
    """uint8 images whose top ``real`` levels are the codes of ``images`` and whose others are drawn
    (at the sampler's defaults: temperature 1, no truncation) for ``labels``."""
    plan = gen.plan(len(images), batch_size=len(images))
    above = gen.encode(images)[:real]
    return gen.decode(*gen.draw_codes(plan, labels if gen.num_classes else None, len(images), generator,
                                      above=above))


def measure(args: argparse.Namespace) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.run_dir / "config.toml", args.overrides)
    gen = VQGen.from_pretrained(args.run_dir, device=device)
    extractor = make_extractor(cfg.evaluate, device)
    reference = reference_features(cfg.evaluate, cfg.data, stats_cache_dir(cfg.evaluate, Path(cfg.run.out_dir)),
                                   extractor)
    names = gen.vqvae.config.level_names
    rows = []
    for real in range(len(names) + 1):
        start = time.perf_counter()
        generator = torch.Generator(device).manual_seed(args.seed)
        parts = [images_with_real_levels(gen, images.to(device), labels, real, generator)
                 for images, labels in training_batches(cfg, args.num, args.batch)]
        images = torch.cat(parts).numpy()
        fake = features_of(array_images(images, None), len(images), extractor, cfg.evaluate.batch_size)
        metrics = sample_metrics(cfg.evaluate, reference, fake)
        rows.append({"real_levels": "+".join(names[:real]) or "none", "drawn_levels": "+".join(names[real:]) or "none",
                     **metrics, "num_samples": len(images), "seconds": round(time.perf_counter() - start, 1)})
        print(", ".join(f"{k} {_text(rows[-1].get(k))}" for k in COLUMNS))
    return rows


def _text(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "levels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_text(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    (out / "levels.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    write_results(measure(args), args.out)
    print(f"written to {args.out}: levels.csv, levels.md")


if __name__ == "__main__":
    main()
