"""Sampling throughput: cached incremental generation against full recomputation.

    python benchmarks/sampling_speed.py --level bottom --shape 8 8 --batch 32            # CIFAR-10 bottom, CPU
    python benchmarks/sampling_speed.py --level top --shape 4 4 --batch 32
    python benchmarks/sampling_speed.py --level bottom --shape 64 64 --channels 512 --batch 64 \
        --cond-blocks 20 --skip-full --cuda-graphs                                        # 256x256 bottom, GPU

Random-weight priors of the given size (speed does not depend on the weights; that both paths give
the same logits and codes is tested in tests/test_sampling.py). The full path runs the whole prior
once per position; it is timed on ``--full-positions`` positions (its cost per position is
constant) and extrapolated, so the comparison stays affordable at large sizes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout
from vqgen.sampling import SamplerConfig, choose_codes, sample


def build(args) -> tuple[GatedPixelCNN, torch.Tensor | None]:
    h, w = args.shape
    bottom = args.level == "bottom"
    cfg = PriorConfig(channels=args.channels, num_layers=args.layers, kernel_size=args.kernel,
                      attention_every=0 if bottom else args.attention_every, num_heads=args.heads, dropout=0.0,
                      condition_channels=args.channels, condition_res_blocks=args.cond_blocks if bottom else 0)
    layout = PriorLayout(num_codes=args.codes, shape=(h, w), condition_num_codes=args.codes if bottom else 0,
                         condition_shape=(h // 2, w // 2) if bottom else ())
    torch.manual_seed(0)
    prior = GatedPixelCNN(cfg, layout).to(args.device).eval()
    condition = torch.randint(args.codes, (args.batch, h // 2, w // 2), device=args.device) if bottom else None
    return prior, condition


def timed(fn, device: str) -> tuple[float, object]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


@torch.no_grad()
def full_seconds_per_position(prior, condition, args) -> float:
    """Time of the reference path per position: one full forward pass, ``--full-positions`` times."""
    codes = torch.zeros(args.batch, *args.shape, dtype=torch.long, device=args.device)
    uniforms = torch.rand(args.full_positions, args.batch, device=args.device)

    def run():
        for p in range(args.full_positions):
            logits = prior(codes, condition=condition)[:, :, 0, 0]
            codes[:, 0, 0] = choose_codes(logits, SamplerConfig(), uniforms[p])

    prior(codes, condition=condition)  # warm-up
    seconds, _ = timed(run, args.device)
    return seconds / args.full_positions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", choices=["top", "bottom"], default="bottom")
    p.add_argument("--shape", type=int, nargs=2, default=[8, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--codes", type=int, default=512)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--attention-every", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--cond-blocks", type=int, default=4)
    p.add_argument("--full-positions", type=int, default=8)
    p.add_argument("--skip-full", action="store_true", help="time the cached path only")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time the cached path with each step replayed as a CUDA graph (GPU only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    prior, condition = build(args)
    positions = args.shape[0] * args.shape[1]
    gen = lambda: torch.Generator(device=args.device).manual_seed(1)  # noqa: E731
    sample(prior, args.batch, condition=condition, generator=gen())  # warm-up
    cached_s, codes = timed(lambda: sample(prior, args.batch, condition=condition, generator=gen()), args.device)
    result = {"level": args.level, "shape": args.shape, "batch": args.batch, "channels": args.channels,
              "layers": args.layers, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "cached_seconds": cached_s,
              "cached_samples_per_sec": args.batch / cached_s}
    if args.cuda_graphs:
        graphed = lambda: sample(prior, args.batch, condition=condition, generator=gen(), cuda_graphs=True)  # noqa: E731
        graphed()  # warm-up (the capture itself is inside each call and is timed, as a user pays it)
        graphed_s, graphed_codes = timed(graphed, args.device)
        result.update(graphed_seconds=graphed_s, graphed_samples_per_sec=args.batch / graphed_s,
                      graphed_codes_equal=bool(torch.equal(graphed_codes, codes)))
    if not args.skip_full:
        full_s = full_seconds_per_position(prior, condition, args) * positions
        result.update(full_seconds_estimated=full_s, full_samples_per_sec=args.batch / full_s, speedup=full_s / cached_s)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
