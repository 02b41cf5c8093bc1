"""The LMDB code store: format, map growth, finalize checks, readers in workers, two writers."""

import copy
import json
import math
import multiprocessing
import re

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vqgen.data.code_dataset import CodeDataset
from vqgen.data.code_format import CodeLevel, index_key, make_meta
from vqgen.data.code_inspection import format_inspection, inspect_store
from vqgen.data.code_readers import read_store_meta
from vqgen.data.code_writer import CodeStoreWriter
from vqgen.errors import DataError

LEVELS = [CodeLevel("top", (2, 2), 8), CodeLevel("bottom", (4, 4), 16)]


def random_codes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    top = rng.integers(0, 8, (n, 2, 2))
    bottom = rng.integers(0, 16, (n, 4, 4))
    labels = rng.integers(0, 3, n)
    return top, bottom, labels


def write_store(path, n: int, seed: int = 0, finalize: bool = True, skip=(), **writer_kwargs):
    top, bottom, labels = random_codes(n, seed)
    keep = [i for i in range(n) if i not in skip]
    with CodeStoreWriter(path, **writer_kwargs) as writer:
        writer.write_meta(make_meta(LEVELS, num_classes=3, source_checksum="sha-of-vqvae"))
        writer.put_batch(keep, [top[keep], bottom[keep]], labels[keep])
        if finalize:
            writer.finalize(n)
    return top, bottom, labels


def raw_records(path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor().iternext())
    finally:
        env.close()


def test_round_trip_and_byte_layout(tmp_path):
    path = tmp_path / "codes.lmdb"
    top, bottom, labels = write_store(path, 10, commit_every=3)
    ds = CodeDataset(path)
    assert len(ds) == 10 and ds.levels == ("top", "bottom") and ds.num_classes == 3
    assert ds.shapes == {"top": (2, 2), "bottom": (4, 4)} and ds.num_codes == {"top": 8, "bottom": 16}
    for i in range(10):
        item = ds[i]
        assert item["top"].dtype == torch.int64 and item["label"] == labels[i]
        assert torch.equal(item["top"], torch.from_numpy(top[i]))
        assert torch.equal(item["bottom"], torch.from_numpy(bottom[i]))
    ds.close()  # LMDB allows one handle per store and process: release it for the raw check
    # The documented layout: int16 LE top, int16 LE bottom, int32 LE label; meta as JSON.
    records = raw_records(path)
    expected = (top[2].astype("<i2").tobytes() + bottom[2].astype("<i2").tobytes()
                + np.int32(labels[2]).astype("<i4").tobytes())
    assert records[b"000000002"] == expected
    meta = json.loads(records[b"__meta__"])
    assert meta["count"] == 10 and meta["complete"] is True and meta["dtype"] == "<i2"
    assert meta["levels"][1] == {"name": "bottom", "shape": [4, 4], "num_codes": 16}
    assert len(records) == 11
    with pytest.raises(IndexError):
        ds[10]
    assert ds[9]["label"] == labels[9]  # reopened after close


def test_single_puts_tensors_and_missing_labels(tmp_path):
    path = tmp_path / "codes.lmdb"
    with CodeStoreWriter(path) as writer:
        # A plain dict works too: format fields are filled in, extra keys are kept.
        levels = [level.to_json() for level in LEVELS]
        writer.write_meta({"levels": levels, "num_classes": 0, "source_checksum": "", "image_size": 16})
        writer.put(1, [torch.full((2, 2), 7), torch.zeros(4, 4, dtype=torch.int32)])
        writer.put_batch(torch.tensor([0]), [torch.ones(1, 2, 2), torch.ones(1, 4, 4)])
        writer.finalize(2)
    ds = CodeDataset(path)
    assert ds[0]["label"] == -1 and ds[1]["label"] == -1 and int(ds[1]["top"].sum()) == 28
    assert ds.meta["image_size"] == 16 and ds.meta["format_version"] == 1


def test_bad_codes_are_refused(tmp_path):
    with CodeStoreWriter(tmp_path / "codes.lmdb") as writer:
        with pytest.raises(DataError, match="write_meta"):
            writer.put(0, [np.zeros((2, 2)), np.zeros((4, 4))])
        writer.write_meta(make_meta(LEVELS, num_classes=0, source_checksum=""))
        with pytest.raises(DataError, match="top codes must be in 0..7"):
            writer.put(0, [np.full((2, 2), 8), np.zeros((4, 4))])
        with pytest.raises(DataError, match="bottom codes have shape"):
            writer.put(0, [np.zeros((2, 2)), np.zeros((3, 4))])


def test_map_size_grows_instead_of_failing(tmp_path):
    path = tmp_path / "codes.lmdb"
    levels = [CodeLevel("top", (8, 8), 512), CodeLevel("bottom", (16, 16), 512)]
    rng = np.random.default_rng(0)
    bottom = rng.integers(0, 512, (300, 16, 16))  # 300 x 644 bytes: far more than 32 KiB
    with CodeStoreWriter(path, map_size=1 << 15, commit_every=50) as writer:
        writer.write_meta(make_meta(levels, num_classes=0, source_checksum=""))
        start = writer.map_size
        writer.put_batch(np.arange(300), [bottom[:, ::2, ::2], bottom], None)
        writer.finalize(300)
        assert writer.map_size > start
    ds = CodeDataset(path)
    assert torch.equal(ds[299]["bottom"], torch.from_numpy(bottom[299]))


def test_finalize_with_a_missing_index_fails(tmp_path):
    path = tmp_path / "codes.lmdb"
    with pytest.raises(DataError, match=r"1 missing \(first: \[4\]\)"):
        write_store(path, 10, skip={4})
    with CodeStoreWriter(path) as writer:
        with pytest.raises(DataError, match=r"1 missing \(first: \[4\]\); 2 beyond the count \(first: \[8, 9\]\)"):
            writer.finalize(8)
    with pytest.raises(DataError, match="extraction did not finish"):
        CodeDataset(path)  # the failed finalize left the store incomplete


def test_incomplete_store_is_refused(tmp_path):
    path = tmp_path / "codes.lmdb"
    write_store(path, 5, finalize=False)
    with pytest.raises(DataError, match="incomplete: extraction did not finish"):
        CodeDataset(path)
    with pytest.raises(DataError, match="code store not found"):
        CodeDataset(tmp_path / "elsewhere.lmdb")
    assert read_store_meta(tmp_path / "elsewhere.lmdb") is None  # "nothing to resume"
    assert read_store_meta(path)["complete"] is False


def test_resume_skips_existing_and_drops_duplicates(tmp_path):
    path = tmp_path / "codes.lmdb"
    top, bottom, labels = write_store(path, 6, finalize=False, skip={3, 4, 5})
    with CodeStoreWriter(path) as writer:
        assert writer.existing_indices() == {0, 1, 2}
        # A padded last batch repeats index 0 with different content: the stored one is kept.
        writer.put_batch([3, 4, 5, 0], [np.concatenate([top[3:], top[:1] * 0 + 1]),
                                        np.concatenate([bottom[3:], bottom[:1]])], [*labels[3:], 2])
        writer.flush()
        assert writer.num_written == 3 and writer.num_duplicates == 1
        writer.finalize(6)
    ds = CodeDataset(path)
    assert torch.equal(ds[0]["top"], torch.from_numpy(top[0])) and ds[0]["label"] == labels[0]


def test_store_from_another_vqvae_is_refused(tmp_path):
    path = tmp_path / "codes.lmdb"
    write_store(path, 3, finalize=False)
    with CodeStoreWriter(path) as writer:
        with pytest.raises(DataError, match="source_checksum"):
            writer.write_meta(make_meta(LEVELS, num_classes=3, source_checksum="another-vqvae"))


def test_wrong_record_size_names_the_key(tmp_path):
    path = tmp_path / "codes.lmdb"
    write_store(path, 5)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(index_key(3), b"\x00" * 10)
    env.close()
    ds = CodeDataset(path)
    assert ds[2]["top"].shape == (2, 2)
    with pytest.raises(DataError, match="record 000000003 has 10 bytes, expected 44"):
        ds[3]
    ds.close()
    with pytest.raises(DataError, match="000000003"):
        inspect_store(path)


def test_dataloader_workers_open_lazily(tmp_path):
    path = tmp_path / "codes.lmdb"
    top, _, labels = write_store(path, 12)
    ds = CodeDataset(path)
    assert ds._env is None  # nothing opened at construction
    assert ds[5]["label"] == labels[5]  # open in this process before the workers fork
    clone = copy.deepcopy(ds)  # what a spawned worker receives: the handle is not carried along
    assert clone._env is None and clone[5]["label"] == labels[5]
    second = CodeDataset(path)  # a second reader of the same store in this process
    assert second[6]["label"] == labels[6]
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b["top"] for b in batches]), torch.from_numpy(top))
    assert torch.cat([b["label"] for b in batches]).tolist() == labels.tolist()
    assert inspect_store(path)["records"] == 12  # inspection while readers are open


def _write_part(path: str, rank: int, world: int, n: int) -> None:
    """One rank of a two-process extraction: indices rank, rank+world, ...; padded like DistributedSampler."""
    top, bottom, labels = random_codes(n)
    mine = list(range(rank, n, world))
    mine += list(range(math.ceil(n / world) - len(mine)))  # short ranks repeat the first indices
    with CodeStoreWriter(path, map_size=1 << 13, commit_every=4) as writer:
        for start in range(0, len(mine), 3):
            chunk = mine[start : start + 3]
            writer.put_batch(chunk, [top[chunk], bottom[chunk]], labels[chunk])


def test_two_processes_write_one_store(tmp_path):
    n = 61  # odd: rank 1 gets a padded duplicate of index 0
    parallel, single = tmp_path / "parallel.lmdb", tmp_path / "single.lmdb"
    with CodeStoreWriter(parallel, map_size=1 << 13) as writer:  # rank 0 writes the meta first
        writer.write_meta(make_meta(LEVELS, num_classes=3, source_checksum="sha-of-vqvae"))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_part, args=(str(parallel), rank, 2, n)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    with CodeStoreWriter(parallel) as writer:  # after the barrier, rank 0 finalizes
        assert writer.finalize(n)["count"] == n
        assert writer.map_size > 1 << 13  # the ranks grew the map while writing
    write_store(single, n)
    parallel_records, single_records = raw_records(parallel), raw_records(single)
    assert len(parallel_records) == n + 1
    assert {k: v for k, v in parallel_records.items() if k != b"__meta__"} == \
        {k: v for k, v in single_records.items() if k != b"__meta__"}


def test_inspect_store_on_a_known_store(tmp_path):
    path = tmp_path / "codes.lmdb"
    levels = [CodeLevel("top", (1, 2), 4), CodeLevel("bottom", (1, 1), 8)]
    top = np.array([[[0, 1]], [[0, 0]], [[2, 2]]])  # code counts 0:3, 1:1, 2:2
    bottom = np.array([[[5]], [[5]], [[5]]])
    with CodeStoreWriter(path) as writer:
        writer.write_meta(make_meta(levels, num_classes=2, source_checksum="abc"))
        writer.put_batch([0, 1, 2], [top, bottom], [1, 0, 1])
        writer.finalize(3)
    info = inspect_store(tmp_path)  # a codes stage directory is found too
    assert info["path"] == str(path) and info["records"] == 3 and info["count"] == 3 and info["complete"]
    assert info["label_counts"] == {0: 1, 1: 2}
    top_info, bottom_info = info["levels"]
    assert top_info["used"] == 3 and top_info["usage_fraction"] == 0.75
    p = np.array([3, 1, 2]) / 6
    assert math.isclose(top_info["perplexity"], math.exp(-(p * np.log(p)).sum()))
    assert bottom_info["used"] == 1 and bottom_info["perplexity"] == 1.0
    text = format_inspection(info)
    assert "3 (75.0%)" in text and "1 (12.5%)" in text and "complete" in text and "abc" in text


@pytest.mark.parametrize("change, field", [
    ({"format_version": 2}, "'format_version' is 2; this version reads 1"),
    ({"count": -1}, "'count' must be an int >= 0"),
    ({"complete": "yes"}, "'complete' expected bool"),
    ({"levels": []}, "'levels' must be a non-empty list"),
    ({"levels": [{"name": "label", "shape": [2, 2], "num_codes": 8}]}, r"'levels\[0\]\.name' must be a non-empty"),
    ({"levels": [{"name": "top", "shape": [2, 2, 1], "num_codes": 8}]}, r"'levels\[0\]\.shape' must be \[H, W\]"),
    ({"levels": [{"name": "top", "shape": [2, 2]}]}, r"'levels\[0\]\.num_codes' is missing"),
])
def test_bad_metadata_names_the_store_and_the_field(tmp_path, change, field):
    path = tmp_path / "codes.lmdb"
    write_store(path, 2)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", json.dumps({**json.loads(txn.get(b"__meta__")), **change}).encode())
    env.close()
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: metadata field {field}"):
        read_store_meta(path)
