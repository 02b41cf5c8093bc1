"""Sampling throughput: cached incremental generation against full recomputation.

    python benchmarks/sampling_speed.py --level bottom --shape 8 8 --batch 32            # CIFAR-10 bottom, CPU
    python benchmarks/sampling_speed.py --level top --shape 4 4 --batch 32
    python benchmarks/sampling_speed.py --level bottom --shape 64 64 --channels 512 --batch 64 \
        --cond-blocks 20 --skip-full --cuda-graphs                                        # 256x256 bottom, GPU

Random-weight priors of the given size (speed does not depend on the weights; that both paths give
the same logits and codes is tested in tests/test_sampling.py). The full path runs the whole prior
once per position; it is timed on ``--full-positions`` positions (its cost per position is
constant) and extrapolated, so the comparison stays affordable at large sizes.

``--precision bf16`` times the cached path on a bf16 copy of the prior instead and measures how
far it strays from fp32: both step through the fp32 draws in lockstep (teacher-forced), and the
result gives the mean KL divergence of the bf16 step distribution from the fp32 one, the largest
log-probability difference, and the fraction of draws (same random numbers, same prefix) that
pick a different code.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout
from vqgen.sampling import IncrementalPrior, SamplerConfig, choose_codes, prior_for_sampling, sample


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


@torch.no_grad()
def divergence(prior, condition, precision: str, args) -> dict:
    """How the ``precision`` copy's steps differ from fp32's along the fp32 draws (see the docstring)."""
    exact = IncrementalPrior(prior, args.batch, condition=condition)
    low = IncrementalPrior(prior_for_sampling(prior, precision), args.batch, condition=condition)
    uniforms = torch.rand(prior.layout.shape[0] * prior.layout.shape[1], args.batch,
                          generator=torch.Generator().manual_seed(2)).to(args.device)
    kl, worst, differ = 0.0, 0.0, 0
    for uniform in uniforms:
        ref, other = exact.step_logits().log_softmax(-1), low.step_logits().float().log_softmax(-1)
        kl += (ref.exp() * (ref - other)).sum(-1).mean().item()
        worst = max(worst, (ref - other).abs().max().item())
        codes = choose_codes(ref, SamplerConfig(), uniform)
        differ += int((choose_codes(other, SamplerConfig(), uniform) != codes).sum())
        exact.commit(codes)
        low.commit(codes)
    return {"mean_kl_nats": kl / len(uniforms), "max_abs_logprob_diff": worst,
            "draws_differing": differ / uniforms.numel()}


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
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the cached path's arithmetic (SamplerConfig.precision); bf16 also reports its divergence")
    args = p.parse_args()

    prior, condition = build(args)
    positions = args.shape[0] * args.shape[1]
    gen = lambda: torch.Generator(device=args.device).manual_seed(1)  # noqa: E731
    config = SamplerConfig(precision=args.precision)
    cached = lambda: sample(prior, args.batch, condition=condition, generator=gen(), config=config)  # noqa: E731
    cached()  # warm-up
    cached_s, codes = timed(cached, args.device)
    result = {"level": args.level, "shape": args.shape, "batch": args.batch, "channels": args.channels,
              "layers": args.layers, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "precision": args.precision, "cached_seconds": cached_s,
              "cached_samples_per_sec": args.batch / cached_s}
    if args.precision != "fp32":
        result.update(divergence(prior, condition, args.precision, args))
    if args.cuda_graphs:
        graphed = lambda: sample(prior, args.batch, condition=condition, generator=gen(), config=config,  # noqa: E731
                                 cuda_graphs=True)
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
