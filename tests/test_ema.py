"""The weight average (``train.ema_decay``): its arithmetic, its place in ``fit`` (evaluation, best
weights, export), its checkpoints and a bit-exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_resume import LAYOUT, PRIOR, Codes, Interrupted
from test_train import TINY as TINY_VQVAE
from tiny_pipeline import tiny_config
from vqgen.configtools import split_by_role
from vqgen.data.datasets import DataConfig, build_dataset
from vqgen.data.procedural import ProceduralConfig
from vqgen.ema import EMA_FILE, WeightEMA, decay_at
from vqgen.errors import CheckpointError, ConfigError
from vqgen.evaluation import prior_loss_fn, vqvae_loss
from vqgen.manifest import StageSpec, write_started
from vqgen.models.pixelcnn import GatedPixelCNN
from vqgen.models.vqvae2 import VQVAE2
from vqgen.train import BEST_WEIGHTS, TrainConfig, best_weights, fit, make_accelerator
from vqgen.utils import read_json

pytestmark = pytest.mark.usefixtures("single_thread")


# -- the arithmetic ---------------------------------------------------------------------------------


def test_decay_follows_the_raw_weights_until_start_then_warms_up_to_its_cap():
    assert [decay_at(step, 0.3, start=2) for step in (0, 1, 2)] == [0.0, 0.0, 0.0]
    assert decay_at(3, 0.3, start=2) == 1 / 10
    assert decay_at(4, 0.3, start=2) == 2 / 11
    assert decay_at(5, 0.3, start=2) == 3 / 12
    assert decay_at(6, 0.3, start=2) == 0.3  # 4 / 13 > 0.3
    assert decay_at(10_000, 0.999, start=0) == 0.999


def scalar_model(weight: float, bias: float) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1)
    model.register_buffer("count", torch.zeros(()))
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)
    return model


def test_average_matches_a_hand_computation():
    model = scalar_model(0.0, 1.0)
    ema = WeightEMA(model, decay=0.2, start=1)
    weights = {1: 2.0, 2: 4.0, 3: 8.0, 4: 6.0}  # the raw weight after each optimizer step
    for step, weight in weights.items():
        with torch.no_grad():
            model.weight.fill_(weight)
            model.bias.fill_(-weight)
            model.count.fill_(step)
        ema.update(model, step)
    # step 1 <= start: a copy; then decays 1/10, 2/11 and min(0.2, 3/12) = 0.2
    w = 2.0
    w = 1 / 10 * w + 9 / 10 * 4.0
    w = 2 / 11 * w + 9 / 11 * 8.0
    w = 0.2 * w + 0.8 * 6.0
    assert w == pytest.approx(6.247273, abs=1e-6)
    averages = ema.state_dict()
    assert averages.keys() == {"weight", "bias"}  # buffers are not averaged
    assert averages["weight"].item() == pytest.approx(w, rel=1e-6)
    assert averages["bias"].item() == pytest.approx(-w, rel=1e-6)
    with ema.applied(model) as shown:
        assert shown is model
        assert model.weight.item() == pytest.approx(w, rel=1e-6)
        assert model.count.item() == 4  # the raw model's buffer, as it is
    assert model.weight.item() == 6.0 and model.bias.item() == -6.0  # the raw weights are back


def test_applied_gives_the_raw_weights_back_when_the_block_fails():
    model = scalar_model(3.0, 1.0)
    ema = WeightEMA(model, decay=0.5, start=0)
    with torch.no_grad():
        model.weight.fill_(5.0)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with ema.applied(model):
            assert model.weight.item() == 3.0
            raise RuntimeError("evaluation failed")
    assert model.weight.item() == 5.0


def test_saved_average_loads_bit_exact_and_refuses_other_settings(tmp_path):
    model = GatedPixelCNN(PRIOR, LAYOUT)
    ema = WeightEMA(model, decay=0.9, start=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, 1)
    ema.update(model, 2)
    path = tmp_path / EMA_FILE
    ema.save(path, step=2)
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, no pickle
        assert f.metadata() == {"format": "vqgen-weight-ema", "decay": "0.9", "start": "0", "step": "2"}
    restored = WeightEMA(GatedPixelCNN(PRIOR, LAYOUT), decay=0.9, start=0)
    restored.load(path, step=2)
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    for other, step, what in ((WeightEMA(model, 0.99, 0), 2, "decay"), (WeightEMA(model, 0.9, 1), 2, "start"),
                              (ema, 3, "step")):
        with pytest.raises(CheckpointError, match="another setting or step"):
            other.load(path, step=step)
    with pytest.raises(CheckpointError, match=f"{EMA_FILE} is missing"):
        ema.load(tmp_path / "nowhere" / EMA_FILE, step=2)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="could not be read"):
        ema.load(path, step=2)


# -- the config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", math.nan),
                                        ("ema_start", -1)])
def test_out_of_range_settings_name_their_key(key, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{key: value})
    assert err.value.key == key


def test_settings_are_checked_under_their_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^prior\.top\.train\.ema_decay: must be in \[0, 1\)"):
        tiny_config(tmp_path, "tiny", "prior.top.train.ema_decay=1.5")


def test_average_settings_define_the_stage():
    """The export changes with them, so changing them restarts the stage rather than continuing it."""
    defining, scheduling = split_by_role(TrainConfig(ema_decay=0.999, ema_start=100))
    assert (defining["ema_decay"], defining["ema_start"]) == (0.999, 100)
    assert "ema_decay" not in scheduling and "ema_start" not in scheduling
    assert split_by_role(TrainConfig(ema_decay=0.99))[0] != split_by_role(TrainConfig())[0]
    # Off, they are left out: stages finished before the option existed keep their definition.
    assert "ema_decay" not in split_by_role(TrainConfig())[0] and "ema_start" not in split_by_role(TrainConfig())[0]


# -- in fit -----------------------------------------------------------------------------------------


def prior_config(**overrides) -> TrainConfig:
    settings = dict(steps=9, batch_size=8, checkpoint_every=2, log_every=1, eval_every=3, image_every=1,
                    schedule="cosine", warmup_steps=2, ema_start=2)
    return TrainConfig(**{**settings, **overrides})


def train_prior(stage_dir, cfg: TrainConfig, evaluate=None, snapshot=None, best_metric=None, die_after=None):
    """The dropout prior of test_resume.py on its 40 code maps; dies on micro-batch ``die_after + 1``."""
    loss, calls = prior_loss_fn("top", conditional=False), {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if die_after is not None and calls["n"] > die_after:
            raise Interrupted
        return loss(model, batch)

    torch.manual_seed(0)
    model = GatedPixelCNN(PRIOR, LAYOUT)
    accelerator = make_accelerator(stage_dir, tracker="none", seed=0)
    state = fit(model, Codes(), cfg, accelerator, stage_dir, loss_fn, evaluate, snapshot, best_metric)
    return model, state


def copy_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def last_checkpoint(stage_dir):
    checkpoints = stage_dir / "checkpoints"
    return checkpoints / read_json(checkpoints / "latest.json")["name"]


def test_fit_evaluates_keeps_and_returns_the_average_and_trains_the_raw_weights(tmp_path):
    # Without an average, the pictures see the raw weights after every step.
    raw = {}
    _, _ = train_prior(tmp_path / "plain", prior_config(), snapshot=lambda m, step: raw.setdefault(step, copy_state(m)))
    # The average those raw weights make, computed apart from fit.
    expected, holder = {}, GatedPixelCNN(PRIOR, LAYOUT)
    ema = WeightEMA(holder, decay=0.3, start=2)
    for step in range(1, 10):
        holder.load_state_dict(raw[step])
        ema.update(holder, step)
        expected[step] = {k: v.clone() for k, v in ema.state_dict().items()}

    shown, evaluated = {}, {}
    scores = iter([3.0, 1.0, 2.0])  # evaluations at steps 3, 6 and 9: the best is step 6

    def evaluate(model):
        evaluated[len(evaluated)] = copy_state(model)
        return {"val": next(scores)}

    stage_dir = tmp_path / "ema"
    model, state = train_prior(stage_dir, prior_config(ema_decay=0.3), evaluate,
                               lambda m, step: shown.setdefault(step, copy_state(m)), best_metric="val")
    for step in range(1, 10):
        for name, value in expected[step].items():
            assert torch.equal(shown[step][name], value), (step, name)
    for i, step in enumerate((3, 6, 9)):
        assert all(torch.equal(evaluated[i][k], v) for k, v in expected[step].items()), step
    assert not torch.equal(expected[9]["head.3.weight"], raw[9]["head.3.weight"])  # the average is not the raw model
    # Training went on with the raw weights: the last checkpoint holds them, bit for bit as without EMA.
    trained = load_file(str(last_checkpoint(stage_dir) / "model.safetensors"))
    assert all(torch.equal(trained[k], v) for k, v in raw[9].items())
    # fit returns the last average; the best file is the average evaluated best, which best_weights loads.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected[9].items())
    assert (state.best_step, state.best_value) == (6, 1.0)
    kept = load_file(str(stage_dir / BEST_WEIGHTS))
    assert all(torch.equal(kept[k], v) for k, v in expected[6].items())
    assert best_weights(model, state, stage_dir, prior_config(ema_decay=0.3))[1] == 6
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected[6].items())


def test_resume_with_the_average_is_bit_exact(tmp_path):
    cfg = prior_config(ema_decay=0.3, eval_every=0, image_every=0)
    reference, _ = train_prior(tmp_path / "straight", cfg)
    with pytest.raises(Interrupted):
        train_prior(tmp_path / "killed", cfg, die_after=7)  # the last checkpoint is step 6, mid-epoch
    assert read_json(last_checkpoint(tmp_path / "killed") / "train_state.json")["loop"]["step"] == 6
    resumed, state = train_prior(tmp_path / "killed", cfg)
    assert state.step == 9
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    for key in ref_state:
        assert torch.equal(res_state[key], ref_state[key]), key
    # (not byte for byte: safetensors writes the metadata in hash-map order)
    straight, killed = (load_file(str(last_checkpoint(tmp_path / run) / EMA_FILE)) for run in ("straight", "killed"))
    assert straight.keys() == killed.keys()
    assert all(torch.equal(killed[k], v) for k, v in straight.items())


def test_checkpoint_without_the_average_is_refused(tmp_path):
    """Through the runner, the definition hash in ``stage.json`` already refuses a checkpoint made
    with another ``ema_decay``; without it (``fit`` called directly), the missing file does."""
    with pytest.raises(Interrupted):
        train_prior(tmp_path / "direct", prior_config(image_every=0, eval_every=0), die_after=5)
    with pytest.raises(CheckpointError, match=rf"step-00000004/{EMA_FILE} is missing"):
        train_prior(tmp_path / "direct", prior_config(ema_decay=0.3, image_every=0, eval_every=0))

    stage_dir = tmp_path / "runner"
    off, on = prior_config(image_every=0, eval_every=0), prior_config(ema_decay=0.3, image_every=0, eval_every=0)
    write_started(stage_dir, StageSpec(split_by_role(off)[0], {}))
    with pytest.raises(Interrupted):
        train_prior(stage_dir, off, die_after=5)
    write_started(stage_dir, StageSpec(split_by_role(on)[0], {}))
    with pytest.raises(CheckpointError, match="step-00000004 was written under another config"):
        train_prior(stage_dir, on)


def test_vqvae_codebooks_are_the_raw_ones_beside_averaged_weights(tmp_path):
    data = build_dataset(DataConfig(image_size=16, procedural=ProceduralConfig(size=40)), "train")
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=0, log_every=1, eval_every=0, image_every=0,
                      lr=3e-3, ema_decay=0.5)
    torch.manual_seed(0)
    model = VQVAE2(TINY_VQVAE)
    fit(model, data, cfg, make_accelerator(tmp_path, tracker="none", seed=0), tmp_path, vqvae_loss)
    trained = load_file(str(last_checkpoint(tmp_path) / "model.safetensors"))
    averaged = load_file(str(last_checkpoint(tmp_path) / EMA_FILE))
    final = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers and buffers.isdisjoint(averaged)
    for name in buffers:  # codebooks, their statistics, the step counter: copied
        assert torch.equal(final[name], trained[name]), name
    for name in averaged:  # parameters: averaged
        assert torch.equal(final[name], averaged[name]), name
    assert not torch.equal(final["decoder.0.weight"], trained["decoder.0.weight"])


def test_train_vqvae_stage_exports_the_best_average(tmp_path):
    from vqgen.pipeline import run_single_stage

    cfg = tiny_config(tmp_path, "tiny", "vqvae.train.ema_decay=0.5")
    run_single_stage(cfg, "train-vqvae")
    stage_dir = tmp_path / "tiny" / "vqvae"
    best_step = read_json(stage_dir / "manifest.json")["outputs"]["exported_step"]
    checkpoint = stage_dir / "checkpoints" / f"step-{best_step:08d}"  # evaluations and checkpoints: steps 3, 6
    averaged, trained = (load_file(str(checkpoint / name)) for name in (EMA_FILE, "model.safetensors"))
    exported = load_file(str(stage_dir / "model.safetensors"))
    assert exported.keys() == trained.keys()
    for name, value in exported.items():
        assert torch.equal(value, averaged.get(name, trained[name])), name
    assert not torch.equal(exported["decoder.0.weight"], trained["decoder.0.weight"])


def test_two_processes_keep_one_average(tmp_path):
    """Under DDP every rank averages the identical weights it holds after each step: the copies agree
    bit for bit, and the main process's checkpoint file is that average."""
    from test_distributed import SCRIPTS, torchrun

    torchrun(str(SCRIPTS / "ddp_train_ema.py"), str(tmp_path))
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    checkpoint = last_checkpoint(tmp_path / "stage")
    averaged, trained = (load_file(str(checkpoint / name)) for name in (EMA_FILE, "model.safetensors"))
    for key, value in rank0.items():
        assert torch.equal(value, averaged.get(key, trained[key])), key
    assert not torch.equal(averaged["decoder.0.weight"], trained["decoder.0.weight"])
