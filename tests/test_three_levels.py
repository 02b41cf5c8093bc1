"""A hierarchy of three levels end to end (tests/pipelines/tiny-three-levels.toml: 64x64 images,
codes at 4x4, 8x8 and 16x16): one prior per level, each conditioned on every level above, through
the CLI as users run it; the bundle samples what the sample stage drew."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_pipeline import INCEPTION_NOFC, TINY_THREE_LEVELS, TinyPipeline

from vqgen.data.code_dataset import CodeDataset
from vqgen.models.export import load_model

LEVELS = ("top", "middle", "bottom")


@pytest.mark.slow
def test_three_levels_train_sample_evaluate_and_export(tmp_path, shared_data):
    pipeline = TinyPipeline(tmp_path, shared_data / INCEPTION_NOFC, name="tiny3", pipeline=TINY_THREE_LEVELS)
    out = pipeline("run")
    # The priors train bottom first (the ones above then draw full ancestral pictures).
    order = [out.index(f"train-prior-{level}: running") for level in ("bottom", "middle", "top")]
    assert order == sorted(order), out
    run = pipeline.run_dir

    store = CodeDataset(run / "codes" / "codes.lmdb")
    assert {name: tuple(shape) for name, shape in store.shapes.items()} == {"top": (4, 4), "middle": (8, 8), "bottom": (16, 16)}
    assert list(store.shapes) == list(LEVELS)
    assert store.num_codes == {"top": 16, "middle": 32, "bottom": 8}
    priors = {level: load_model(run / f"prior-{level}")[0] for level in LEVELS}
    assert priors["top"].layout.conditions == ()
    assert priors["middle"].layout.conditions == ((16, (4, 4)),)
    assert priors["bottom"].layout.conditions == ((16, (4, 4)), (32, (8, 8)))

    with np.load(run / "samples" / "samples.npz") as samples:
        images = samples["images"]
    assert images.shape == (4, 3, 64, 64) and images.dtype == np.uint8
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for level in LEVELS:
        assert 0 < metrics[f"bits_per_dim_{level}"] and 0 < metrics[f"codebook_usage_{level}"] <= 1
    assert metrics["fid"] > 0 and metrics["rfid"] > 0
    for picture in ("prior-top/samples.png", "prior-middle/samples.png", "samples/grid.png", "eval/report.png"):
        assert (run / picture).stat().st_size > 0

    # The bundle holds every level's prior, and the API draws the sample stage's images from it.
    from vqgen import VQGen
    from vqgen.cli import main

    assert main(["export", str(run), str(tmp_path / "bundle")]) == 0
    gen = VQGen.from_pretrained(tmp_path / "bundle")
    assert [p.layout.shape for p in gen.priors] == [(4, 4), (8, 8), (16, 16)]
    from vqgen.config import load_config
    from vqgen.stages.sample import stage_plan

    cfg = load_config(run / "config.toml")
    drawn = torch.cat([gen.draw(stage_plan(cfg.sample), b).samples.images for b in range(2)])
    assert np.array_equal(drawn.numpy(), images)

    # A change to the middle prior retrains it and what reads it, nothing above or below.
    again = pipeline("run", sets=("prior.middle.train.lr=1e-3",))
    for stage in ("train-vqvae", "extract-codes", "train-prior-bottom", "train-prior-top"):
        assert f"{stage}: up to date, skipped" in again, again
    assert "train-prior-middle: restarting" in again or "train-prior-middle: running" in again, again
