"""extract-codes: a half-written store is completed, never mistaken for a finished one."""

from __future__ import annotations

import shutil

import pytest
import torch

from tiny_pipeline import tiny_config
from vqgen.data import CodeDataset, CodeStoreWriter, read_store_meta
from vqgen.errors import DataError
from vqgen.pipeline import run_single_stage
from vqgen.models.export import load_model
from vqgen.stages.extract_codes import store_meta

SIZES = ("data.procedural.size=30", "data.num_eval=6", "codes.batch_size=4")


def records(path):
    store = CodeDataset(path)
    try:
        return [(item["top"].tolist(), item["bottom"].tolist(), item["label"]) for item in (store[i] for i in range(len(store)))]
    finally:
        store.close()


@pytest.fixture
def run_cfg(tmp_path):
    cfg = tiny_config(tmp_path, "tiny", *SIZES)
    run_single_stage(cfg, "train-vqvae")
    return cfg


def test_interrupted_extraction_resumes(run_cfg):
    run_dir = run_cfg.run_dir
    run_single_stage(run_cfg, "extract-codes")
    expected = records(run_dir / "codes" / "codes.lmdb")

    # A kill after 10 records: no manifest, metadata says incomplete, and readers refuse the store.
    partial = run_dir / "codes" / "codes.lmdb"
    model, _, checksum = load_model(run_dir / "vqvae")
    shutil.rmtree(partial)
    (run_dir / "codes" / "manifest.json").unlink()
    with CodeStoreWriter(partial) as writer:
        writer.write_meta(store_meta(model, run_cfg.data, "train", 5, checksum, 30))
        # Zero codes mark the records written before the kill: resuming must keep them, not redo them.
        writer.put_batch(list(range(10)), [torch.zeros(10, 2, 2), torch.zeros(10, 4, 4)], [r[2] for r in expected[:10]])
    assert read_store_meta(partial)["complete"] is False
    with pytest.raises(DataError, match="did not finish|incomplete|not complete"):
        CodeDataset(partial)

    run_single_stage(run_cfg, "extract-codes")
    resumed = records(partial)
    assert all(top == [[0, 0], [0, 0]] for top, _, _ in resumed[:10])
    assert resumed[10:] == expected[10:]


def test_store_of_another_model_is_restarted(run_cfg):
    run_dir = run_cfg.run_dir
    partial = run_dir / "codes" / "codes.lmdb"
    model, _, checksum = load_model(run_dir / "vqvae")
    with CodeStoreWriter(partial) as writer:
        writer.write_meta(store_meta(model, run_cfg.data, "train", 5, "0" * 64, 30))
    run_single_stage(run_cfg, "extract-codes")
    meta = read_store_meta(partial)
    assert meta["complete"] and meta["source_checksum"] == checksum and meta["count"] == 30


def test_worker_processes_write_the_same_store(run_cfg):
    """``codes.num_workers`` only reads the images elsewhere: same records, same checksum."""
    from vqgen.config import load_config
    from vqgen.data import store_checksum

    run_dir = run_cfg.run_dir
    run_single_stage(run_cfg, "extract-codes")
    serial = records(run_dir / "codes" / "codes.lmdb"), store_checksum(run_dir / "codes" / "codes.lmdb")
    shutil.rmtree(run_dir / "codes")
    parallel_cfg = load_config(run_dir / "config.toml", ["codes.num_workers=2"])
    run_single_stage(parallel_cfg, "extract-codes")
    assert (records(run_dir / "codes" / "codes.lmdb"), store_checksum(run_dir / "codes" / "codes.lmdb")) == serial


def test_flipped_copies_follow_the_images(run_cfg):
    """``codes.hflip``: records N..2N-1 are the codes of the flipped images, the first N those of
    the plain store; the evaluation store is not doubled; the prior reads all 2N."""
    from vqgen.config import load_config
    from vqgen.data.datasets import build_dataset

    run_dir = run_cfg.run_dir
    run_single_stage(run_cfg, "extract-codes")
    plain = records(run_dir / "codes" / "codes.lmdb")
    flip_cfg = load_config(run_dir / "config.toml", ["codes.hflip=true"])
    run_single_stage(flip_cfg, "extract-codes")
    doubled = records(run_dir / "codes" / "codes.lmdb")
    assert len(doubled) == 60 and doubled[:30] == plain
    assert len(CodeDataset(run_dir / "codes" / "eval.lmdb")) == 6

    model, _, _ = load_model(run_dir / "vqvae")
    images = torch.stack([build_dataset(flip_cfg.data, "train")[i][0] for i in range(30)])
    with torch.no_grad():
        top, bottom = model.encode(images.flip(-1))
    assert [(t.tolist(), b.tolist(), r[2]) for t, b, r in zip(top, bottom, plain)] == doubled[30:]
    assert doubled[30:] != plain  # the flipped images' codes are other codes
    run_single_stage(flip_cfg, "train-prior-bottom")


def test_switching_export_best_off_exports_the_last_weights(run_cfg):
    """``train.export_best`` switched off after training: the stage continues from its last
    checkpoint and exports that step's weights, not the best ones it kept before."""
    from safetensors.torch import load_file

    from vqgen.config import load_config
    from vqgen.manifest import read_manifest

    run_dir = run_cfg.run_dir
    run_single_stage(run_cfg, "extract-codes")
    sets = ["prior.top.train.eval_every=1", "prior.top.train.lr=0.05"]
    run_single_stage(load_config(run_dir / "config.toml", sets), "train-prior-top")
    stage_dir = run_dir / "prior-top"
    best = read_manifest(stage_dir)["outputs"]["exported_step"]
    assert 1 <= best < 8  # a step before the last, so that the switch has something to change
    run_single_stage(load_config(run_dir / "config.toml", [*sets, "prior.top.train.export_best=false"]), "train-prior-top")
    assert read_manifest(stage_dir)["outputs"]["exported_step"] == 8
    last = load_file(str(stage_dir / "checkpoints" / "step-00000008" / "model.safetensors"))
    exported = load_file(str(stage_dir / "model.safetensors"))
    assert exported.keys() == last.keys() and all(torch.equal(exported[k], last[k]) for k in last)
