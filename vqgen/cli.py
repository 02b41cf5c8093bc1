"""The ``vqgen`` command.

    vqgen run pipelines/demo.toml [--set section.key=value ...] [--from STAGE]
    vqgen stage train-prior-top pipelines/demo.toml [--set ...]   # one stage (or: train-prior --level top)
    vqgen config pipelines/demo.toml [--set ...]        # print the resolved config
    vqgen codes inspect runs/demo                         # counts, shapes, code usage
    vqgen fid pipelines/cifar10.toml samples.npz [--set ...]  # FID of any samples file

Multi-GPU / multi-node: the same commands under ``accelerate launch -m vqgen.cli ...``.
"""

from __future__ import annotations

import argparse
import errno
import sys

from vqgen.errors import VQGenError

PRIOR_SHORTHAND = "train-prior"  # `stage train-prior --level top` names `train-prior-top`


def _parser() -> argparse.ArgumentParser:
    from vqgen.pipeline import stage_names  # the runner's own table: one name per stage


    parser = argparse.ArgumentParser(prog="vqgen", description="VQ-VAE-2 + gated PixelCNN priors, stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="pipeline TOML, e.g. pipelines/demo.toml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set vqvae.train.lr=3e-4")
        return p

    run = with_config(sub.add_parser("run", help="run every stage in order, skipping finished ones"))
    run.add_argument("--from", dest="from_stage", help="start at this stage (earlier ones must have finished)")
    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("stage", choices=[*stage_names(), PRIOR_SHORTHAND])
    with_config(stage)
    stage.add_argument("--level", choices=("top", "bottom"),
                       help=f"with {PRIOR_SHORTHAND}: the prior's level (the same as {PRIOR_SHORTHAND}-LEVEL)")
    with_config(sub.add_parser("config", help="print the resolved config"))
    fid = with_config(sub.add_parser("fid", help="FID of a samples file against the config's evaluation images"))
    fid.add_argument("samples", help="a .npz with uint8 images [N, C, H, W], e.g. a run's samples/samples.npz")
    codes = sub.add_parser("codes", help="code store tools")
    codes_sub = codes.add_subparsers(dest="codes_command", required=True)
    inspect = codes_sub.add_parser("inspect", help="counts, shapes and code usage of a run's code stores")
    inspect.add_argument("run_dir")
    return parser


def _inspect(run_dir: str) -> None:
    from pathlib import Path

    from vqgen.data.code_inspection import format_inspection, inspect_store

    stores = sorted(Path(run_dir, "codes").glob("*.lmdb"))
    if not stores:
        raise VQGenError(f"no code stores in {Path(run_dir, 'codes')}: run extract-codes first")
    for store in stores:
        print(f"== {store}")
        print(format_inspection(inspect_store(store)))


def _fid(cfg, samples: str) -> None:
    import json
    from pathlib import Path

    import torch

    from vqgen.scoring import score_samples_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = score_samples_file(cfg.evaluate, cfg.data, Path(samples), Path(cfg.run.out_dir), device)
    print(json.dumps(metrics))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "codes":
            _inspect(args.run_dir)
            return 0
        from vqgen.config import config_to_toml, load_config
        from vqgen.pipeline import run_pipeline, run_single_stage

        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(config_to_toml(cfg), end="")
        elif args.command == "fid":
            _fid(cfg, args.samples)
        elif args.command == "run":
            run_pipeline(cfg, from_stage=args.from_stage)
        else:
            name = args.stage
            if name == PRIOR_SHORTHAND:
                if args.level is None:
                    raise VQGenError(f"{PRIOR_SHORTHAND} needs --level top or --level bottom")
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
