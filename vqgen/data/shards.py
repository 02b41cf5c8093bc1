"""WebDataset-style tar shards: packing a dataset into them (``vqgen data pack``), indexing shards
made elsewhere (``vqgen data index``), reading them by offset (``data.kind = "shards"``), and the
training order that reads a few shards at a time.

A pack folder holds::

    train-000000.tar, train-000001.tar, ...   each sample: members KEY.png (or the packed file's own
    eval-000000.tar, ...                      extension, e.g. KEY.jpg) and KEY.cls (the label, ASCII)
    train-index.npy, eval-index.npy           int64 [N, 4]: shard number, offset of the image's data
                                              in that tar, its size, label (-1: none)
    index.json                                written last: classes, and per split the shards with
                                              their item counts, sizes and sha256

KEY is the item's index within its split, 9 digits. The tars are plain WebDataset shards (any tar
reader takes them apart); vqgen itself never parses a tar header when reading: it ``pread``\\ s the
image bytes at the indexed offset from a descriptor kept open (at most :data:`MAX_OPEN_SHARDS` per
process) and decodes them from memory. The same source always gives the same bytes (members with
mtime 0, owner 0, mode 0644, in index order; PNGs written with fixed settings).

A pack is finished when ``index.json`` is there: shards and arrays are written under temporary
names and renamed, ``index.json`` comes last, so an interrupted pack is refused by the reader
rather than read half. A root can also be an ``http(s)://`` URL of such a folder: ``index.json``
and the arrays are fetched, and each shard is downloaded on first use into a cache folder, checked
against its sha256, under a lock so that the processes and workers of a run fetch it once.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import tarfile
import urllib.request
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from vqgen.errors import DataError
from vqgen.utils import (
    DOWNLOAD_TIMEOUT_S, atomic_replace, atomic_write_bytes, atomic_write_json, download_once,
    download_verified, file_lock, read_json, sha256_file,
)

FORMAT = "vqgen-shards"
VERSION = 1
INDEX_JSON = "index.json"
SPLITS = ("train", "eval")
KEY_DIGITS = 9
DEFAULT_SHARD_SIZE = 1000
MAX_OPEN_SHARDS = 32
PACK_KINDS = ("folder", "npz", "cifar10", "mnist", "fashion_mnist")
ROW_SHARD, ROW_OFFSET, ROW_SIZE, ROW_LABEL = range(4)
# Fixed encoder settings: the same pixels always give the same file (zlib level 6 is PIL's default).
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}
IMAGE_MEMBER_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
# A WebDataset folder's split from its tars' names; the first eval prefix present is the eval split.
_EVAL_PREFIXES = ("eval", "test", "val")
_SPLIT_OF_TAR = re.compile(r"^(train|eval|test|val)(?![a-z])", re.IGNORECASE)
_PACK_FILE = re.compile(r"^((train|eval)-\d{6}\.tar|(train|eval)-index\.npy|index\.json)$")


# ----------------------------------------------------------------------------------------------
# The training order


class ShardWindowSampler(Sampler[int]):
    """Every item once per epoch, a few shards at a time: the shards in a random order, taken
    ``window_shards`` at a time, the items of each window shuffled together.

    Item indices run shard after shard (shard ``s`` holds the ``shard_counts[s]`` items after those
    of shards ``0..s-1``), as in a pack. The order is a function of ``(seed, epoch)`` alone, so every
    process of a launch draws the same one (Accelerate then deals its batches out) and a resumed run
    the interrupted one's. ``set_epoch`` picks the epoch (Accelerate's ``loader.set_epoch`` calls it).
    """

    def __init__(self, shard_counts: Sequence[int], window_shards: int, seed: int):
        if window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {window_shards}")
        counts = np.asarray(shard_counts, dtype=np.int64)
        if counts.ndim != 1 or (counts < 0).any():
            raise ValueError(f"shard_counts must be counts >= 0, got {list(shard_counts)}")
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.window_shards = window_shards
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.counts.sum())

    def __iter__(self) -> Iterator[int]:
        # SeedSequence entropy must be >= 0: a negative run seed maps to another valid one.
        rng = np.random.default_rng([self.seed % 2**64, self.epoch % 2**64])
        order = rng.permutation(len(self.counts))
        for first in range(0, len(order), self.window_shards):
            window = order[first:first + self.window_shards]
            items = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.counts[s]) for s in window])
            yield from rng.permutation(items).tolist()


# ----------------------------------------------------------------------------------------------
# Writing: vqgen data pack


@dataclass(frozen=True)
class Sample:
    """One item to pack: the image member's extension (no dot), its bytes, and the label (-1: none)."""

    ext: str
    data: bytes
    label: int


@dataclass
class PackSplit:
    """What :func:`pack` reads from a source for one split."""

    count: int
    sample: Callable[[int], Sample]
    class_names: tuple[str, ...]
    num_classes: int
    convert: bool
    """True for packed image files: readers convert them to the config's channels as the folder
    kind does. False for PNGs of arrays: readers hand over their pixels as the npz kind does."""
    skipped: int = 0


@dataclass(frozen=True)
class SplitReport:
    images: int
    shards: int
    bytes: int
    skipped: int = 0


def infer_kind(source: Path, kind: str | None) -> str:
    """``kind``, or the one ``source`` implies: ``npz`` for a ``.npz`` file, ``folder`` for a folder."""
    if kind is not None:
        if kind not in PACK_KINDS:
            raise DataError(f"cannot pack data of kind {kind!r}; choose from {', '.join(PACK_KINDS)}")
        return kind
    if source.is_file() and source.suffix.lower() == ".npz":
        return "npz"
    if source.is_dir():
        return "folder"
    if not source.exists():
        raise DataError(f"nothing to pack: {source} does not exist")
    raise DataError(f"cannot tell what kind of data {source} is: give --kind ({', '.join(PACK_KINDS)})")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 array [H,W], [H,W,1] or [H,W,3] as PNG bytes (grey as mode L, colour as RGB)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def open_pack_split(kind: str, source: Path, split: str, on_corrupt: str) -> PackSplit:
    """The items of ``split`` of ``source`` as the dataset kinds read them: an image folder's files
    byte for byte (checked as the folder kind checks them), other kinds' arrays as PNGs."""
    from vqgen.data.datasets import DataConfig, FolderSource, build_source

    if kind == "folder":
        # use_index=False: packing reads every file anyway, and must not write into the source.
        folder = FolderSource(source, split, on_corrupt, mode="RGB", use_index=False)

        def file_sample(i: int) -> Sample:
            path = folder.files[i]
            try:
                return Sample(path.suffix[1:].lower(), path.read_bytes(), folder.labels[i])
            except OSError as err:
                raise DataError(f"cannot read image file {path}: {err.strerror}") from err

        return PackSplit(len(folder), file_sample, folder.class_names, folder.num_classes, convert=True,
                         skipped=len(folder.skipped))
    arrays = build_source(DataConfig(kind=kind, root=str(source)), split)

    def array_sample(i: int) -> Sample:
        image, label = arrays.load(i)
        return Sample("png", png_bytes(image), label)

    return PackSplit(len(arrays), array_sample, tuple(arrays.class_names), arrays.num_classes, convert=False)


def pack(source: Path, out: Path, kind: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
         on_corrupt: str = "error", progress: bool = True) -> dict[str, SplitReport]:
    """Write both splits of ``source`` into ``out`` as tar shards of ``shard_size`` items, at the
    source's own resolution, then the arrays and ``index.json``.

    ``out`` must be new or empty, or hold an earlier pack of the same source (kind and path), which
    is rewritten: once the source has been opened and checked, its ``index.json`` is removed, so
    until the new one is written a reader sees an unfinished pack, never old shards mixed with new
    ones (a source that fails its checks leaves the earlier pack as it was). Returns what each
    split wrote.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    kind = infer_kind(source, kind)
    record = {"kind": kind, "path": str(source.resolve())}
    _check_output(out, record)
    sources = {split: open_pack_split(kind, source, split, on_corrupt) for split in SPLITS}
    _clear_output(out)
    classes = sources["train"]  # the class names and conventions of the dataset are the train split's
    splits, reports, written = {}, {}, set()
    for split, items in sources.items():
        entries, rows = _write_split(out, split, items, shard_size, progress)
        splits[split] = _save_rows(out, split, rows, entries)
        written.update(e["name"] for e in entries)
        reports[split] = SplitReport(items.count, len(entries), sum(e["bytes"] for e in entries), items.skipped)
    _remove_stale_shards(out, written)
    record.update(shard_size=shard_size, on_corrupt=on_corrupt, skipped={s: r.skipped for s, r in reports.items()})
    _write_index(out, classes.class_names, classes.num_classes, classes.convert, splits, record)
    return reports


def _check_output(out: Path, record: dict[str, str]) -> None:
    """Refuse an ``out`` holding anything but a pack of the source ``record`` names (or an
    interrupted pack)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a folder to write the shards into")
    if not out.exists():
        return
    index = out / INDEX_JSON
    if index.is_file():
        try:
            earlier = read_json(index).get("source", {})
        except (OSError, ValueError, AttributeError):
            earlier = {}
        if {k: earlier.get(k) for k in record} != record:
            raise DataError(f"{out} already holds a pack of another source ({earlier.get('kind')} "
                            f"{earlier.get('path')}); give another output folder, or delete {out} first")
    foreign = sorted(p.name for p in out.iterdir() if not _is_pack_file(p.name))
    if foreign:
        raise DataError(f"{out} is not empty and is not a vqgen pack (it holds {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); give a new or empty output folder")


def _clear_output(out: Path) -> None:
    """Make ``out`` an unfinished pack: no ``index.json``, no temporary files of an interrupted one."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_JSON).unlink(missing_ok=True)
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()


def _is_pack_file(name: str) -> bool:
    """A file a pack writes, or one's temporary file (``.NAME.<random>.tmp``)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].rsplit(".", 2)[0]
    return bool(_PACK_FILE.match(name))


def _write_split(out: Path, split: str, items: PackSplit, shard_size: int,
                 progress: bool) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The shards of one split, each written to a temporary file and renamed; their entries for
    ``index.json`` and the split's rows."""
    rows = np.empty((items.count, 4), dtype=np.int64)
    entries = []
    with tqdm(total=items.count, desc=f"packing {split}", unit="img", disable=not progress) as bar:
        for shard, start in enumerate(range(0, items.count, shard_size)):
            name = f"{split}-{shard:06d}.tar"
            with atomic_replace(out / name) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i in range(start, min(start + shard_size, items.count)):
                        sample = items.sample(i)
                        key = f"{i:0{KEY_DIGITS}d}"
                        rows[i] = (shard, _add_member(tar, f"{key}.{sample.ext}", sample.data), len(sample.data),
                                   sample.label)
                        if sample.label >= 0:
                            _add_member(tar, f"{key}.cls", str(sample.label).encode("ascii"))
                        bar.update(1)
                entries.append(_shard_entry(tmp, name, min(shard_size, items.count - start)))
    return entries, rows


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a file member with fixed metadata; returns the offset of its data in the archive."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tar.offset - padded  # the archive's end is now the end of this member's padded data


def _shard_entry(path: Path, name: str, count: int) -> dict[str, Any]:
    return {"name": name, "count": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _save_rows(out: Path, split: str, rows: np.ndarray, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``out/{split}-index.npy``, atomically; the split's entry for ``index.json``."""
    name = f"{split}-index.npy"
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    atomic_write_bytes(out / name, buffer.getvalue())
    return {"count": len(rows), "shards": entries, "index": name,
            "index_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}


def _remove_stale_shards(out: Path, written: set[str]) -> None:
    """Shards of an earlier, longer pack of the same source that this one did not rewrite."""
    for path in out.glob("*.tar"):
        if _PACK_FILE.match(path.name) and path.name not in written:
            path.unlink()


def _write_index(out: Path, class_names: Sequence[str], num_classes: int, convert: bool,
                 splits: dict[str, Any], source: dict[str, Any]) -> None:
    atomic_write_json(out / INDEX_JSON, {
        "format": FORMAT, "version": VERSION, "classes": list(class_names), "num_classes": num_classes,
        "convert": convert, "splits": splits, "source": source,
    })


# ----------------------------------------------------------------------------------------------
# Indexing shards made elsewhere: vqgen data index


def index_webdataset(folder: Path, progress: bool = True) -> dict[str, SplitReport]:
    """Write ``index.json`` and the arrays for a folder of WebDataset tars made elsewhere.

    A tar's split comes from its name: ``train*`` is train, and the first of ``eval*``, ``test*``,
    ``val*`` present is eval (tars named otherwise are left out). A sample is the members sharing
    a key (the name up to the first dot of its last part): its first member with an image
    extension is the image, its ``.cls`` member (ASCII decimal) the label. Keys without an image
    are left out. The images are read as image files (converted to the config's channels).
    """
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    if (folder / INDEX_JSON).is_file():
        try:
            kind = read_json(folder / INDEX_JSON).get("source", {}).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind in PACK_KINDS:
            raise DataError(f"{folder} is a pack written by `vqgen data pack`: its index is already complete")
    by_split = _tars_by_split(folder)
    splits, reports, labels = {}, {}, []
    for split, paths in by_split.items():
        rows, entries = [], []
        for shard, path in enumerate(tqdm(paths, desc=f"indexing {split}", unit="shard", disable=not progress)):
            samples = _scan_tar(path)
            rows += [(shard, *sample) for sample in samples]
            entries.append(_shard_entry(path, path.name, len(samples)))
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        labels.append(table[:, ROW_LABEL])
        splits[split] = _save_rows(folder, split, table, entries)
        reports[split] = SplitReport(len(table), len(entries), sum(e["bytes"] for e in entries))
    num_classes = int(max((a.max() for a in labels if a.size), default=-1)) + 1
    _write_index(folder, (), num_classes, True, splits, {"kind": "webdataset", "path": str(folder.resolve())})
    return reports


def _tars_by_split(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.tar")):
        if match := _SPLIT_OF_TAR.match(path.name):
            found.setdefault(match.group(1).lower(), []).append(path)
    if "train" not in found:
        compressed = sorted(p.name for p in folder.glob("*.tar.*"))
        hint = (f"; compressed shards ({compressed[0]}, ...) cannot be read by offset: decompress them"
                if compressed else "")
        raise DataError(f"no tar shards named train* in {folder}{hint}")
    eval_prefix = next((p for p in _EVAL_PREFIXES if p in found), None)
    return {"train": found["train"], **({"eval": found[eval_prefix]} if eval_prefix else {})}


def _scan_tar(path: Path) -> list[tuple[int, int, int]]:
    """``(data offset, size, label)`` of each sample of a WebDataset tar, in order of first appearance."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, _, tail = member.name.rpartition("/")
                stem, _, ext = tail.partition(".")
                key, ext = f"{head}/{stem}" if head else stem, ext.lower()
                if ext in IMAGE_MEMBER_EXTENSIONS and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif ext == "cls":
                    labels[key] = _parse_label(tar.extractfile(member).read(), path, member.name)
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot read tar shard {path}: {err}") from err
    return [(offset, size, labels.get(key, -1)) for key, (offset, size) in images.items()]


def _parse_label(data: bytes, path: Path, member: str) -> int:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path}: member {member} is not a class label (ASCII decimal): {data[:20]!r}") from None
    if label < 0:
        raise DataError(f"{path}: member {member} holds a negative label ({label})")
    return label


# ----------------------------------------------------------------------------------------------
# Reading: data.kind = "shards"


def is_url(root: str) -> bool:
    return root.startswith(("http://", "https://"))


def unfinished_pack_message(root: str | os.PathLike) -> str:
    return (f"{root} has no {INDEX_JSON}, so it is not a finished pack (an interrupted `vqgen data pack`, "
            f"or tar shards never indexed): run `vqgen data pack SOURCE {root}` (again), or "
            f"`vqgen data index {root}` for WebDataset shards made elsewhere")


def read_index(folder: Path) -> dict[str, Any]:
    """A pack's ``index.json``, checked for its format and version."""
    path = folder / INDEX_JSON
    if not path.is_file():
        raise DataError(unfinished_pack_message(folder))
    try:
        return check_index(read_json(path), str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read ({err}); run `vqgen data pack` into {folder} again") from err


def check_index(index: Any, where: str) -> dict[str, Any]:
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{where} is not a vqgen shard index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != VERSION:
        raise DataError(f"{where} is version {index.get('version')} of the shard format; this vqgen reads "
                        f"version {VERSION}: pack the data again")
    return index


def default_cache_dir(url: str) -> Path:
    """Where the shards of ``url`` are kept when ``data.cache_dir`` is empty."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vqgen" / "shards" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def check_shards(folder: Path, checksums: bool = False) -> dict[str, Any]:
    """DataError naming the first shard of a local pack that is missing or whose size (and with
    ``checksums`` its sha256) differs from ``index.json``; returns the index."""
    index = read_index(folder)
    for info in index["splits"].values():
        for entry in info["shards"]:
            _check_shard_file(folder / entry["name"], entry, checksums)
        rows = folder / info["index"]
        if checksums and (not rows.is_file() or sha256_file(rows) != info["index_sha256"]):
            raise DataError(f"{rows} is missing or differs from the one {INDEX_JSON} was written with; "
                            "pack the data again")
    return index


def _check_shard_file(path: Path, entry: dict[str, Any], checksum: bool) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"shard {path} is missing; pack the data again") from None
    if size != entry["bytes"]:
        raise DataError(f"shard {path} has {size} bytes, {INDEX_JSON} says {entry['bytes']}: truncated or "
                        "changed since it was packed; pack the data again")
    if checksum and (digest := sha256_file(path)) != entry["sha256"]:
        raise DataError(f"shard {path} has sha256 {digest}, {INDEX_JSON} says {entry['sha256']}: changed "
                        "since it was packed; pack the data again")


class ShardSource:
    """The items of one split of a pack (a folder, or the URL of one): an ``ImageSource``.

    ``mode`` is the PIL mode of the config's channels; packed image files are converted to it (as
    the folder kind does), PNGs of arrays keep their own pixels (as the npz kind). ``limit`` keeps
    the first items. A member that does not decode raises a DataError naming shard and key, or
    under ``on_corrupt = "skip"`` is replaced by the next item that decodes (with one warning);
    a missing or truncated shard is always an error.
    """

    def __init__(self, root: str, split: str, mode: str, on_corrupt: str = "error", cache_dir: str = "",
                 limit: int = 0, window_shards: int = 8):
        self.location = root.rstrip("/") if is_url(root) else root
        self._remote = _RemotePack(self.location, cache_dir) if is_url(root) else None
        folder = self._remote.folder if self._remote else Path(root)
        index = read_index(folder)
        info = index["splits"].get(split)
        if info is None:
            raise DataError(f"{root} has no {split} split ({INDEX_JSON} lists {', '.join(index['splits'])})")
        self.split, self.folder, self.shards = split, folder, info["shards"]
        rows = _load_rows(folder / info["index"], self.shards)
        if self._remote is None:
            for entry in self.shards:
                _check_shard_file(folder / entry["name"], entry, checksum=False)
        self.rows = rows[:limit] if limit > 0 else rows
        self.class_names = tuple(index["classes"])
        self.num_classes = int(index["num_classes"])
        self.mode = mode if index["convert"] else None
        self.on_corrupt = on_corrupt
        self.window_shards = window_shards
        self._files = _OpenShards(self._shard_path, MAX_OPEN_SHARDS)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def train_sampler(self, seed: int, length: int) -> ShardWindowSampler:
        """The training order over the first ``length`` items: shard windows (see the sampler)."""
        shards = np.asarray(self.rows[:length, ROW_SHARD])
        return ShardWindowSampler(np.bincount(shards, minlength=len(self.shards)), self.window_shards, seed)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} items")
        for step in range(len(self.rows)):
            item = (index + step) % len(self.rows)
            shard, offset, size, label = (int(v) for v in self.rows[item])
            data = self._read(shard, offset, size)
            try:
                return _decode(data, self.mode), label
            except Exception as err:  # PIL raises many types on bad input
                problem = DataError(f"cannot decode image {self._member_name(shard, offset)} in shard "
                                    f"{self._shard_label(shard)}: {type(err).__name__}: {err}")
                if self.on_corrupt != "skip":
                    raise DataError(f"{problem}; set data.on_corrupt = \"skip\" to read the next image in "
                                    "its place") from err
                self._warn_once(item, problem)
        raise DataError(f"no image of the {self.split} split of {self.location} could be decoded")

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        data = self._files.pread(shard, offset, size)
        if len(data) != size:
            raise DataError(f"shard {self._shard_label(shard)} ends inside an image ({len(data)} of {size} bytes "
                            f"at offset {offset}): truncated since it was packed; pack the data again")
        return data

    def _shard_path(self, shard: int) -> Path:
        entry = self.shards[shard]
        return self._remote.fetch(entry) if self._remote else self.folder / entry["name"]

    def _shard_label(self, shard: int) -> str:
        name = self.shards[shard]["name"]
        return f"{self.location}/{name}" if self._remote else str(self.folder / name)

    def _member_name(self, shard: int, offset: int) -> str:
        """The tar member's name, from the header block just before its data (only for messages)."""
        try:
            header = self._files.pread(shard, offset - tarfile.BLOCKSIZE, tarfile.BLOCKSIZE)
            return tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
        except (OSError, tarfile.TarError, DataError):
            return f"at offset {offset}"

    def _warn_once(self, item: int, err: DataError) -> None:
        if item not in self._warned:
            self._warned.add(item)
            warnings.warn(f"{err}; using the next image that decodes in its place (data.on_corrupt = \"skip\")",
                          RuntimeWarning, stacklevel=3)


def _decode(data: bytes, mode: str | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if mode is None:  # a PNG of an array: its own pixels, grey or colour
            mode = image.mode if image.mode in ("L", "RGB") else "RGB"
        return np.asarray(image.convert(mode))  # convert() decodes the whole image


def _load_rows(path: Path, shards: list[dict[str, Any]]) -> np.ndarray:
    """A split's rows, checked against its shard entries (counts, and every image inside its shard)."""
    try:
        # Mapped, not read: the processes of a node share one copy in the page cache. (A file of
        # no rows cannot be mapped.)
        rows = np.load(path, mmap_mode="r" if path.stat().st_size > 256 else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); pack the data again") from err
    counts = np.array([e["count"] for e in shards], dtype=np.int64)
    sizes = np.array([e["bytes"] for e in shards], dtype=np.int64)
    if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != 4 or len(rows) != counts.sum():
        raise DataError(f"{path}: expected int64 rows [{counts.sum()}, 4], got {rows.dtype} {list(rows.shape)}")
    shard = np.asarray(rows[:, ROW_SHARD])
    if len(rows) and (shard.min() < 0 or shard.max() >= len(shards)
                      or not np.array_equal(np.bincount(shard, minlength=len(shards)), counts)
                      or (rows[:, ROW_OFFSET] + rows[:, ROW_SIZE] > sizes[shard]).any()):
        raise DataError(f"{path} does not match the shards {INDEX_JSON} lists; pack the data again")
    return rows


class _OpenShards:
    """Shard files open for reading: the ``capacity`` most recently used, by shard number.

    ``pread`` leaves the descriptor's offset alone, so a descriptor inherited by a forked worker
    is safe to share; a pickled copy (a spawned worker) starts with none.
    """

    def __init__(self, locate: Callable[[int], Path], capacity: int):
        self._locate = locate
        self._capacity = capacity
        self._fds: OrderedDict[int, int] = OrderedDict()

    def pread(self, shard: int, offset: int, size: int) -> bytes:
        return os.pread(self._fd(shard), size, offset)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self._locate(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise DataError(f"cannot open shard {path}: {err.strerror}") from err
        self._fds[shard] = fd
        if len(self._fds) > self._capacity:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": OrderedDict()}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class _RemotePack:
    """A pack served over HTTP(S), mirrored into ``folder``: ``index.json`` and the arrays when the
    source is opened, each shard when first read (checked against its sha256, fetched once however
    many processes ask). The folder is laid out as a pack, so once complete it is one."""

    def __init__(self, url: str, cache_dir: str):
        self.url = url
        self.folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(url)
        self._sync_index()

    def fetch(self, entry: dict[str, Any]) -> Path:
        path = self.folder / entry["name"]
        if not path.is_file():
            self._download(entry["name"], path, entry["sha256"])
        return path

    def _sync_index(self) -> None:
        """Fetch ``index.json``; when it differs from the cached one, fetch the arrays again and
        drop cached shards whose checksum changed, then write it (last)."""
        fresh = self._get(INDEX_JSON)
        try:
            index = check_index(_json_loads(fresh), f"{self.url}/{INDEX_JSON}")
        except ValueError as err:
            raise DataError(f"{self.url}/{INDEX_JSON} is not JSON ({err})") from err
        self.folder.mkdir(parents=True, exist_ok=True)
        cached_path = self.folder / INDEX_JSON
        with file_lock(self.folder / ".index.lock"):
            cached = cached_path.read_bytes() if cached_path.is_file() else None
            if cached == fresh and all((self.folder / i["index"]).is_file() for i in index["splits"].values()):
                return
            # A cached shard stays only where the new index gives it the checksum it was fetched by.
            fetched_as, wanted = _shard_checksums(cached), _shard_checksums(fresh)
            for path in self.folder.glob("*.tar"):
                if wanted.get(path.name) is None or wanted.get(path.name) != fetched_as.get(path.name):
                    path.unlink()
            for info in index["splits"].values():
                target = self.folder / info["index"]
                target.unlink(missing_ok=True)
                self._download(info["index"], target, info["index_sha256"])
            atomic_write_bytes(cached_path, fresh)

    def _get(self, name: str) -> bytes:
        url = f"{self.url}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return response.read()
        except (OSError, http.client.HTTPException) as err:
            raise DataError(f"cannot fetch {url} ({_reason(err)}); check the URL and the network, or set "
                            "data.root to a local copy of the pack") from err

    def _download(self, name: str, path: Path, sha256: str) -> None:
        url = f"{self.url}/{name}"

        def check(digest: str) -> None:
            if digest != sha256:
                raise DataError(f"{url}: the downloaded file's sha256 is {digest}, {INDEX_JSON} says {sha256}; "
                                "it was discarded. The server's copy differs from the one indexed: pack or "
                                "upload it again")

        try:
            (download_once if name.endswith(".tar") else download_verified)(url, path, check, progress=False)
        except (OSError, http.client.HTTPException) as err:
            raise DataError(f"cannot download {url} into {path} ({_reason(err)}); check the URL and the "
                            "network") from err


def _json_loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def _shard_checksums(index_bytes: bytes | None) -> dict[str, str]:
    """Shard name → sha256 in an ``index.json`` (empty when there is none or it cannot be read)."""
    try:
        index = _json_loads(index_bytes) if index_bytes else {"splits": {}}
        return {e["name"]: e["sha256"] for info in index["splits"].values() for e in info["shards"]}
    except (ValueError, KeyError, AttributeError, TypeError):
        return {}


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(reason, BaseException):  # urllib's URLError wraps the socket's error
        err = reason
    return f"{type(err).__name__}: {err}"
