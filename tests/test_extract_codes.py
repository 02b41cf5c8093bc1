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
