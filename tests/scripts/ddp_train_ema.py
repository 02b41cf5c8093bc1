"""Run under torchrun (2 CPU processes, gloo): the VQ-VAE of ``ddp_train_vqvae.py``, each rank on its
own data, with a weight average. Every rank saves the model ``fit`` returns (the average, beside the
raw buffers) to ``OUT/rank{r}.safetensors``; the checkpoints are in ``OUT/stage/checkpoints``."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddp_train_vqvae import TINY, RankImages
from vqgen.evaluation import vqvae_loss
from vqgen.models.vqvae2 import VQVAE2
from vqgen.train import TrainConfig, fit, make_accelerator


def main(out: Path) -> None:
    accelerator = make_accelerator(out / "stage", tracker="none", seed=0)
    torch.manual_seed(0)
    model = VQVAE2(TINY)
    cfg = TrainConfig(steps=4, batch_size=4, checkpoint_every=0, log_every=1, eval_every=0, image_every=0, lr=3e-3,
                      ema_decay=0.5)
    fit(model, RankImages(accelerator.process_index), cfg, accelerator, out / "stage", vqvae_loss)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"rank{accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
