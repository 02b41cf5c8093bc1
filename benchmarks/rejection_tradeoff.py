"""The trade-off of classifier-based rejection sampling (Razavi et al. 2019, section 4): sample
quality and diversity against the acceptance rate.

    python benchmarks/rejection_tradeoff.py RUN_DIR --rates 1.0 0.5 0.25 0.1 --num 10000 --out DIR \
        [--batch 32] [--seed 0] [--set evaluate.inception_weights=PATH ...]

``RUN_DIR`` is a finished run with a classifier (``classifier.enabled = true``). For each rate ``f``
the generator draws ``--num`` images keeping the best ``f`` of each batch's candidates
(``keep_fraction``; 1.0 is plain sampling), and :mod:`vqgen.scoring` scores them against the run's
reference (its ``evaluate`` settings, with the ``--set`` overrides): FID, KID, precision, recall,
and the Inception Score where the weights hold the classifier layer. Every rate uses the same seed,
so its round-0 candidates are the plain samples.

Written to ``--out``: ``tradeoff.csv`` and ``tradeoff.md`` (one row per rate: the measured
acceptance rate, the kept images' mean classifier probability of their class, the metrics and the
seconds taken) and ``tradeoff.png`` (each metric against the acceptance rate, in percent).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from vqgen.config import load_config
from vqgen.generate import VQGen
from vqgen.pictures import draw_curves, save_png
from vqgen.rejection import acceptance_summary
from vqgen.scoring import array_images, features_of, make_extractor, reference_features, sample_metrics
from vqgen.stages.evaluate import stats_cache_dir

COLUMNS = ("keep_fraction", "acceptance_rate", "mean_intended_probability", "fid", "kid_mean", "kid_std",
           "precision", "recall", "isc_mean", "isc_std", "num_samples", "seconds")
PANELS = {"FID": ("fid",), "KID": ("kid_mean",), "precision / recall": ("precision", "recall"),
          "Inception Score": ("isc_mean",), "classifier probability of the class": ("mean_intended_probability",)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1],
                        help="acceptance rates (keep_fraction) to sample at; 1.0 is plain sampling")
    parser.add_argument("--num", type=int, required=True, help="images per rate")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the run's config (its evaluate settings: weights, reference, counts)")
    args = parser.parse_args(argv)
    if any(not 0 < rate <= 1 for rate in args.rates):
        parser.error("--rates: each must be in (0, 1]")
    return args


def sample_at(gen: VQGen, rate: float, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``--num`` images kept at ``rate``, with their acceptance figures."""
    rejection = {} if rate >= 1 else {"keep_fraction": rate, "max_draw_factor": max(20.0, math.ceil(1 / rate))}
    plan = gen.plan(args.num, seed=args.seed, batch_size=args.batch, **rejection)
    batches = [gen.draw(plan, b) for b in range(plan.num_batches)]
    images = torch.cat([b.samples.images for b in batches])
    labels = torch.cat([b.samples.labels for b in batches])
    scores = torch.cat([b.scores if b.scores is not None else gen.score(b.samples.images, b.samples.labels)
                        for b in batches])
    figures = acceptance_summary(len(images), sum(b.drawn for b in batches), float(scores.double().sum()))
    return images, labels, figures


def measure(args: argparse.Namespace) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.run_dir / "config.toml", args.overrides)
    gen = VQGen.from_pretrained(args.run_dir, device=device)
    if gen.classifier is None:
        raise SystemExit(f"{args.run_dir} has no classifier/: run the pipeline with classifier.enabled = true")
    extractor = make_extractor(cfg.evaluate, device)
    reference = reference_features(cfg.evaluate, cfg.data, stats_cache_dir(cfg.evaluate, Path(cfg.run.out_dir)),
                                   extractor)
    rows = []
    for rate in sorted(set(args.rates), reverse=True):
        start = time.perf_counter()
        images, labels, figures = sample_at(gen, rate, args)
        fake = features_of(array_images(images.numpy(), labels.numpy()), len(images), extractor,
                           cfg.evaluate.batch_size)
        metrics = sample_metrics(cfg.evaluate, reference, fake)
        rows.append({"keep_fraction": rate, **figures, **metrics, "num_samples": len(images),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"keep_fraction {rate}: " + ", ".join(f"{k} {_text(rows[-1].get(k))}" for k in COLUMNS[1:]))
    return rows


def _text(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tradeoff.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_text(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    (out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    # Percent on the axis, ascending: the curves run from the strictest rule to plain sampling.
    ordered = sorted(rows, key=lambda row: row["acceptance_rate"])
    panels = {title: {key: [(round(100 * row["acceptance_rate"], 2), float(row[key])) for row in ordered
                            if isinstance(row.get(key), (int, float))] for key in keys}
              for title, keys in PANELS.items()}
    save_png(draw_curves(panels, size=(640, 220), x_label="accepted %"), out / "tradeoff.png")


def main(argv=None) -> None:
    args = parse_args(argv)
    write_results(measure(args), args.out)
    print(f"written to {args.out}: tradeoff.csv, tradeoff.md, tradeoff.png")


if __name__ == "__main__":
    main()
