"""The ``vqgen`` command.

    vqgen run pipelines/demo.toml [--set section.key=value ...] [--from STAGE]
    vqgen stage train-prior-top pipelines/demo.toml [--set ...]   # one stage (or: train-prior --level top)
    vqgen config pipelines/demo.toml [--set ...]        # print the resolved config
    vqgen codes inspect runs/demo                         # counts, shapes, code usage
    vqgen sample runs/demo|BUNDLE|HUB_ID --num 1000 --out generated/ [--class 3,7] [--seed 0]  # images from a trained model
    vqgen sample runs/demo --num 1000 --out kept/ --threshold 0.9  # rejection sampling (or --keep-fraction 0.5)
    vqgen export runs/demo bundles/demo                   # the trained models as one Hub-style folder
    vqgen score samples.npz|DIR --config pipelines/cifar10.toml [--set ...]   # metrics of any images
    vqgen score samples.npz|DIR --against real_dir|other.npz|stats.npz [--config ...]
    vqgen fid pipelines/cifar10.toml samples.npz [--set ...]  # the same as score, config first
    vqgen data pack SOURCE OUT [--kind npz] [--shard-size 1000]  # a dataset as tar shards (data.kind = "shards")
    vqgen data index DIR                                  # index WebDataset tar shards made elsewhere
    vqgen data verify OUT                                 # every shard's size and sha256 against index.json

Multi-GPU / multi-node: the same commands under ``accelerate launch -m vqgen.cli ...``.
"""

from __future__ import annotations

import argparse
import errno
import sys

from vqgen.errors import ConfigError, VQGenError
from vqgen.utils import keep_freed_memory

PRIOR_SHORTHAND = "train-prior"  # `stage train-prior --level top` names `train-prior-top`


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vqgen")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    from vqgen.pipeline import stage_names  # the runner's own table: one name per stage


    parser = argparse.ArgumentParser(prog="vqgen", description="VQ-VAE-2 + gated PixelCNN priors, stage by stage.")
    parser.add_argument("--version", action="version", version=f"vqgen {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="pipeline TOML, or the name of a shipped pipeline (demo, fashion-mnist, cifar10, ...)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set vqvae.train.lr=3e-4")
        return p

    run = with_config(sub.add_parser("run", help="run every stage in order, skipping finished ones"))
    run.add_argument("--from", dest="from_stage", help="start at this stage (earlier ones must have finished)")
    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("stage", help=f"one of {', '.join(stage_names())} (one train-prior-LEVEL per level of "
                                      f"vqvae.model), or {PRIOR_SHORTHAND} with --level")
    with_config(stage)
    stage.add_argument("--level", help=f"with {PRIOR_SHORTHAND}: the prior's level, top, bottom or another of "
                                       f"vqvae.model.levels (the same as {PRIOR_SHORTHAND}-LEVEL)")
    with_config(sub.add_parser("config", help="print the resolved config"))
    score = sub.add_parser("score", help="FID, KID, IS, precision/recall of any images against a reference")
    score.add_argument("samples", help="a .npz with uint8 images [N, C, H, W] (e.g. a run's samples/samples.npz) "
                                       "or a folder of images")
    score.add_argument("--config", help="pipeline TOML: its [evaluate] settings, and its reference unless --against")
    score.add_argument("--against", help="reference images (a folder or a samples .npz) or a statistics .npz "
                                         "(pytorch-fid's mu, sigma) instead of the config's reference")
    score.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set evaluate.resize=tf1")
    fid = with_config(sub.add_parser("fid", help="the same as score, with the config first"))
    fid.add_argument("samples", help="a .npz with uint8 images [N, C, H, W], or a folder of images")
    codes = sub.add_parser("codes", help="code store tools")
    codes_sub = codes.add_subparsers(dest="codes_command", required=True)
    inspect = codes_sub.add_parser("inspect", help="counts, shapes and code usage of a run's code stores")
    inspect.add_argument("run_dir")
    _add_generation_commands(sub)
    _add_data_commands(sub)
    return parser


def _add_generation_commands(sub) -> None:
    gen = sub.add_parser("sample", help="generate images from a trained model into a new folder (resumable)")
    gen.add_argument("model", help="a run folder, a bundle from `vqgen export`, or a Hugging Face Hub repo id")
    # Under torchrun, spell it -n or --num-samples: torchrun's own parser takes --num for an
    # ambiguous abbreviation of its --numa-binding and stops before vqgen starts.
    gen.add_argument("--num", "-n", "--num-samples", dest="num", type=int, required=True, help="number of images")
    labels = gen.add_mutually_exclusive_group()
    labels.add_argument("--class", dest="classes", help="class indices, comma-separated: image i gets the "
                                                        "(i mod count)-th (default: classes drawn uniformly)")
    labels.add_argument("--class-names", help="the same by class name, e.g. circle,ring")
    gen.add_argument("--temperature", type=float, default=1.0, help="both levels (0: the most likely code)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=0, help="batch b draws from seed * 1000003 + b, as the sample stage")
    gen.add_argument("--batch", type=int, default=32, help="images per batch (part of what fixes the images)")
    gen.add_argument("--out", required=True, help="a new folder (a rerun into it resumes)")
    gen.add_argument("--format", default="png,npz", help="png (one file per image), npz (samples.npz), or both")
    gen.add_argument("--bf16", action="store_true", help="decode under bf16 autocast where supported")
    gen.add_argument("--prior-precision", choices=["fp32", "bf16"], default="fp32",
                     help="the priors' arithmetic while sampling (bf16: about half the time of a step on CPUs "
                          "with bf16 units, not bit-exact; see NOTES.md)")
    rejection = gen.add_mutually_exclusive_group()
    rejection.add_argument("--threshold", type=float, help="rejection sampling with the model's classifier: keep "
                                                           "an image when its class's probability is >= this")
    rejection.add_argument("--keep-fraction", type=float, help="rejection sampling: keep the best fraction of "
                                                               "each batch's candidates, class by class")
    gen.add_argument("--max-draw-factor", type=float, help="rejection sampling: give up when a batch would draw "
                                                           "more than this many times its images (default 20)")
    export = sub.add_parser("export", help="write a run's models as one bundle folder (Hub layout, model card)")
    export.add_argument("run_dir")
    export.add_argument("out_dir")


def _add_data_commands(sub) -> None:
    from vqgen.data.shards import DEFAULT_SHARD_SIZE, PACK_KINDS

    data = sub.add_parser("data", help="image data tools: tar shards for data.kind = \"shards\"")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pack = data_sub.add_parser("pack", help="write both splits of a dataset as WebDataset-style tar shards")
    pack.add_argument("source", help="an image folder, an .npz file, or a torchvision root (with --kind)")
    pack.add_argument("out", help="a new or empty folder; an earlier pack of the same source there is rewritten")
    pack.add_argument("--kind", choices=PACK_KINDS, help="the source's data.kind (default: npz for an .npz "
                                                         "file, folder for a folder)")
    pack.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    pack.add_argument("--on-corrupt", choices=("error", "skip"), default="error",
                      help="a corrupt image file: stop naming it, or leave it out and count it")
    index = data_sub.add_parser("index", help="write index.json for a folder of WebDataset tar shards made "
                                              "elsewhere (split from the names: train*, eval*/test*/val*)")
    index.add_argument("folder")
    verify = data_sub.add_parser("verify", help="check every shard of a pack against index.json (size, sha256)")
    verify.add_argument("folder")


def _data(args) -> None:
    from pathlib import Path

    from vqgen.data.shards import check_shards, index_webdataset, pack

    if args.data_command == "verify":
        index = check_shards(Path(args.folder), checksums=True)
        count = sum(len(info["shards"]) for info in index["splits"].values())
        print(f"{args.folder}: all {count} shards match {Path(args.folder, 'index.json')}")
        return
    if args.data_command == "pack":
        reports = pack(Path(args.source), Path(args.out), args.kind, args.shard_size, args.on_corrupt)
    else:
        reports = index_webdataset(Path(args.folder))
    parts = []
    for split, r in reports.items():
        shards = "shard" if r.shards == 1 else "shards"
        skipped = f", {r.skipped} corrupt files skipped" if r.skipped else ""
        parts.append(f"{split} {r.images} images in {r.shards} {shards} ({r.bytes:,} bytes{skipped})")
    print(f"{args.out if args.data_command == 'pack' else args.folder}: {'; '.join(parts)}")


def _sample(args) -> None:
    from pathlib import Path

    from vqgen.distributed import process_state
    from vqgen.generate import FORMATS, VQGen, sample_to_folder

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise VQGenError(f"--format: {', '.join(unknown) or 'nothing'} given; choose from {', '.join(FORMATS)}")
    try:
        labels = [int(c) for c in args.classes.split(",")] if args.classes else None
    except ValueError:
        raise VQGenError(f"--class: {args.classes!r} is not a comma-separated list of class indices "
                         "(use --class-names for names)") from None
    labels = [n.strip() for n in args.class_names.split(",")] if args.class_names else labels
    gen = VQGen.from_pretrained(args.model, device=process_state().device, bf16=args.bf16)
    try:
        plan = gen.plan(args.num, labels=labels, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        precision=args.prior_precision, seed=args.seed, batch_size=args.batch, threshold=args.threshold,
                        keep_fraction=args.keep_fraction, max_draw_factor=args.max_draw_factor)
    except ConfigError as err:  # name the flag, not the API's argument
        flags = {"rejection": "--threshold" if args.threshold is not None else "--keep-fraction",
                 "threshold": "--threshold", "keep_fraction": "--keep-fraction",
                 "max_draw_factor": "--max-draw-factor"}
        if err.key not in flags:
            raise
        raise ConfigError(flags[err.key], str(err).split(": ", 1)[1]) from None
    manifest = sample_to_folder(gen, plan, Path(args.out), formats=formats)
    if process_state().is_main_process:
        kept = manifest.get("rejection", {}).get("acceptance_rate")
        acceptance = f", acceptance rate {kept:.3f}" if kept is not None else ""
        print(f"{args.out}: {manifest['count']} images ({manifest.get('samples_per_sec', '-')} samples/s{acceptance})")


def _export(run_dir: str, out_dir: str) -> None:
    from pathlib import Path

    from vqgen.bundle import export_bundle

    print(f"bundle written to {export_bundle(Path(run_dir), Path(out_dir))}")


def _inspect(run_dir: str) -> None:
    from pathlib import Path

    from vqgen.data.code_inspection import format_inspection, inspect_store

    stores = sorted(Path(run_dir, "codes").glob("*.lmdb"))
    if not stores:
        raise VQGenError(f"no code stores in {Path(run_dir, 'codes')}: run extract-codes first")
    for store in stores:
        print(f"== {store}")
        print(format_inspection(inspect_store(store)))


def _score(cfg, samples: str, against: str | None) -> None:
    import json
    from pathlib import Path

    import torch

    from vqgen.scoring import score_samples_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = score_samples_file(cfg.evaluate, cfg.data, Path(samples), Path(cfg.run.out_dir), device,
                                 against=Path(against) if against else None)
    print(json.dumps(metrics, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keep_freed_memory()
    try:
        if args.command == "codes":
            _inspect(args.run_dir)
            return 0
        if args.command == "sample":
            _sample(args)
            return 0
        if args.command == "export":
            _export(args.run_dir, args.out_dir)
            return 0
        if args.command == "data":
            _data(args)
            return 0
        from vqgen.config import config_to_toml, load_config
        from vqgen.pipeline import run_pipeline, run_single_stage

        if args.command == "score" and args.config is None and args.against is None:
            raise VQGenError("score: give --config (its evaluate.reference) or --against (reference images or statistics)")
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(config_to_toml(cfg), end="")
        elif args.command in ("score", "fid"):
            _score(cfg, args.samples, getattr(args, "against", None))
        elif args.command == "run":
            run_pipeline(cfg, from_stage=args.from_stage)
        else:
            name = args.stage
            if name == PRIOR_SHORTHAND:
                if args.level is None:
                    raise VQGenError(f"{PRIOR_SHORTHAND} needs --level LEVEL (top, bottom, or another level of "
                                     f"vqvae.model: {', '.join(cfg.vqvae.model.level_names)})")
                name = f"{PRIOR_SHORTHAND}-{args.level}"
            elif args.level is not None:
                raise VQGenError(f"--level applies to {PRIOR_SHORTHAND} only")
            run_single_stage(cfg, name)
    except VQGenError as err:
        print(f"vqgen: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # The writes that matter name the file themselves (StorageError); this catches the rest.
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"vqgen: error: {err.strerror} while writing {err.filename or 'a file'}; free space or make "
              "the run folder writable and run again: finished stages are kept, and an interrupted one "
              "continues from its last checkpoint", file=sys.stderr)
        return 2
    finally:
        from vqgen.distributed import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
