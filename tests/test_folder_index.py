"""The cached header checks of an image folder (vqgen.data.folder_index)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vqgen.data.datasets as datasets
from vqgen.data.datasets import DataConfig, FolderSource, build_dataset
from vqgen.data.folder_index import ROOT_INDEX_NAME, index_locations
from vqgen.errors import DataError


def _save(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(24):
        _save(root / f"class{i % 3}" / ("deep" if i % 5 == 0 else "") / f"{i:02d}.png", i)
    for i in range(6):
        _save(root / "test" / f"class{i % 3}" / f"t{i}.png", 100 + i)
    (root / "class1" / "bad.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def checks(monkeypatch) -> list[Path]:
    """The files whose header was checked (opened), in order."""
    seen: list[Path] = []
    real = datasets.check_image_file

    def counting(path: Path) -> str | None:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(datasets, "check_image_file", counting)
    return seen


def _build(root: Path, split="train", on_corrupt="skip", **kwargs) -> FolderSource:
    return FolderSource(root, split, on_corrupt, "RGB", **kwargs)


def _same(a: FolderSource, b: FolderSource) -> None:
    assert a.files == b.files and a.labels == b.labels and a.class_names == b.class_names
    assert a.skip_reasons == b.skip_reasons and a.skipped == b.skipped


@pytest.mark.parametrize("split", ["train", "eval"])
def test_second_build_opens_no_file_and_equals_uncached(folder, checks, split):
    uncached = _build(folder, split, use_index=False)
    checks.clear()
    cold = _build(folder, split)
    assert len(checks) == len(uncached.files) + len(uncached.skipped)
    assert (folder / ROOT_INDEX_NAME).is_file()  # the default place: the (writable) data root
    checks.clear()
    warm = _build(folder, split)
    assert checks == []
    _same(cold, uncached)
    _same(warm, uncached)
    assert ROOT_INDEX_NAME not in {p.name for p in warm.files}  # hidden: never listed as an image


def test_one_index_serves_both_splits_and_build_dataset(folder, checks):
    build_dataset(DataConfig(kind="folder", root=str(folder), image_size=8, on_corrupt="skip"), "train")
    build_dataset(DataConfig(kind="folder", root=str(folder), image_size=8, on_corrupt="skip"), "eval")
    checks.clear()
    for split in ("train", "eval"):
        ds = build_dataset(DataConfig(kind="folder", root=str(folder), image_size=8, on_corrupt="skip"), split)
        assert ds[0][0].shape == (3, 8, 8)
    assert checks == []


def test_added_removed_and_touched_files_are_noticed(folder, checks):
    _build(folder)
    added = folder / "class0" / "new.png"
    _save(added, 7)
    checks.clear()
    assert added in _build(folder).files and checks == [added]  # only the new file is opened

    removed = folder / "class2" / "02.png"
    removed.unlink()
    checks.clear()
    assert removed not in _build(folder).files and checks == []

    touched = folder / "class0" / "03.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    checks.clear()
    _build(folder)
    assert checks == [touched]

    # A file broken in place (same size, new mtime) gets a fresh verdict, not the old "good".
    data = touched.read_bytes()
    touched.write_bytes(b"\0" * len(data))
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    source = _build(folder)
    assert touched in source.skipped
    _same(source, _build(folder, use_index=False))


@pytest.mark.parametrize("damage", [b"", b"garbage", b"PK\x03\x04 not really a zip"])
def test_corrupt_index_is_rebuilt(folder, checks, damage):
    uncached = _build(folder, use_index=False)
    _build(folder)
    (folder / ROOT_INDEX_NAME).write_bytes(damage)
    checks.clear()
    _same(_build(folder), uncached)
    assert len(checks) == len(uncached.files) + len(uncached.skipped)  # checked afresh
    checks.clear()
    _build(folder)
    assert checks == []  # and written again


def test_corrupt_image_still_raises_or_is_skipped_on_a_warm_index(folder, checks):
    with pytest.raises(DataError, match=r"bad\.png"):
        _build(folder, on_corrupt="error")  # cold: found while building the index
    cold = _build(folder)
    checks.clear()
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*bad\.png") as warm_error:
        _build(folder, on_corrupt="error")
    warm = _build(folder)
    assert [p.name for p in warm.skipped] == ["bad.png"] and warm.skip_reasons == cold.skip_reasons
    ds = build_dataset(DataConfig(kind="folder", root=str(folder), image_size=8, on_corrupt="skip"), "train")
    assert ds.num_skipped == 1 and ds.skipped_summary().startswith("skipped 1 corrupt image file (e.g. class1/bad.png: ")
    assert checks == []  # all from the index
    with pytest.raises(DataError) as uncached_error:
        _build(folder, on_corrupt="error", use_index=False)
    assert str(warm_error.value) == str(uncached_error.value)  # the same message, reason included


def test_limit_checks_only_what_it_needs_and_later_builds_extend_the_index(folder, checks):
    _build(folder, limit=3)
    assert len(checks) == 3
    checks.clear()
    full = _build(folder)
    assert len(checks) == len(full.files) + len(full.skipped) - 3
    checks.clear()
    assert _build(folder, limit=5).files == full.files[:5] and checks == []


def test_cache_dir_and_unwritable_root_fallback(folder, checks, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _build(folder, cache_dir=cache)
    assert [p.parent for p in cache.iterdir()] == [cache] and not (folder / ROOT_INDEX_NAME).exists()
    checks.clear()
    _build(folder, cache_dir=cache)
    assert checks == []

    # A read-only data root: the per-user cache under $XDG_CACHE_HOME.
    monkeypatch.setattr("vqgen.data.folder_index.os.access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (location,) = index_locations(folder)
    assert location.parent == tmp_path / "xdg" / "vqgen" / "folder-index"
    _build(folder)
    assert location.is_file() and not (folder / ROOT_INDEX_NAME).exists()


def test_unwritable_everywhere_still_builds(folder, checks, monkeypatch):
    def refuse(path, data):
        raise OSError("read-only")

    monkeypatch.setattr("vqgen.data.folder_index.atomic_write_bytes", refuse)
    _same(_build(folder), _build(folder, use_index=False))
