"""Classifier-based rejection sampling: the classifier model and its export, the train-classifier
stage (accuracy in its manifest, exact resume, unlabelled data refused), the two rejection rules
exactly (a stub draw and a stub classifier whose probabilities are known), determinism for a seed
and across process counts, the max_draw_factor error, ``vqgen sample --threshold``, the bundle, and
the trade-off benchmark at toy size.

One tiny run (``evaluate.enabled = false``; the classifier on, sampling with ``keep_fraction``)
serves the tests that need trained models.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vqgen.stages.train_classifier as classifier_stage
from tiny_pipeline import INCEPTION_NOFC, SHARED_DATA, TINY_PIPELINE, tiny_config
from vqgen import VQGen
from vqgen.cli import main
from vqgen.config import load_config
from vqgen.data.samples import load_samples
from vqgen.errors import ConfigError
from vqgen.generate import SamplePlan
from vqgen.manifest import read_manifest, read_started
from vqgen.models.classifier import ClassifierConfig, ClassifierLayout, ResNetClassifier
from vqgen.models.export import export_model, load_model, read_export_info
from vqgen.pipeline import run_pipeline, run_single_stage
from vqgen.rejection import RejectionConfig, RejectionError, fill_batch, intended_probability, round_generator
from vqgen.utils import read_json

pytestmark = pytest.mark.usefixtures("single_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
CLASSIFIER = ("classifier.enabled=true", "classifier.model.width=8", "classifier.model.blocks=1",
              "classifier.model.stages=2", "classifier.model.dropout=0.1", "classifier.hflip=true",
              "classifier.max_shift=2", "classifier.train.steps=6", "classifier.train.batch_size=8",
              "classifier.train.checkpoint_every=3", "classifier.train.eval_every=3", "classifier.train.log_every=1")
KEEP_HALF = ("sample.rejection.mode=keep_fraction", "sample.rejection.keep_fraction=0.5")


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("channels", [1, 3])
def test_model_shapes_and_export_round_trip(channels, tmp_path):
    layout = ClassifierLayout(in_channels=channels, image_size=16, num_classes=7)
    model = ResNetClassifier(ClassifierConfig(width=8, blocks=2, stages=3), layout).eval()
    images = torch.rand(5, channels, 16, 16) * 2 - 1
    logits = model(images)
    assert logits.shape == (5, 7)
    assert model.blocks(model.stem(images)).shape == (5, 32, 2, 2)  # 3 halvings, width doubling
    checksum = export_model(model, tmp_path)
    info = read_export_info(tmp_path)
    assert (info["class"], info["version"], info["layout"]["num_classes"]) == ("ResNetClassifier", 2, 7)
    loaded, config, loaded_checksum = load_model(tmp_path)
    assert config == model.config and loaded_checksum == checksum
    assert torch.equal(loaded(images), logits)
    with pytest.raises(ConfigError, match="stages: 5 halvings of 16-pixel images"):
        ResNetClassifier(ClassifierConfig(stages=5), layout)


# ---------------------------------------------------------------------------------------------
# The two rules, exactly: candidate images carry (round, position) as their pixel value


def stub_draw(calls: list):
    def draw(round_: int, positions: torch.Tensor) -> torch.Tensor:
        calls.append((round_, positions.tolist()))
        return (10 * round_ + positions).to(torch.uint8).view(-1, 1, 1, 1)

    return draw


def stub_score(table: dict[tuple[int, int], float]):
    def score(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor([table[divmod(int(v), 10)] for v in images.flatten()])

    return score


def test_threshold_keeps_each_position_its_first_accepted_candidate():
    labels = torch.tensor([0, 1, 0, 1])
    table = {(0, 0): 0.9, (0, 1): 0.2, (0, 2): 0.5, (0, 3): 0.1, (1, 1): 0.6, (1, 3): 0.3, (2, 3): 0.7}
    calls: list = []
    kept = fill_batch(RejectionConfig(mode="threshold", threshold=0.5), labels, stub_draw(calls), stub_score(table))
    assert calls == [(0, [0, 1, 2, 3]), (1, [1, 3]), (2, [3])]  # each round redraws the open positions only
    assert kept.images.flatten().tolist() == [0, 11, 2, 23]  # 0.5 >= 0.5 is accepted
    assert kept.scores.tolist() == pytest.approx([0.9, 0.6, 0.5, 0.7])
    assert kept.drawn == 7  # acceptance 4 / 7


def test_keep_fraction_keeps_the_best_candidates_of_each_class():
    labels = torch.tensor([0, 1, 0, 1])
    probabilities = [0.1, 0.5, 0.8, 0.4, 0.3, 0.7, 0.8, 0.2, 0.9, 0.6]  # candidate c = 4 * round + position
    table = {divmod(c, 4): p for c, p in enumerate(probabilities)}
    calls: list = []
    cfg = RejectionConfig(mode="keep_fraction", keep_fraction=0.4)
    kept = fill_batch(cfg, labels, stub_draw(calls), stub_score(table))
    # ceil(4 / 0.4) = 10 candidates: two full rounds and two of a third, for positions 0 and 1.
    assert calls == [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [0, 1])] and kept.drawn == 10
    # Class 0 (candidates 0, 2, 4, 6, 8): 0.9 (8) and the earlier of the two 0.8s (2), in draw order;
    # class 1 (1, 3, 5, 7, 9): 0.7 (5) and 0.6 (9).
    assert kept.images.flatten().tolist() == [2, 11, 20, 21]
    assert kept.scores.tolist() == pytest.approx([0.8, 0.7, 0.9, 0.6])
    whole = fill_batch(RejectionConfig(mode="keep_fraction", keep_fraction=1.0), labels, stub_draw([]),
                       stub_score(table))
    assert whole.images.flatten().tolist() == [0, 1, 2, 3] and whole.drawn == 4  # 1.0: the plain batch


def test_max_draw_factor_gives_up_naming_the_batch():
    calls: list = []
    never = RejectionConfig(mode="threshold", threshold=0.5, max_draw_factor=3)
    with pytest.raises(RejectionError, match=r"batch 7: 12 candidates drawn for 4 images, 0 accepted "
                                             r"\(acceptance 0.00%\).*max_draw_factor = 3"):
        fill_batch(never, torch.zeros(4, dtype=torch.long), stub_draw(calls),
                   lambda images, labels: torch.zeros(len(images)), batch=7)
    assert len(calls) == 3  # 12 = 3 x 4 candidates, and not one more
    with pytest.raises(ConfigError, match="keep_fraction: 0.01 draws 100 candidates per image, more than max_draw"):
        RejectionConfig(mode="keep_fraction", keep_fraction=0.01)
    with pytest.raises(ConfigError, match=r"sample.rejection.threshold: must be in \[0, 1\]"):
        tiny_config(Path("unused"), "x", "sample.rejection.mode=threshold", "sample.rejection.threshold=1.5")


def test_round_generators_depend_on_seed_batch_and_round_only():
    keys = [(0, 0, 1), (0, 1, 1), (0, 0, 2), (1, 0, 1)]  # (seed, batch, round)
    draws = {key: torch.rand(3, generator=round_generator(*key)) for key in keys}
    assert len({tuple(v.tolist()) for v in draws.values()}) == 4
    assert torch.equal(torch.rand(3, generator=round_generator(0, 0, 1)), draws[(0, 0, 1)])


def test_settings_of_a_plan_without_rejection_read_as_before():
    plain = SamplePlan(num_samples=4).settings()
    assert "rejection" not in plain
    ruled = SamplePlan(num_samples=4, rejection=RejectionConfig(mode="threshold", threshold=0.7, max_draw_factor=50))
    assert ruled.settings()["rejection"] == {"mode": "threshold", "threshold": 0.7}  # the factor fixes no image


# ---------------------------------------------------------------------------------------------
# The stage in a tiny run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classifier")
    run_pipeline(tiny_config(root, "tiny", "evaluate.enabled=false", *CLASSIFIER, *KEEP_HALF))
    return root / "tiny"


@pytest.fixture(scope="module")
def gen(run_dir) -> VQGen:
    return VQGen.from_pretrained(run_dir)


def test_the_pipeline_trains_the_classifier_and_samples_through_it(run_dir, gen, capsys):
    manifest = read_manifest(run_dir / "classifier")
    metrics = manifest["metrics"]
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["val_images"] == 16 and metrics["val_loss"] > 0
    assert manifest["outputs"]["steps"] == 6 and manifest["outputs"]["num_classes"] == 5
    # 8 images in batches of 4, keeping half: 8 candidates per batch.
    sampled = read_manifest(run_dir / "samples")["metrics"]
    assert (sampled["acceptance_rate"], sampled["candidates_drawn"], sampled["accepted"]) == (0.5, 16, 8)
    assert 0.0 < sampled["mean_intended_probability"] <= 1.0
    assert "train-classifier" in read_started(run_dir / "samples")["definition"]["inputs"]
    # The API with the stage's settings gives the stage's images.
    cfg = load_config(run_dir / "config.toml").sample
    images, labels = gen.sample(8, seed=cfg.seed, batch_size=4, top=cfg.top, bottom=cfg.bottom, keep_fraction=0.5)
    stage_images, stage_labels = load_samples(run_dir / "samples" / "samples.npz")
    assert np.array_equal(images.numpy(), stage_images) and np.array_equal(labels.numpy(), stage_labels)
    # Up to date on a rerun, and still when the classifier is switched off (the switch defines nothing).
    capsys.readouterr()
    for switch in ("true", "false"):
        sets = ("evaluate.enabled=false", *CLASSIFIER, *KEEP_HALF, f"classifier.enabled={switch}")
        run_pipeline(tiny_config(run_dir.parent, "tiny", *sets))
    out = capsys.readouterr().out
    assert out.count("train-classifier: up to date") == 1 and out.count("sample: up to date") == 2
    assert "train-classifier: switched off in the config" in out


class Brightness(torch.nn.Module):
    """A stub classifier of the tiny run's images whose probabilities are known: class 0's logit
    is 8 times the image's mean pixel, class 1's minus that, the others' 0 (bright images are
    class 0, dark ones class 1)."""

    layout = ClassifierLayout(in_channels=3, image_size=16, num_classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8 * x.mean(dim=(1, 2, 3))[:, None] * torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])


def test_threshold_with_a_stub_classifier_keeps_only_accepted_images(gen):
    stub = VQGen(gen.vqvae, gen.prior_top, gen.prior_bottom, classifier=Brightness())
    # One class: the redrawn candidates of a rejected position come from the same distribution.
    plain_plan = SamplePlan(num_samples=8, batch_size=8, seed=4, labels=(0,))
    plain = stub.draw(plain_plan, 0).samples
    first = intended_probability(Brightness(), plain.images, plain.labels)
    threshold = float(first.median())
    plan = SamplePlan(num_samples=8, batch_size=8, seed=4, labels=(0,),
                      rejection=RejectionConfig(mode="threshold", threshold=threshold))
    drawn = stub.draw(plan, 0)
    images, labels = drawn.samples
    assert torch.equal(labels, plain.labels)  # each position keeps its intended class
    accepted = first >= threshold
    assert 0 < accepted.sum() < 8
    assert torch.equal(images[accepted], plain.images[accepted])  # round 0 is the plain batch
    assert not torch.equal(images[~accepted], plain.images[~accepted])
    assert (drawn.scores >= threshold).all()
    assert torch.allclose(drawn.scores, intended_probability(Brightness(), images, labels))
    assert drawn.drawn >= 8 + int((~accepted).sum())
    again = stub.draw(plan, 0)
    assert torch.equal(again.samples.images, images) and again.drawn == drawn.drawn  # fixed by the seed
    assert torch.equal(stub.sample(8, labels=0, seed=4, batch_size=8, threshold=0.0).images, plain.images)


def test_keep_fraction_with_a_stub_classifier_picks_the_best_of_each_class(gen):
    stub = VQGen(gen.vqvae, gen.prior_top, gen.prior_bottom, classifier=Brightness())
    plan = SamplePlan(num_samples=6, batch_size=6, seed=2, labels=(0, 1, 1),
                      rejection=RejectionConfig(mode="keep_fraction", keep_fraction=0.5))
    drawn = stub.draw(plan, 0)
    assert drawn.drawn == 12 and drawn.samples.labels.tolist() == [0, 1, 1, 0, 1, 1]
    # The candidates, drawn again by hand: round 0 is the plain batch, round 1 its own generator.
    plain = stub.draw(SamplePlan(num_samples=6, batch_size=6, seed=2, labels=(0, 1, 1)), 0).samples
    second = stub._draw_images(plan, plain.labels, 6, round_generator(2, 0, 1), progress=False)
    candidates, classes = torch.cat([plain.images, second]), torch.cat([plain.labels, plain.labels])
    scores = intended_probability(Brightness(), candidates, classes)
    for label in plain.labels.unique().tolist():
        positions = (plain.labels == label).nonzero().flatten().tolist()
        mine = sorted(((classes == label).nonzero().flatten().tolist()), key=lambda c: -scores[c].item())
        best = sorted(mine[: len(positions)])
        for position, candidate in zip(positions, best):
            assert torch.equal(drawn.samples.images[position], candidates[candidate])


def test_the_classifier_stage_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    run_single_stage(tiny_config(tmp_path, "straight", *CLASSIFIER), "train-classifier")

    class Interrupted(Exception):
        pass

    real = classifier_stage.classifier_loss_fn

    def dying(augment):
        loss_fn, calls = real(augment), {"n": 0}

        def wrapped(model, batch):
            calls["n"] += 1
            if calls["n"] > 4:  # like a kill during step 5, after the step-3 checkpoint
                raise Interrupted
            return loss_fn(model, batch)

        return wrapped

    monkeypatch.setattr(classifier_stage, "classifier_loss_fn", dying)
    cut = tiny_config(tmp_path, "cut", *CLASSIFIER)
    with pytest.raises(Interrupted):
        run_single_stage(cut, "train-classifier")
    assert read_json(tmp_path / "cut" / "classifier" / "checkpoints" / "latest.json")["step"] == 3
    monkeypatch.setattr(classifier_stage, "classifier_loss_fn", real)
    capsys.readouterr()
    run_single_stage(cut, "train-classifier")
    assert "resumed from" in capsys.readouterr().out
    # Flips, shifts and dropout drew the same random numbers: the same weights, bit for bit.
    one, two = (read_export_info(tmp_path / name / "classifier")["sha256"] for name in ("straight", "cut"))
    assert one == two


def test_two_processes_count_each_evaluation_image_once(tmp_path):
    sets = [f"run.out_dir={tmp_path}", "run.name=two", "run.tracker=none", "data.num_eval=7", *CLASSIFIER]
    vqgen("stage", "train-classifier", str(TINY_PIPELINE), *(item for s in sets for item in ("--set", s)), procs=2)
    manifest = read_manifest(tmp_path / "two" / "classifier")
    assert manifest["metrics"]["val_images"] == 7 and 0.0 <= manifest["metrics"]["val_accuracy"] <= 1.0
    assert manifest["outputs"]["steps"] == 6


def test_unlabelled_data_and_a_switched_off_classifier_are_refused_before_the_first_stage(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "unlabelled.npz", images=images)
    unlabelled = tiny_config(tmp_path, "unlabelled", "evaluate.enabled=false", "data.kind=npz",
                             f"data.root={tmp_path / 'unlabelled.npz'}", *CLASSIFIER)
    with pytest.raises(ConfigError, match=r"classifier.enabled: data.kind = 'npz' .* has no class labels"):
        run_pipeline(unlabelled)
    assert not (tmp_path / "unlabelled" / "vqvae").exists()
    with pytest.raises(ConfigError, match="has no class labels"):
        run_single_stage(unlabelled, "train-classifier")
    off = tiny_config(tmp_path, "off", "evaluate.enabled=false", "sample.rejection.mode=threshold")
    with pytest.raises(ConfigError, match=r"classifier.enabled: stage sample reads the outputs of train-classifier, "
                                          r"which is switched off and has not finished"):
        run_pipeline(off)
    assert not (tmp_path / "off" / "vqvae").exists()


# ---------------------------------------------------------------------------------------------
# `vqgen sample`, `vqgen export`, and two processes


def vqgen(*args: str, procs: int = 1) -> str:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    proc = subprocess.run([sys.executable, *launch, "-m", "vqgen.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def test_vqgen_sample_threshold_on_one_and_two_processes(run_dir, gen, tmp_path):
    # One class, and a threshold that about half of its images pass: a rejected position's
    # redraws come from the same distribution as the accepted ones.
    plain = gen.sample(10, labels=1, seed=3, batch_size=4)
    threshold = float(gen.score(plain.images, plain.labels).median())
    args = ("sample", str(run_dir), "--num", "10", "--batch", "4", "--seed", "3", "--class", "1",
            "--threshold", str(threshold))
    vqgen(*args, "--out", str(tmp_path / "one"))
    vqgen(*args[:2], "-n", "10", *args[4:], "--out", str(tmp_path / "two"), procs=2)
    one, two = load_samples(tmp_path / "one" / "samples.npz"), load_samples(tmp_path / "two" / "samples.npz")
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    expected = gen.sample(10, labels=1, seed=3, batch_size=4, threshold=threshold)
    assert np.array_equal(one[0], expected.images.numpy()) and np.array_equal(one[1], plain.labels.numpy())
    assert (gen.score(torch.from_numpy(one[0]), torch.from_numpy(one[1])) >= threshold - 1e-6).all()
    for folder in ("one", "two"):
        manifest = read_json(tmp_path / folder / "manifest.json")
        figures = manifest["rejection"]
        assert figures["accepted"] == 10 and figures["acceptance_rate"] == 10 / figures["candidates_drawn"] < 1
        assert manifest["settings"]["rejection"] == {"mode": "threshold", "threshold": threshold}
        assert "classifier" in manifest["settings"]["models"]
    assert read_json(tmp_path / "two" / "manifest.json")["processes"] == 2
    one_figures, two_figures = (read_json(tmp_path / d / "manifest.json")["rejection"] for d in ("one", "two"))
    assert one_figures == two_figures


def test_the_sample_stage_on_two_processes_keeps_the_one_process_images(run_dir, tmp_path):
    for item in ("vqvae", "codes", "prior-top", "prior-bottom", "classifier"):
        shutil.copytree(run_dir / item, tmp_path / "double" / item)
    sets = [f"run.out_dir={tmp_path}", "run.name=double", "run.tracker=none", "evaluate.enabled=false",
            *CLASSIFIER, *KEEP_HALF]
    vqgen("stage", "sample", str(TINY_PIPELINE), *(item for s in sets for item in ("--set", s)), procs=2)
    with np.load(run_dir / "samples" / "samples.npz") as one, \
         np.load(tmp_path / "double" / "samples" / "samples.npz") as two:
        assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["labels"], two["labels"])
    single, double = (read_manifest(d / "samples")["metrics"] for d in (run_dir, tmp_path / "double"))
    assert double["samples_per_process"] == [4, 4]
    for key in ("acceptance_rate", "candidates_drawn", "accepted", "mean_intended_probability"):
        assert double[key] == single[key], key


def test_vqgen_sample_without_a_classifier_says_so(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    for item in ("vqvae", "prior-top", "prior-bottom"):
        shutil.copytree(run_dir / item, bare / item, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(run_dir / "config.toml", bare / "config.toml")
    assert main(["sample", str(bare), "-n", "2", "--threshold", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--threshold: rejection sampling needs a classifier" in capsys.readouterr().err
    assert main(["sample", str(run_dir), "-n", "2", "--keep-fraction", "1.5", "--out", str(tmp_path / "y")]) == 2
    assert "--keep-fraction: must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_bundle_carries_the_classifier(run_dir, gen, tmp_path):
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_dir), str(bundle)]) == 0
    assert sorted(p.name for p in (bundle / "classifier").iterdir()) == ["config.json", "model.safetensors"]
    meta = read_json(bundle / "config.json")
    assert meta["components"]["classifier"]["sha256"] == read_export_info(run_dir / "classifier")["sha256"]
    card = (bundle / "README.md").read_text()
    assert "| classifier | 6 |" in card and "--keep-fraction" in card
    loaded = VQGen.from_pretrained(bundle)
    for a, b in zip(loaded.sample(4, seed=1, batch_size=4, keep_fraction=0.5),
                    gen.sample(4, seed=1, batch_size=4, keep_fraction=0.5)):
        assert torch.equal(a, b)


def test_tradeoff_benchmark_at_toy_size(run_dir, tmp_path, monkeypatch):
    weights = SHARED_DATA / INCEPTION_NOFC
    if not weights.is_file():
        pytest.skip(f"Inception weights not found at {weights} (set VQGEN_TEST_DATA)")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import rejection_tradeoff

    out = tmp_path / "tradeoff"
    rejection_tradeoff.main([str(run_dir), "--rates", "1.0", "0.5", "--num", "8", "--batch", "4", "--out", str(out),
                             "--set", f"evaluate.inception_weights={weights}", "--set", "evaluate.kid_subset_size=4",
                             "--set", f"evaluate.stats_cache={tmp_path / 'stats'}"])
    with open(out / "tradeoff.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["keep_fraction"]) for r in rows] == [1.0, 0.5]
    assert [float(r["acceptance_rate"]) for r in rows] == [1.0, 0.5]
    assert all(float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1 for r in rows)
    assert (out / "tradeoff.png").stat().st_size > 0 and "| keep_fraction |" in (out / "tradeoff.md").read_text()


def test_level_attribution_splits_real_codes_from_drawn_ones(run_dir, gen, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import level_attribution

    cfg = load_config(run_dir / "config.toml")
    images, labels = next(level_attribution.training_batches(cfg, 4, 4))
    # Nothing real: the product's own sampler for these labels and this generator.
    drawn = level_attribution.images_with_real_levels(gen, images, labels, 0, torch.Generator().manual_seed(7 * 1000003))
    sampled, _ = gen.sample(4, labels=labels.tolist(), seed=7, batch_size=4)
    assert torch.equal(drawn, sampled)
    # Everything real: the VQ-VAE's reconstruction.
    assert torch.equal(level_attribution.images_with_real_levels(gen, images, labels, 2, torch.Generator()),
                       gen.reconstruct(images))
    # The top real: it is kept as given, and the bottom is drawn given it.
    top = gen.encode(images)[0]
    codes = gen.draw_codes(gen.plan(4, batch_size=4), labels, 4, torch.Generator().manual_seed(0), above=(top,))
    assert torch.equal(codes[0], top) and codes[1].shape == gen.encode(images)[1].shape
    with pytest.raises(ValueError, match="3 levels of codes given for a model of 2"):
        gen.draw_codes(gen.plan(4, batch_size=4), labels, 4, torch.Generator(), above=(top, top, top))

    weights = SHARED_DATA / INCEPTION_NOFC
    if not weights.is_file():
        pytest.skip(f"Inception weights not found at {weights} (set VQGEN_TEST_DATA)")
    out = tmp_path / "levels"
    level_attribution.main([str(run_dir), "--num", "8", "--batch", "4", "--out", str(out),
                            "--set", f"evaluate.inception_weights={weights}", "--set", "evaluate.kid_subset_size=4",
                            "--set", f"evaluate.stats_cache={tmp_path / 'stats'}"])
    with open(out / "levels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["real_levels"], r["drawn_levels"]) for r in rows] == [("none", "top+bottom"), ("top", "bottom"),
                                                                     ("top+bottom", "none")]
    assert all(float(r["fid"]) > 0 and int(r["num_samples"]) == 8 for r in rows)
