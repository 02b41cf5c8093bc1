"""Tar shards (``data.kind = "shards"``, ``vqgen data pack`` / ``index`` / ``verify``): the format,
packing each source kind, reading by offset (local and over HTTP), the shard-window training
order across processes and resumes, and the errors that name what is wrong."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tiny_pipeline import TINY_PIPELINE
from vqgen.configtools import from_dict
from vqgen.data.datasets import DataConfig, build_dataset, check_data_root
from vqgen.data.shards import INDEX_JSON, ShardWindowSampler, check_shards, index_webdataset, pack
from vqgen.errors import ConfigError, DataError

SCRIPTS = Path(__file__).parent / "scripts"


# --- sources -----------------------------------------------------------------------------------


def write_npz(path: Path, n_train: int = 25, n_test: int = 6, side: int = 8, grey_test: bool = True,
              labels: np.ndarray | None = None) -> Path:
    """Random colour train images and (by default grey) test images, labels 0..3 (or ``labels``)."""
    rng = np.random.default_rng(0)
    test_shape = (n_test, side, side) if grey_test else (n_test, side, side, 3)
    np.savez(path, train_images=rng.integers(0, 256, (n_train, side, side, 3), dtype=np.uint8),
             train_labels=np.arange(n_train) % 4 if labels is None else labels,
             test_images=rng.integers(0, 256, test_shape, dtype=np.uint8), test_labels=np.arange(n_test) % 4)
    return path


def save_image(path: Path, seed: int, fmt: str | None = None, size=(10, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def write_folder(root: Path) -> Path:
    """Two classes with PNG and JPEG files, and an eval/ split."""
    for i in range(5):
        save_image(root / "cats" / f"{i}.png", i)
        save_image(root / "dogs" / f"{i}.jpg", 10 + i, "JPEG")
    save_image(root / "dogs" / "deep" / "x.png", 20)
    for i in range(2):
        save_image(root / "eval" / "cats" / f"{i}.png", 30 + i)
        save_image(root / "eval" / "dogs" / f"{i}.jpg", 40 + i, "JPEG")
    return root


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_root(root: Path, n: int = 7) -> Path:
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        write_idx(root / "raw" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 12, 12)), 2051)
        write_idx(root / "raw" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    return root


def packed(source: Path, out: Path, **options) -> Path:
    pack(source, out, progress=False, **options)
    return out


def assert_same_items(expected, got) -> None:
    assert len(got) == len(expected)
    assert got.class_names == expected.class_names and got.num_classes == expected.num_classes
    for i in range(len(expected)):
        (a, label_a), (b, label_b) = expected[i], got[i]
        assert label_a == label_b and torch.equal(a, b), i


def shard_files(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


# --- the sampler -------------------------------------------------------------------------------


def test_sampler_is_a_permutation_per_epoch_in_windows_of_shards():
    counts = [5, 3, 0, 7, 4, 6, 2]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shard_of = np.repeat(np.arange(len(counts)), counts)
    sampler = ShardWindowSampler(counts, window_shards=2, seed=3)
    assert len(sampler) == sum(counts)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(sum(counts)))
        orders.append(order)
        again = ShardWindowSampler(counts, window_shards=2, seed=3)
        again.set_epoch(epoch)
        assert list(again) == order  # a function of (seed, epoch): the same in every process
        # Consecutive runs of items come from two shards at a time: each window is the items of
        # its shards, contiguous in the order.
        shards_in_order = shard_of[order]
        seen: list[set[int]] = []
        position = 0
        while position < len(order):
            window = set()
            while position < len(order) and (len(window) < 2 or shards_in_order[position] in window):
                window.add(int(shards_in_order[position]))
                position += 1
            seen.append(window)
        assert all(len(w) <= 2 for w in seen) and len(seen) <= 4  # 6 non-empty shards, 2 at a time
        for window in seen:  # a window holds every item of its shards
            items = {i for i in order if shard_of[i] in window}
            assert all(items >= set(range(starts[s], starts[s] + counts[s])) for s in window)
    assert orders[0] != orders[1] != orders[2]
    assert list(ShardWindowSampler(counts, 2, seed=4)) != orders[0]
    with pytest.raises(ValueError):
        ShardWindowSampler(counts, 0, seed=0)


def test_the_dataset_offers_its_sampler_and_the_train_loader_uses_it(tmp_path):
    from accelerate import Accelerator

    from vqgen.train import TrainConfig, _train_loader

    out = packed(write_npz(tmp_path / "d.npz", n_train=30), tmp_path / "out", shard_size=10)
    full = build_dataset(DataConfig(kind="shards", root=str(out), image_size=8), "train")
    sampler = full.train_sampler(0)
    assert isinstance(sampler, ShardWindowSampler) and sampler.counts.tolist() == [10, 10, 10]
    part = build_dataset(DataConfig(kind="shards", root=str(out), image_size=8, num_train=15), "train")
    assert part.train_sampler(0).counts.tolist() == [10, 5, 0]  # the first 15 items only
    assert sorted(part.train_sampler(0)) == list(range(15))
    loader = _train_loader(full, TrainConfig(batch_size=4), Accelerator(cpu=True))
    assert isinstance(loader.sampler, ShardWindowSampler)
    npz = build_dataset(DataConfig(kind="npz", root=str(tmp_path / "d.npz"), image_size=8), "train")
    assert npz.train_sampler(0) is None  # other kinds: a uniform shuffle, as before


# --- packing each source kind ------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
def test_npz_round_trip(tmp_path, channels):
    source = write_npz(tmp_path / "d.npz")
    out = packed(source, tmp_path / "out", shard_size=10)
    for split in ("train", "eval"):
        assert_same_items(build_dataset(DataConfig(kind="npz", root=str(source), image_size=8, channels=channels), split),
                          build_dataset(DataConfig(kind="shards", root=str(out), image_size=8, channels=channels), split))
    index = json.loads((out / INDEX_JSON).read_text())
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [10, 10, 5]
    assert index["splits"]["eval"]["count"] == 6 and index["convert"] is False


def test_npz_single_array_keeps_the_holdout_and_unlabelled_items(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", images=images)
    out = packed(tmp_path / "one.npz", tmp_path / "out", shard_size=7)
    for split in ("train", "eval"):
        expected = build_dataset(DataConfig(kind="npz", root=str(tmp_path / "one.npz"), image_size=8), split)
        got = build_dataset(DataConfig(kind="shards", root=str(out), image_size=8), split)
        assert_same_items(expected, got)
        assert got[0][1] == -1
    with tarfile.open(out / "train-000000.tar") as tar:
        assert not any(name.endswith(".cls") for name in tar.getnames())  # no labels, no .cls members


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_round_trip_keeps_the_files_and_labels(tmp_path, channels):
    source = write_folder(tmp_path / "images")
    out = packed(source, tmp_path / "out", shard_size=4)
    for split in ("train", "eval"):
        expected = build_dataset(DataConfig(kind="folder", root=str(source), image_size=8, channels=channels), split)
        got = build_dataset(DataConfig(kind="shards", root=str(out), image_size=8, channels=channels), split)
        assert_same_items(expected, got)
    assert got.class_names == ("cats", "dogs")
    # WebDataset members: the files byte for byte under KEY.<their extension>, and KEY.cls.
    folder_files = build_dataset(DataConfig(kind="folder", root=str(source), image_size=8), "train").source.files
    rows = np.load(out / "train-index.npy", allow_pickle=False)
    with tarfile.open(out / "train-000001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == ["000000004.png", "000000004.cls", "000000005.jpg", "000000005.cls"]
        assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == "" and m.mode == 0o644
                   for m in members)
        jpeg = members[2]
        assert tar.extractfile(jpeg).read() == folder_files[5].read_bytes()
        assert tar.extractfile(members[3]).read() == b"1"
        assert rows[5].tolist() == [1, jpeg.offset_data, jpeg.size, 1]


def test_folder_corrupt_file_is_named_or_skipped(tmp_path):
    source = write_folder(tmp_path / "images")
    (source / "cats" / "9broken.png").write_bytes(b"not a png at all")
    reports = pack(source, tmp_path / "out", on_corrupt="skip", progress=False)
    assert reports["train"].skipped == 1 and reports["train"].images == 11
    expected = build_dataset(DataConfig(kind="folder", root=str(source), image_size=8, on_corrupt="skip"), "train")
    assert_same_items(expected, build_dataset(DataConfig(kind="shards", root=str(tmp_path / "out"), image_size=8), "train"))
    before = shard_files(tmp_path / "out")
    with pytest.raises(DataError, match="9broken.png.*on_corrupt"):
        pack(source, tmp_path / "out", progress=False)
    assert shard_files(tmp_path / "out") == before  # refused before anything was touched
    with pytest.raises(DataError, match="9broken.png"):
        pack(source, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_torchvision_raw_idx_round_trip(tmp_path):
    source = write_mnist_root(tmp_path / "mnist")
    with pytest.raises(DataError, match="--kind"):
        pack(source / "raw" / "train-images-idx3-ubyte.gz", tmp_path / "out", progress=False)
    out = packed(source, tmp_path / "out", kind="mnist", shard_size=3)
    for split in ("train", "eval"):
        assert_same_items(build_dataset(DataConfig(kind="mnist", root=str(source), image_size=16), split),
                          build_dataset(DataConfig(kind="shards", root=str(out), image_size=16), split))


def test_packing_is_deterministic_and_a_repack_rewrites_the_same_bytes(tmp_path):
    source = write_folder(tmp_path / "images")
    first, second = packed(source, tmp_path / "a", shard_size=4), packed(source, tmp_path / "b", shard_size=4)
    assert shard_files(first) == shard_files(second)
    npz = write_npz(tmp_path / "d.npz")
    assert shard_files(packed(npz, tmp_path / "c")) == shard_files(packed(npz, tmp_path / "d"))
    # Again into the same folder: rewritten, the same bytes; with fewer shards the extra ones go.
    before = shard_files(first)
    assert shard_files(packed(source, first, shard_size=4)) == before
    packed(source, first, shard_size=100)
    assert sorted(p.name for p in first.glob("*.tar")) == ["eval-000000.tar", "train-000000.tar"]


def test_pack_refuses_a_folder_holding_anything_else(tmp_path):
    npz = write_npz(tmp_path / "d.npz")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="busy is not empty and is not a vqgen pack .it holds notes.txt"):
        pack(npz, tmp_path / "busy", progress=False)
    out = packed(npz, tmp_path / "out")
    with pytest.raises(DataError, match="already holds a pack of another source .npz .*d.npz"):
        pack(write_folder(tmp_path / "images"), out, progress=False)
    # An interrupted pack (shards, a temporary file, no index.json) is taken over.
    (out / INDEX_JSON).unlink()
    (out / ".train-000001.tar.abcd1234.tmp").write_bytes(b"half")
    packed(npz, out)
    assert not list(out.glob(".*.tmp")) and (out / INDEX_JSON).is_file()


# --- WebDataset folders made elsewhere ---------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _png(seed: int) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), pixels


def test_index_a_webdataset_folder(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    images = {}
    with tarfile.open(folder / "train-0.tar", "w") as tar:  # tar's default format: PAX headers
        for i, key in enumerate(["s/a", "s/b", "c"]):
            data, images[key] = _png(i)
            _add(tar, f"{key}.cls", str(i + 2).encode())  # the label before the image
            _add(tar, f"{key}.png", data)
            _add(tar, f"{key}.json", b"{}")
        _add(tar, "orphan.txt", b"no image")
    with tarfile.open(folder / "val-0.tar", "w") as tar:
        data, images["v"] = _png(9)
        _add(tar, "v.seg.png", data)  # extension "seg.png" is not an image extension...
        _add(tar, "v.jpg", data)  # ... "jpg" is (PIL reads the PNG inside all the same)
    (folder / "notes.tar").write_bytes(b"")  # neither train nor eval by its name: left out
    reports = index_webdataset(folder, progress=False)
    assert (reports["train"].images, reports["eval"].images) == (3, 1)
    train = build_dataset(DataConfig(kind="shards", root=str(folder), image_size=8), "train")
    assert train.num_classes == 5 and [train[i][1] for i in range(3)] == [2, 3, 4]
    for i, key in enumerate(["s/a", "s/b", "c"]):
        assert np.array_equal(train.source.load(i)[0], images[key])
    evaluation = build_dataset(DataConfig(kind="shards", root=str(folder), image_size=8), "eval")
    assert np.array_equal(evaluation.source.load(0)[0], images["v"]) and evaluation[0][1] == -1
    with pytest.raises(DataError, match="already complete"):
        index_webdataset(packed(write_npz(tmp_path / "d.npz"), tmp_path / "out"), progress=False)


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture
def npz_pack(tmp_path) -> Path:
    return packed(write_npz(tmp_path / "d.npz"), tmp_path / "out", shard_size=10)


def test_an_unfinished_pack_is_refused_naming_the_command(npz_pack):
    (npz_pack / INDEX_JSON).unlink()
    cfg = DataConfig(kind="shards", root=str(npz_pack), image_size=8)
    for call in (lambda: check_data_root(cfg), lambda: build_dataset(cfg, "train")):
        with pytest.raises(DataError, match=f"out has no index.json.*vqgen data pack SOURCE {npz_pack}"):
            call()
    with pytest.raises(DataError, match="data root not found: .*nowhere"):
        check_data_root(DataConfig(kind="shards", root=str(npz_pack / "nowhere")))


def test_a_truncated_or_changed_shard_is_named(npz_pack):
    shard = npz_pack / "train-000001.tar"
    data = shard.read_bytes()
    cfg = DataConfig(kind="shards", root=str(npz_pack), image_size=8)
    dataset = build_dataset(cfg, "train")
    shard.write_bytes(data[:5000])
    with pytest.raises(DataError, match=f"shard {shard} has 5000 bytes, index.json says {len(data)}"):
        build_dataset(cfg, "train")
    with pytest.raises(DataError, match=f"shard {shard} ends inside an image"):
        dataset[19]  # opened before it was cut: the read comes up short
    # The same size, other bytes: only the checksum sees it (vqgen data verify).
    shard.write_bytes(data[:-1] + b"x")
    check_shards(npz_pack)
    with pytest.raises(DataError, match=f"shard {shard} has sha256 .* index.json says"):
        check_shards(npz_pack, checksums=True)
    done = subprocess.run([sys.executable, "-m", "vqgen", "data", "verify", str(npz_pack)], capture_output=True, text=True)
    assert done.returncode == 2 and "train-000001.tar has sha256" in done.stderr


def test_a_member_that_does_not_decode_is_named_or_skipped(npz_pack):
    rows = np.load(npz_pack / "train-index.npy")
    shard_number, offset, size, _ = rows[12]
    shard = npz_pack / f"train-{shard_number:06d}.tar"
    data = bytearray(shard.read_bytes())
    data[offset + 40:offset + size] = bytes(size - 40)  # the PNG's data zeroed: same size, no decode
    shard.write_bytes(bytes(data))
    cfg = DataConfig(kind="shards", root=str(npz_pack), image_size=8)
    with pytest.raises(DataError, match=f"cannot decode image 000000012.png in shard {shard}"):
        build_dataset(cfg, "train")[12]
    skipping = build_dataset(DataConfig(kind="shards", root=str(npz_pack), image_size=8, on_corrupt="skip"), "train")
    with pytest.warns(RuntimeWarning, match="000000012.png"):
        image, label = skipping[12]
    assert label == 13 % 4 and torch.equal(image, skipping[13][0])  # the next item in its place


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^kind: expected one of \[.*'shards'\], got 'shard'"):
        from_dict(DataConfig, {"kind": "shard", "root": "x"})
    with pytest.raises(ConfigError, match="^shuffle_window"):
        from_dict(DataConfig, {"kind": "shards", "root": "x", "shuffle_window": 4})
    with pytest.raises(ConfigError, match="^shuffle_window_shards: must be >= 1"):
        DataConfig(kind="shards", root="x", shuffle_window_shards=0)
    with pytest.raises(ConfigError, match="^root"):
        DataConfig(kind="shards")


def test_a_missing_split_and_another_format_are_named(npz_pack):
    index = json.loads((npz_pack / INDEX_JSON).read_text())
    del index["splits"]["eval"]
    (npz_pack / INDEX_JSON).write_text(json.dumps(index))
    with pytest.raises(DataError, match="has no eval split .index.json lists train"):
        build_dataset(DataConfig(kind="shards", root=str(npz_pack), image_size=8), "eval")
    (npz_pack / INDEX_JSON).write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(DataError, match="version 99 of the shard format"):
        build_dataset(DataConfig(kind="shards", root=str(npz_pack), image_size=8), "train")


# --- URL roots ---------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/pack"


@pytest.fixture
def server(tmp_path) -> Iterator[_Server]:
    served = tmp_path / "served"
    served.mkdir()
    srv = _Server(served)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _url_cfg(server: _Server, cache: Path, **options) -> DataConfig:
    return DataConfig(kind="shards", root=server.url + "/", cache_dir=str(cache), image_size=8, **options)


def test_url_root_downloads_each_shard_once_and_verified(tmp_path, server):
    source = write_npz(tmp_path / "d.npz", n_train=30)
    packed(source, tmp_path / "served" / "pack", shard_size=10)
    cfg, cache = _url_cfg(server, tmp_path / "cache"), tmp_path / "cache"
    check_data_root(DataConfig(kind="shards", root="http://127.0.0.1:9/never-contacted"))
    remote = build_dataset(cfg, "train")
    assert sorted(server.requests) == ["/pack/eval-index.npy", "/pack/index.json", "/pack/train-index.npy"]
    server.requests.clear()
    # Two workers read every item: each shard is fetched once, then read from the cache.
    items = [x for batch in DataLoader(remote, batch_size=5, num_workers=2) for x in zip(*batch)]
    local = build_dataset(DataConfig(kind="npz", root=str(source), image_size=8), "train")
    assert all(torch.equal(image, local[i][0]) and label == local[i][1] for i, (image, label) in enumerate(items))
    assert sorted(server.requests) == [f"/pack/train-00000{i}.tar" for i in range(3)]
    assert shard_files(cache).keys() >= {"train-000000.tar", "index.json"} and not list(cache.glob(".*.part"))
    # Opened again (another stage): only index.json is asked for.
    server.requests.clear()
    again = build_dataset(cfg, "train")
    assert torch.equal(again[29][0], local[29][0]) and server.requests == ["/pack/index.json"]
    # The pack changes on the server: the cached shards whose checksum changed are fetched anew.
    other = write_npz(tmp_path / "other.npz", n_train=30, labels=np.arange(30) % 3)
    (tmp_path / "served" / "pack" / INDEX_JSON).unlink()
    for path in (tmp_path / "served" / "pack").iterdir():
        path.unlink()
    pack(other, tmp_path / "served" / "pack", shard_size=10, progress=False)
    changed = build_dataset(cfg, "train")
    assert [changed[i][1] for i in range(30)] == [i % 3 for i in range(30)]


def test_a_corrupted_served_shard_is_discarded_and_named(tmp_path, server):
    out = packed(write_npz(tmp_path / "d.npz", n_train=30), tmp_path / "served" / "pack", shard_size=10)
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    dataset = build_dataset(_url_cfg(server, tmp_path / "cache"), "train")
    assert dataset[0][0].shape == (3, 8, 8)  # shard 0 is fine
    with pytest.raises(DataError, match=f"{server.url}/train-000001.tar: the downloaded file's sha256 .* index.json says"):
        dataset[15]
    assert not (tmp_path / "cache" / "train-000001.tar").exists() and not list((tmp_path / "cache").glob(".*.part"))


def test_a_server_that_is_down_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket closes
    url = f"http://127.0.0.1:{port}/pack"
    with pytest.raises(DataError, match=f"cannot fetch {url}/index.json .*ConnectionRefused"):
        build_dataset(DataConfig(kind="shards", root=url, cache_dir=str(tmp_path / "cache")), "train")


def test_the_default_cache_is_per_url(tmp_path, monkeypatch, server):
    from vqgen.data.shards import default_cache_dir

    packed(write_npz(tmp_path / "d.npz"), tmp_path / "served" / "pack")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    build_dataset(DataConfig(kind="shards", root=server.url, image_size=8), "eval")[0]
    expected = tmp_path / "xdg" / "vqgen" / "shards" / hashlib.sha256(server.url.encode()).hexdigest()[:16]
    assert default_cache_dir(server.url + "/") == expected and (expected / "eval-000000.tar").is_file()


# --- training: processes, workers, resume ------------------------------------------------------


def test_three_processes_two_workers_see_each_item_once_per_epoch_and_resume_in_order(tmp_path):
    # 72 = 3 processes x batch 4 x 6 batches: drop_last drops nothing. Label = item index.
    source = write_npz(tmp_path / "d.npz", n_train=72, n_test=3, labels=np.arange(72))
    out = packed(source, tmp_path / "out", shard_size=8)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           str(SCRIPTS / "shard_epoch.py"), str(out), str(tmp_path), "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    epochs = []
    for epoch in (0, 1):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert [len(batches) for batches in per_rank] == [6, 6, 6]
        keys = [k for batches in per_rank for batch in batches for k in batch]
        assert sorted(keys) == list(range(72))  # every item exactly once over the three ranks
        # Rank r has global batches r, r + 3, ...: together, the sampler's order.
        epochs.append([k for i in range(6) for batches in per_rank for k in batches[i]])
    assert epochs[0] != epochs[1]
    sampler = ShardWindowSampler([8] * 9, window_shards=2, seed=0)
    for epoch, order in enumerate(epochs):
        sampler.set_epoch(epoch)
        assert order == list(sampler)
    for r in ranks:  # a new loader resumed at batch 2 of epoch 1 gives that epoch's remaining batches
        assert r["resumed"] == r["epochs"][1][2:]


def test_fit_on_shards_resumes_bit_exactly(tmp_path):
    from vqgen.evaluation import vqvae_loss
    from vqgen.models.quantize import QuantizerConfig
    from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig
    from vqgen.train import TrainConfig, fit, make_accelerator
    from vqgen.utils import read_json

    out = packed(write_npz(tmp_path / "d.npz", n_train=40, side=16), tmp_path / "out", shard_size=8)
    data = DataConfig(kind="shards", root=str(out), image_size=16, shuffle_window_shards=2)
    model_cfg = VQVAEConfig(hidden_channels=8, res_channels=4, num_res_blocks=1,
                            quantizer=QuantizerConfig(num_codes=16, code_dim=4))

    class Interrupted(Exception):
        pass

    def train(stage_dir: Path, die_after: int | None = None) -> VQVAE2:
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            if die_after is not None and calls["n"] > die_after:
                raise Interrupted  # like a process killed in the middle of a step
            return vqvae_loss(model, batch)

        cfg = TrainConfig(steps=9, batch_size=8, checkpoint_every=2, log_every=1, eval_every=0, image_every=0,
                          num_workers=2)
        torch.manual_seed(0)
        model = VQVAE2(model_cfg)
        accelerator = make_accelerator(stage_dir, tracker="none", seed=0)
        fit(model, build_dataset(data, "train"), cfg, accelerator, stage_dir, loss_fn)
        return model

    reference = train(tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(tmp_path / "killed", die_after=7)
    checkpoints = tmp_path / "killed" / "checkpoints"
    loop = read_json(checkpoints / read_json(checkpoints / "latest.json")["name"] / "train_state.json")["loop"]
    assert (loop["step"], loop["epoch"], loop["batch_in_epoch"]) == (6, 1, 1)  # mid-epoch, 5 batches an epoch
    resumed = train(tmp_path / "killed")
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# --- the command -------------------------------------------------------------------------------


def test_pack_command_then_a_training_stage_on_the_shards(tmp_path):
    source = write_npz(tmp_path / "d.npz", n_train=24, n_test=8, side=16)
    vqgen = [sys.executable, "-m", "vqgen"]
    done = subprocess.run([*vqgen, "data", "pack", str(source), str(tmp_path / "out"), "--shard-size", "10"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        f"{tmp_path / 'out'}: train 24 images in 3 shards ({sum((tmp_path / 'out' / f'train-00000{i}.tar').stat().st_size for i in range(3)):,} "
        f"bytes); eval 8 images in 1 shard ({(tmp_path / 'out' / 'eval-000000.tar').stat().st_size:,} bytes)")
    sets = [f"run.out_dir={tmp_path / 'runs'}", "run.name=tiny", "run.tracker=none", "data.kind=shards",
            f"data.root={tmp_path / 'out'}", "data.shuffle_window_shards=2", "vqvae.train.steps=2",
            "vqvae.train.num_workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*vqgen, "stage", "train-vqvae", str(TINY_PIPELINE), *(x for s in sets for x in ("--set", s))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "tiny" / "vqvae" / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == 2
    (tmp_path / "out" / INDEX_JSON).unlink()
    done = subprocess.run([*vqgen, "stage", "train-vqvae", str(TINY_PIPELINE), *(x for s in sets for x in ("--set", s))],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "has no index.json" in done.stderr and "vqgen data pack" in done.stderr
