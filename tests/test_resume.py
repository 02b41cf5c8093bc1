"""Resume is bit-exact even when the model draws random numbers (a prior's dropout)."""

from __future__ import annotations

import pytest
import torch

from vqgen.evaluation import prior_loss_fn
from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout
from vqgen.train import TrainConfig, fit, make_accelerator
from vqgen.utils import read_json

PRIOR = PriorConfig(channels=8, num_layers=2, kernel_size=3, num_heads=1, dropout=0.1, kernel_backend="torch")
LAYOUT = PriorLayout(num_codes=8, shape=(4, 4))


class Codes(torch.utils.data.Dataset):
    """40 random top-level code maps: 5 batches of 8 per epoch."""

    def __init__(self):
        self.top = torch.randint(0, LAYOUT.num_codes, (40, *LAYOUT.shape), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.top)

    def __getitem__(self, i):
        return {"top": self.top[i], "label": 0}


class Interrupted(Exception):
    pass


def train(stage_dir, checkpoint_every: int, num_workers: int, die_after: int | None = None):
    loss = prior_loss_fn("top", conditional=False)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if die_after is not None and calls["n"] > die_after:
            raise Interrupted  # like a process killed in the middle of a step
        return loss(model, batch)

    cfg = TrainConfig(steps=9, batch_size=8, checkpoint_every=checkpoint_every, log_every=1, eval_every=0,
                      image_every=0, schedule="cosine", warmup_steps=2, num_workers=num_workers)
    torch.manual_seed(0)
    model = GatedPixelCNN(PRIOR, LAYOUT)
    accelerator = make_accelerator(stage_dir, tracker="none", seed=0)
    fit(model, Codes(), cfg, accelerator, stage_dir, loss_fn)
    return model


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize(
    "checkpoint_every, resume_at",
    [(2, {"step": 6, "epoch": 1, "batch_in_epoch": 1}),  # mid-epoch
     (5, {"step": 5, "epoch": 0, "batch_in_epoch": 5})],  # right after an epoch's last batch
    ids=["mid-epoch", "epoch-boundary"],
)
def test_resume_with_dropout_is_bit_exact(tmp_path, checkpoint_every, resume_at, num_workers):
    reference = train(tmp_path / "straight", checkpoint_every, num_workers)
    with pytest.raises(Interrupted):
        train(tmp_path / "killed", checkpoint_every, num_workers, die_after=7)
    checkpoints = tmp_path / "killed" / "checkpoints"
    loop = read_json(checkpoints / read_json(checkpoints / "latest.json")["name"] / "train_state.json")["loop"]
    assert {key: loop[key] for key in resume_at} == resume_at
    resumed = train(tmp_path / "killed", checkpoint_every, num_workers)
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    for key in ref_state:
        assert torch.equal(res_state[key], ref_state[key]), key
