"""Training throughput (images/second) of the VQ-VAE-2 and of a prior, on CPU or GPU.

    python benchmarks/train_throughput.py vqvae --size 32 --batch 32                 # public-code size
    python benchmarks/train_throughput.py vqvae --size 256 --batch 32 --precision bf16 --compile
    python benchmarks/train_throughput.py prior-top --shape 32 32 --channels 512 --layers 20 \
        --attention-every 5 --batch 32 --precision bf16

Each step is a full optimizer step (forward, backward, the training stages' AdamW) on random data;
the first ``--warmup`` steps are not timed. The model FLOPs of a prior step are counted as 3x the
forward FLOPs of its convolutions, linear layers and attention products (see ``prior_flops``), for
model-FLOPs use.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout
from vqgen.models.quantize import QuantizerConfig
from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig
from vqgen.train import TrainConfig, build_optimizer


def build(args):
    if args.model == "vqvae":
        cfg = VQVAEConfig(hidden_channels=args.channels, res_channels=args.res_channels, num_res_blocks=args.res_blocks,
                          quantizer=QuantizerConfig(num_codes=args.codes, code_dim=args.code_dim,
                                                    kernel_backend=args.backend))
        model = VQVAE2(cfg)

        def batch():
            return (torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 2 - 1,)

        def loss(model, images):
            return model(images).loss
    else:
        h, w = args.shape
        bottom = args.model == "prior-bottom"
        cfg = PriorConfig(channels=args.channels, num_layers=args.layers, kernel_size=args.kernel,
                          attention_every=0 if bottom else args.attention_every, num_heads=args.heads, dropout=0.1,
                          condition_res_blocks=args.cond_blocks if bottom else 0,
                          condition_channels=args.channels, kernel_backend=args.backend)
        layout = PriorLayout(num_codes=args.codes, shape=(h, w), condition_num_codes=args.codes if bottom else 0,
                             condition_shape=(h // 2, w // 2) if bottom else ())
        model = GatedPixelCNN(cfg, layout)

        def batch():
            codes = torch.randint(args.codes, (args.batch, h, w), device=args.device)
            cond = torch.randint(args.codes, (args.batch, h // 2, w // 2), device=args.device) if bottom else None
            return codes, cond

        def loss(model, codes, cond):
            logits = model(codes, condition=cond)
            return torch.nn.functional.cross_entropy(logits.float(), codes)
    return model, batch, loss


def prior_flops(args) -> float:
    """Forward FLOPs of one batch through the prior, from torch's FLOP counter.

    Counted on a copy of the same architecture on the PyTorch reference path
    (``kernel_backend="torch"``): the counter sees aten ops only, so the 1x1 projection inside the fused
    Triton epilogue would go uncounted. Convolutions count their cropped (causal) kernels, and
    attention counts the full L x L products, the counter's rule for SDPA.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model, make_batch, _ = build(argparse.Namespace(**{**vars(args), "backend": "torch"}))
    model = model.to(args.device)
    codes, condition = make_batch()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(codes, condition=condition)
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["vqvae", "prior-top", "prior-bottom"])
    p.add_argument("--size", type=int, default=32, help="image side (vqvae)")
    p.add_argument("--shape", type=int, nargs=2, default=[32, 32], help="code map H W (priors)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--res-channels", type=int, default=32)
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument("--codes", type=int, default=512)
    p.add_argument("--code-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--attention-every", type=int, default=5)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--cond-blocks", type=int, default=20)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto", help="fused kernels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="measured bf16 matmul TFLOP/s, for MFU")
    args = p.parse_args()

    torch.manual_seed(0)
    model, make_batch, loss_fn = build(args)
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4), torch.device(args.device))  # the training stages' own
    step_model = torch.compile(model) if args.compile else model
    inputs = make_batch()
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = loss_fn(step_model, *inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    result = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "batch": args.batch, "precision": args.precision,
              "compile": args.compile, "channels_last": args.channels_last, "backend": args.backend,
              "step_ms": seconds * 1e3, "images_per_sec": args.batch / seconds}
    if args.model != "vqvae":
        flops = 3 * prior_flops(args)  # forward + backward ~ 3x forward
        result["model_tflops"] = flops / seconds / 1e12
        if args.peak_tflops:
            result["mfu"] = result["model_tflops"] / args.peak_tflops
    print(json.dumps(result))


if __name__ == "__main__":
    main()
