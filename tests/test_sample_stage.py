"""The sample stage: an interrupted run resumes at the first unfinished batch, with the same samples."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import vqgen.stages.sample as sample_stage
from tiny_pipeline import tiny_config
from test_distributed import SPLITS
from vqgen.pipeline import run_single_stage


class Interrupted(Exception):
    pass


def test_interrupted_sampling_resumes_at_the_first_unfinished_batch(tmp_path, monkeypatch):
    for stage in ("train-vqvae", "extract-codes", "train-prior-bottom", "train-prior-top", "sample"):
        run_single_stage(tiny_config(tmp_path, "whole", *SPLITS), stage)
    for stage_dir in ("vqvae", "codes", "prior-top", "prior-bottom"):
        shutil.copytree(tmp_path / "whole" / stage_dir, tmp_path / "cut" / stage_dir)
    cut = tiny_config(tmp_path, "cut", *SPLITS)

    drawn: list[int] = []
    real_sample_batch = sample_stage.sample_batch

    def counting(cfg, models, batch, n, device, progress=False):
        if stop_after is not None and len(drawn) == stop_after:
            raise Interrupted
        drawn.append(batch)
        return real_sample_batch(cfg, models, batch, n, device, progress)

    monkeypatch.setattr(sample_stage, "sample_batch", counting)
    # 11 samples in batches of 3: batches 0-3. Stop while drawing the third.
    stop_after = 2
    with pytest.raises(Interrupted):
        run_single_stage(cut, "sample")
    stage_dir = tmp_path / "cut" / "samples"
    assert sorted(p.name for p in (stage_dir / "parts").glob("batch-*.npz")) == ["batch-000000.npz", "batch-000001.npz"]
    assert not (stage_dir / "manifest.json").exists() and not (stage_dir / "samples.npz").exists()

    stop_after = None
    run_single_stage(cut, "sample")
    assert drawn == [0, 1, 2, 3]  # the finished batches were not drawn again
    with np.load(tmp_path / "whole" / "samples" / "samples.npz") as one, np.load(stage_dir / "samples.npz") as two:
        assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["labels"], two["labels"])

    # Parts from another sampling config are discarded, not mixed in.
    drawn.clear()
    run_single_stage(tiny_config(tmp_path, "cut", *SPLITS, "sample.seed=5"), "sample")
    assert drawn == [0, 1, 2, 3]
    with np.load(tmp_path / "whole" / "samples" / "samples.npz") as one, np.load(stage_dir / "samples.npz") as two:
        assert not np.array_equal(one["images"], two["images"])
