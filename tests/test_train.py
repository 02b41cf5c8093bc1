"""The shared training loop: resume after an interruption equals an uninterrupted run."""

from __future__ import annotations

import re

import pytest
import torch

from vqgen.data.datasets import DataConfig, build_dataset
from vqgen.data.procedural import ProceduralConfig
from vqgen.errors import CheckpointError
from vqgen.evaluation import vqvae_loss
from vqgen.models.quantize import QuantizerConfig
from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig
from vqgen.tracking import read_metrics_csv
from vqgen.train import TrainConfig, build_optimizer, fit, make_accelerator

TINY = VQVAEConfig(hidden_channels=16, res_channels=8, num_res_blocks=1,
                   quantizer=QuantizerConfig(num_codes=16, code_dim=8, restart_every=3))


class Interrupted(Exception):
    pass


def interrupt_after(calls: int):
    """A loss function that dies on its ``calls + 1``-th micro-batch, like a killed process."""
    count = {"n": 0}

    def loss_fn(model, batch):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupted
        return vqvae_loss(model, batch)

    return loss_fn


def train(tmp_path, loss_fn=vqvae_loss, **overrides):
    cfg = TrainConfig(steps=9, batch_size=8, checkpoint_every=2, log_every=1, eval_every=0, image_every=0,
                      schedule="cosine", warmup_steps=2, grad_accum_steps=1, **overrides)
    data = build_dataset(DataConfig(image_size=16, procedural=ProceduralConfig(size=40)), "train", augment=True)
    torch.manual_seed(0)
    model = VQVAE2(TINY)
    accelerator = make_accelerator(tmp_path, tracker="csv", seed=0)
    state = fit(model, data, cfg, accelerator, tmp_path, loss_fn)
    return model, state


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    # 40 images / batch 8 = 5 batches per epoch: the kill at micro-batch 7 is inside epoch 2, and the
    # last checkpoint (step 6) is mid-epoch too.
    reference, _ = train(tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(tmp_path / "killed", loss_fn=interrupt_after(7))
    resumed, state = train(tmp_path / "killed")
    assert state.step == 9 and state.epoch == 1 and state.batch_in_epoch == 4
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    for key in ref_state:  # bit-exact (test_resume.py covers a model that draws random numbers)
        assert torch.equal(res_state[key], ref_state[key]), key
    # the metrics file keeps the rows written before the kill
    steps = [s for s, _ in read_metrics_csv(tmp_path / "killed" / "metrics.csv")["loss"]]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[-1] == 9


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    train(tmp_path)
    latest = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not be loaded"):
        train(tmp_path)


class WritesMarker:
    """Unpickling this would create a file: loading must never run code from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def damage_rng_state(path, how, marker):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif how == "garbage":
        path.write_bytes(b"not a pickle at all")
    elif how == "missing keys":
        torch.save({"step": 0, "torch_manual_seed": torch.get_rng_state()}, path)
    elif how == "code":
        torch.save({"torch_manual_seed": WritesMarker(marker)}, path)
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing keys", "code", "deleted"])
def test_damaged_rng_state_is_a_clear_error(tmp_path, how):
    # Accelerate itself only logs "Could not load random states" and resumes with other random numbers.
    train(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    latest = sorted(checkpoints.glob("step-*"))[-1]
    rng_file = latest / "random_states_0.pkl"
    damage_rng_state(rng_file, how, tmp_path / "marker")
    pointer = (checkpoints / "latest.json").read_bytes()
    with pytest.raises(CheckpointError, match=f"damaged RNG state {re.escape(str(rng_file))}") as err:
        train(tmp_path)
    assert str(latest) in str(err.value) and "start the stage afresh" in str(err.value)
    assert not (tmp_path / "marker").exists()
    assert (checkpoints / "latest.json").read_bytes() == pointer and (latest / "model.safetensors").exists()


def test_best_validation_weights_are_kept_across_a_resume(tmp_path):
    from safetensors.torch import load_file

    from vqgen.train import BEST_WEIGHTS, best_weights

    scores = iter([3.0, 1.0, 2.0, 5.0])  # evaluations at steps 2, 4, 6 and 8: the best is step 4
    snapshots = {}

    def evaluate(model):
        return {"val": next(scores)}

    def snapshot(model, step):
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    data = build_dataset(DataConfig(image_size=16, procedural=ProceduralConfig(size=40)), "train")
    cfg = TrainConfig(steps=8, batch_size=8, checkpoint_every=4, eval_every=2, image_every=2, log_every=1)

    def run(steps):
        torch.manual_seed(0)
        model = VQVAE2(TINY)
        accelerator = make_accelerator(tmp_path, tracker="none", seed=0)
        state = fit(model, data, TrainConfig(**{**cfg.__dict__, "steps": steps}), accelerator, tmp_path,
                    vqvae_loss, evaluate, snapshot, best_metric="val")
        return model, state

    run(4)  # stops after the step-4 checkpoint, as a killed run would have
    model, state = run(8)  # resumes: steps 6 and 8 are worse than step 4
    assert (state.best_step, state.best_value) == (4, 1.0)
    kept = load_file(str(tmp_path / BEST_WEIGHTS))
    for key, value in snapshots[4].items():
        assert torch.equal(kept[key], value), key
    assert not torch.equal(model.state_dict()["decoder.0.weight"], snapshots[4]["decoder.0.weight"])
    last = model.state_dict()["decoder.0.weight"].clone()
    # Switched off after the best was kept: the last weights stay, and they are what is exported.
    assert best_weights(model, state, tmp_path, TrainConfig(export_best=False)) == (model, 8)
    assert torch.equal(model.state_dict()["decoder.0.weight"], last)
    assert best_weights(model, state, tmp_path, cfg) == (model, 4)
    assert torch.equal(model.state_dict()["decoder.0.weight"], snapshots[4]["decoder.0.weight"])


def test_auto_precision_is_bf16_where_the_hardware_computes_in_it(monkeypatch):
    import vqgen.train as train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(train, "cpu_computes_bf16", lambda: native)
        assert train.resolve_mixed_precision("auto") == expected
    assert [train.resolve_mixed_precision(m) for m in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train.resolve_mixed_precision("auto") == "bf16"


def test_optimizer_is_fused_on_a_gpu_only():
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(lr=2e-4, betas=(0.8, 0.9), weight_decay=0.05)
    gpu, cpu = (build_optimizer(model, cfg, torch.device(d)) for d in ("cuda", "cpu"))
    assert gpu.defaults["fused"] and not cpu.defaults["fused"]
    for optimizer in (gpu, cpu):
        settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "weight_decay")}
        assert settings == {"lr": 2e-4, "betas": (0.8, 0.9), "weight_decay": 0.05}


def test_checkpoint_of_another_stage_definition_is_refused(tmp_path):
    """A checkpoint records the definition it was made under (the runner's ``stage.json``); resuming
    it under another one would mix two experiments, so ``fit`` refuses, naming the checkpoint."""
    from vqgen.manifest import StageSpec, write_started

    write_started(tmp_path, StageSpec({"vqvae": {"lr": 1e-3}}, {}))
    with pytest.raises(Interrupted):
        train(tmp_path, loss_fn=interrupt_after(5))
    write_started(tmp_path, StageSpec({"vqvae": {"lr": 3e-4}}, {}))
    with pytest.raises(CheckpointError, match=r"step-00000004 was written under another config"):
        train(tmp_path)
    write_started(tmp_path, StageSpec({"vqvae": {"lr": 1e-3}}, {}))
    _, state = train(tmp_path)  # the same definition resumes
    assert state.step == 9
