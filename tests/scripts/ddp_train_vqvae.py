"""Run under torchrun (2 CPU processes, gloo): each rank trains the VQ-VAE on its own data.

Rank r sees images of its own colour family, so the shared codebook must serve both. Every rank
saves its final state dict to ``OUT/rank{r}.safetensors``; rank 0 also saves the initial one.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from vqgen.models.quantize import QuantizerConfig
from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig
from vqgen.evaluation import vqvae_loss
from vqgen.train import TrainConfig, fit, make_accelerator

TINY = VQVAEConfig(hidden_channels=16, res_channels=8, num_res_blocks=1,
                   quantizer=QuantizerConfig(num_codes=32, code_dim=8, restart_every=2))


class RankImages(Dataset):
    """Smooth random images, bright on rank 0 and dark on rank 1."""

    def __init__(self, rank: int, n: int = 32):
        gen = torch.Generator().manual_seed(100 + rank)
        base = torch.rand(n, 3, 4, 4, generator=gen) * 0.4 + (0.5 if rank == 0 else -0.9)
        self.images = torch.nn.functional.interpolate(base, size=16, mode="bilinear")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], -1


def main(out: Path) -> None:
    accelerator = make_accelerator(out / "stage", tracker="none", seed=0)
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = VQVAE2(TINY)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "initial.safetensors"))
    cfg = TrainConfig(steps=6, batch_size=4, checkpoint_every=0, log_every=1, eval_every=0, image_every=0, lr=3e-3)
    fit(model, RankImages(rank), cfg, accelerator, out / "stage", vqvae_loss)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
