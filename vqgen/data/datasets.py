"""Image datasets for training and evaluation, behind one config section and one builder.

``build_dataset(cfg, split)`` returns a map-style dataset whose items are ``(image, label)``: a float
tensor [C,S,S] in [-1, 1] and an int (-1 when the source has no labels). Sources:

- ``procedural``: coloured shapes drawn on the fly (no files; see :mod:`vqgen.data.procedural`).
- ``cifar10`` / ``mnist`` / ``fashion_mnist``: torchvision's classes under ``root``. MNIST-style roots
  that hold only the raw ``.gz`` idx files (which torchvision refuses without downloading) are read
  directly, without writing anything to ``root``.
- ``npz``: uint8 arrays in an ``.npz`` file (``images`` or ``train_images``/``test_images`` and the
  matching ``labels`` keys).
- ``folder``: every image file below ``root``, any depth, labels from first-level subfolder names.
- ``shards``: WebDataset-style tar shards written by ``vqgen data pack`` (or indexed by ``vqgen data
  index``), in the folder ``root`` or at its ``http(s)://`` URL; read by offset, and trained on a few
  shards at a time (see :mod:`vqgen.data.shards`).

Where a source has no separate eval split (a folder without ``eval/`` or ``test/``, an ``.npz``
with a single ``images`` array), a deterministic hold-out is used: every tenth item in sorted
order (positions 9, 19, 29, ...) is eval and the rest is train, so the two never overlap.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vqgen.data.folder_index import FolderIndex, ListedFile, scan_image_files
from vqgen.data.procedural import EVAL_STREAM, TRAIN_STREAM, ProceduralConfig, ProceduralShapes
from vqgen.data.shards import INDEX_JSON, ShardSource, is_url, unfinished_pack_message
from vqgen.configtools import added_field, location_field, schedule_field
from vqgen.errors import ConfigError, DataError

Split = Literal["train", "eval"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
EVAL_FOLDERS = ("eval", "test", "val")  # the first one present under a folder root is the eval split
HOLDOUT_EVERY = 10  # one item in ten goes to the hold-out eval split
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
NPZ_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files
NPY_MAGIC = b"\x93NUMPY"
JPEG_END_MARKER = b"\xff\xd9"  # EOI
# How far from the end of a JPEG its end-of-image marker is looked for: some writers append
# bytes after it (camera trailers, padding), and a few KB is still a cheap read.
JPEG_TAIL_BYTES = 8192


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are prepared."""

    kind: Literal["procedural", "cifar10", "mnist", "fashion_mnist", "npz", "folder", "shards"] = "procedural"
    """Image source; ``procedural`` needs no files."""
    root: str = ""
    """Dataset root (torchvision kinds), the ``.npz`` file, the image folder, or the folder written by
    ``vqgen data pack`` (``shards``; also an ``http://`` or ``https://`` URL of one)."""
    image_size: int = 32
    """Side of the square images the model sees (a multiple of 8: the top codes are at 1/8)."""
    channels: int = 3
    """Channels the model sees: grey sources are repeated to 3, colour ones averaged to 1."""
    download: bool = schedule_field(False)
    """Let torchvision download CIFAR-10 / MNIST / Fashion-MNIST into ``root`` when missing."""
    num_train: int = 0
    """Use only the first N training images (0 = all)."""
    num_eval: int = 0
    """Use only the first N eval images (0 = all)."""
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    """The procedural set's size, variant and seed (``kind = "procedural"``)."""
    hflip: bool = False
    """Random horizontal flips at training time."""
    on_corrupt: Literal["error", "skip"] = "error"
    """A corrupt file in a folder dataset: stop with an error naming it, or skip it and count it (an
    image of a pack that does not decode: an error naming shard and member, or the next one instead)."""
    shuffle_window_shards: int = added_field(8)
    """``shards``: training takes the shards in a random order this many at a time and shuffles
    their items together (each epoch is still every item once)."""
    cache_dir: str = location_field("")
    """``shards`` with a URL root: where its shards are downloaded (empty: ``~/.cache/vqgen/shards/``
    and the first 16 hex digits of the URL's sha256, under ``$XDG_CACHE_HOME`` when set)."""

    # The procedural set's options sat at this level before they became their own section.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "procedural_size": "procedural.size", "procedural_palette": "procedural.palette",
        "procedural_backgrounds": "procedural.backgrounds", "procedural_rotate": "procedural.rotate",
        "seed": "procedural.seed",
    }

    def __post_init__(self):
        if self.kind != "procedural" and not self.root:
            raise ConfigError("root", f"kind = {self.kind!r} needs a root (dataset folder or file)")
        if self.image_size < 8 or self.image_size % 8:
            raise ConfigError("image_size", f"must be a positive multiple of 8, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ConfigError("channels", f"must be 1 or 3, got {self.channels}")
        for name in ("num_train", "num_eval"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.shuffle_window_shards < 1:
            raise ConfigError("shuffle_window_shards", f"must be >= 1, got {self.shuffle_window_shards}")


# ----------------------------------------------------------------------------------------------
# Pixel helpers


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → float in [0, 1] (clamped), any shape."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → uint8 in [0, 255] (rounded, clamped), any shape."""
    return (denormalize(images) * 255.0).round().to(torch.uint8)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """[c,H,W] → [channels,H,W]: grey is repeated to RGB, RGB becomes luma (ITU-R 601 weights)."""
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return image.expand(3, -1, -1).clone()
    if have == 3 and channels == 1:
        weights = image.new_tensor([0.299, 0.587, 0.114])
        return torch.einsum("chw,c->hw", image, weights)[None]
    raise DataError(f"cannot convert a {have}-channel image to {channels} channels")


@dataclass(frozen=True)
class ImageTransform:
    """uint8 array [H,W] or [H,W,C] → float tensor [channels,S,S] in [-1, 1].

    Resizes the shorter side to ``image_size`` (bilinear, antialiased), center-crops to a square,
    and flips horizontally with probability 1/2 when ``hflip``.
    """

    image_size: int
    channels: int
    hflip: bool = False

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        image = image[None] if image.ndim == 2 else rearrange(image, "h w c -> c h w")
        # Scale in NumPy: one pass, and a fresh writable array even when the source is read-only.
        pixels = np.array(image, dtype=np.float32, order="C")
        pixels *= 1.0 / 127.5
        pixels -= 1.0
        x = match_channels(torch.from_numpy(pixels), self.channels)  # [C,H,W]
        size = self.image_size
        if x.shape[-2:] != (size, size):
            # Imported here: torchvision costs 1.5 s at start-up, and most sources are stored at size.
            from torchvision.transforms.v2 import functional as TF

            x = TF.resize(x, [size], antialias=True)
            x = TF.center_crop(x, [size, size]).clamp(-1.0, 1.0)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous()


# ----------------------------------------------------------------------------------------------
# Sources: each gives len(), load(i) -> (uint8 [H,W] or [H,W,C], label) and class metadata.


class ImageSource(Protocol):
    """What :class:`ImageDataset` needs from a source: items as uint8 arrays plus class metadata.

    A source may also offer its own training order, ``train_sampler(seed, length) -> Sampler``
    over its first ``length`` items (the shards kind: a few shards at a time); see
    :meth:`ImageDataset.train_sampler`.
    """

    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, int]: ...


class ArraySource:
    """Images held in memory as one uint8 array [N,H,W] or [N,H,W,C] with optional labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, num_classes: int,
                 class_names: tuple[str, ...] = ()):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label


def holdout_indices(n: int, split: Split) -> np.ndarray:
    """Deterministic hold-out: eval = positions 9, 19, 29, ... (the last item if n < 10), train = rest."""
    positions = np.arange(n)
    is_eval = positions % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if n and not is_eval.any():
        is_eval[-1] = True
    return positions[is_eval] if split == "eval" else positions[~is_eval]


# --- idx files (MNIST, Fashion-MNIST) ---------------------------------------------------------


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a uint8 array.

    The header is big-endian: a magic number (2051 for images, 2049 for labels, i.e. 0x08 = uint8
    data and the number of dimensions in the low byte), then one int32 size per dimension.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read idx file {path}: {err}") from err
    if len(raw) < 4:
        raise DataError(f"idx file {path} is too short for a header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"idx file {path}: magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"idx file {path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header_len != expected:
        raise DataError(
            f"idx file {path}: header says shape {shape} ({expected} bytes of data), "
            f"found {len(raw) - header_len} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _find_idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def load_idx_split(root: Path, class_name: str, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,H,W] and labels [N] of an MNIST-style split from raw idx files under ``root``.

    Looked for in ``root/<class_name>/raw``, ``root/raw`` and ``root`` itself, gzipped or not.
    """
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    folders = [root / class_name / "raw", root / "raw", root]
    for folder in folders:
        found = [_find_idx_file(folder, name) for name in names]
        if all(found):
            images = read_idx(found[0], IDX_IMAGES_MAGIC)
            labels = read_idx(found[1], IDX_LABELS_MAGIC)
            if len(images) != len(labels):
                raise DataError(f"{found[0]} has {len(images)} images but {found[1]} has {len(labels)} labels")
            return images, labels
    searched = ", ".join(str(f) for f in folders)
    raise DataError(
        f"{class_name} {split} split not found under {root}: looked for {names[0]}(.gz) and "
        f"{names[1]}(.gz) in {searched}; set data.download = true to let torchvision fetch them"
    )


# --- torchvision ------------------------------------------------------------------------------

_TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _download_failed(dataset_cls: type, root: Path, err: BaseException) -> DataError:
    """What to do when torchvision could not fetch ``dataset_cls``: from where it tried, and which
    files to copy into ``root`` by hand (torchvision checks files that are present and fetches no
    more, so ``data.download`` can stay true)."""
    if hasattr(dataset_cls, "url"):  # CIFAR: one archive, extracted by torchvision
        sources = [dataset_cls.url]
        files = (f"{root / dataset_cls.filename} (torchvision extracts it), or the extracted "
                 f"{root / dataset_cls.base_folder}/")
    else:  # MNIST kinds: four idx files on one of several mirrors
        sources = list(dataset_cls.mirrors)
        names = [name for name, _ in dataset_cls.resources]
        files = f"{', '.join(names)} in {root / dataset_cls.__name__ / 'raw'}"
    return DataError(f"torchvision could not download {dataset_cls.__name__} from {' or '.join(sources)} "
                     f"({err}); without network access, fetch it elsewhere and put {files}")


def torchvision_source(cfg: DataConfig, split: Split) -> ArraySource:
    """CIFAR-10 / MNIST / Fashion-MNIST through torchvision, with a raw-idx fallback for MNIST kinds."""
    import torchvision.datasets

    class_name = _TORCHVISION_CLASSES[cfg.kind]
    dataset_cls = getattr(torchvision.datasets, class_name)
    root = Path(cfg.root)
    try:
        dataset = dataset_cls(str(root), train=split == "train", download=cfg.download)
    except (RuntimeError, OSError) as err:
        if cfg.kind != "cifar10":
            try:  # raw idx files, which torchvision refuses without downloading
                images, labels = load_idx_split(root, class_name, split)
            except DataError as missing:
                if not cfg.download:
                    raise missing from None
            else:
                return ArraySource(images, labels, 10, tuple(dataset_cls.classes))
        if cfg.download:  # the download itself failed (no network?): suggesting it would not help
            raise _download_failed(dataset_cls, root, err) from err
        raise DataError(
            f"CIFAR-10 not found under {root} (looked for {root / 'cifar-10-batches-py'}): {err}; "
            "set data.download = true to let torchvision fetch it"
        ) from err
    images = dataset.data.numpy() if torch.is_tensor(dataset.data) else np.asarray(dataset.data)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return ArraySource(images, labels, len(dataset.classes), tuple(dataset.classes))


# --- npz --------------------------------------------------------------------------------------


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``path`` opened as an ``.npz`` (arrays are read lazily, never unpickled); a DataError naming
    the file when it is not one. The zip header is checked first: ``np.load`` would otherwise take
    any other file for a pickle and answer with advice about ``allow_pickle``."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    if magic.startswith(NPY_MAGIC):
        raise DataError(f"{path} is a .npy file (a single array), not an .npz file; "
                        "write one with np.savez(path, images=...)")
    if not magic.startswith(NPZ_MAGIC):
        raise DataError(f"{path} is not an .npz file (no zip header)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not an .npz file (damaged zip archive: {err})") from err


def _npy_dtype(member) -> np.dtype:
    """The dtype in an ``.npy`` header, read without loading (or unpickling) the data."""
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(member)[2]


def read_npz_array(arrays: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """Array ``key`` of an open ``.npz``; a DataError naming the file and key when it is damaged or
    holds Python objects. Object arrays are refused from their header, before any data is read:
    loading them means unpickling, which can run code from the file."""
    try:
        with arrays.zip.open(f"{key}.npy") as member:
            dtype = _npy_dtype(member)
        if not dtype.hasobject:
            return arrays[key]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: cannot read array {key!r} ({type(err).__name__}: {err})") from err
    raise DataError(f"{path}: array {key!r} holds Python objects (dtype {dtype}), which vqgen does not load "
                    "because unpickling them could run code from the file; store plain numeric arrays")


def _npz_images(arrays, path: Path, key: str) -> np.ndarray:
    images = read_npz_array(arrays, path, key)
    if images.dtype != np.uint8:
        raise DataError(f"{path}: array {key!r} must be uint8 images, got dtype {images.dtype}")
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: array {key!r} has {images.shape[-1]} channels (NHWC), expected 1 or 3")
    if images.ndim not in (3, 4) or 0 in images.shape:
        raise DataError(f"{path}: array {key!r} must be NHW or NHWC images, got shape {images.shape}")
    return images


def _npz_labels(arrays, path: Path, key: str, count: int) -> np.ndarray:
    labels = read_npz_array(arrays, path, key)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{path}: array {key!r} must hold {count} labels (shape [{count}]), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: array {key!r} must hold integer labels, got dtype {labels.dtype}")
    if count and labels.min() < 0:
        raise DataError(f"{path}: array {key!r} holds a negative label ({labels.min()})")
    return labels.astype(np.int64)


def npz_source(cfg: DataConfig, split: Split) -> ArraySource:
    """Images from an ``.npz``: ``train_images``/``test_images`` (+ labels) or one ``images`` array.

    With only ``images``, the split is the deterministic hold-out (see :func:`holdout_indices`).
    ``num_classes`` is 1 + the largest label in any label array of the file, so train and eval agree.
    """
    path = Path(cfg.root)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    with open_npz(path) as arrays:
        keys = set(arrays.files)
        split_key = "train_images" if split == "train" else "test_images"
        if split_key in keys:
            image_key, label_key = split_key, split_key.replace("images", "labels")
        elif "images" in keys:
            image_key, label_key = "images", "labels"
        else:
            raise DataError(f"{path}: no {split_key!r} or 'images' array (arrays found: {sorted(keys)})")
        images = _npz_images(arrays, path, image_key)
        labels = _npz_labels(arrays, path, label_key, len(images)) if label_key in keys else None
        all_labels = [read_npz_array(arrays, path, k) for k in ("labels", "train_labels", "test_labels") if k in keys]
    num_classes = max((int(a.max()) + 1 for a in all_labels if a.size and np.issubdtype(a.dtype, np.integer)),
                      default=0)
    subset = holdout_indices(len(images), split) if image_key == "images" else None
    if subset is not None:
        images = images[subset]
        labels = None if labels is None else labels[subset]
    return ArraySource(images, labels, num_classes)


# --- image folder -----------------------------------------------------------------------------


def list_image_files(folder: Path, exclude: frozenset[Path] = frozenset()) -> list[Path]:
    """Every image file below ``folder`` (any depth, hidden entries skipped), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        # Pruning and sorting in place makes os.walk itself deterministic.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d not in exclude)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(here / name)
    return found


# Formats whose PIL ``verify`` notices truncation: PNG reads every chunk up to IEND (checking
# CRCs) and WebP hands the whole file to libwebp. For JPEG it checks nothing past the header.
_VERIFY_SEES_TRUNCATION = frozenset({"PNG", "WEBP"})


def check_image_file(path: Path) -> str | None:
    """``None`` when ``path`` holds a whole image that PIL can read, else the reason.

    Cheap where a cheap check exists: PNG and WebP are verified by PIL without decoding, a JPEG
    must also end with its end-of-image marker. Other formats (BMP, GIF) have no such check and
    are decoded in full, which for them is cheap (no or LZW compression).
    """
    try:
        with Image.open(path) as image:
            is_jpeg = image.format in ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG
            scan_start = image.fp.tell() if is_jpeg else 0
            image_format = image.format
            image.verify()
        if is_jpeg:
            return _jpeg_end_problem(path, scan_start)
        if image_format not in _VERIFY_SEES_TRUNCATION:
            with Image.open(path) as image:  # verify() leaves an image unusable: open it again
                image.load()
    except Exception as err:  # PIL raises many types on bad input (OSError, SyntaxError, struct.error...)
        return f"{type(err).__name__}: {err}"
    return None


def _jpeg_end_problem(path: Path, scan_start: int) -> str | None:
    """A JPEG cut short loses its final end-of-image marker. It is looked for in the last
    ``JPEG_TAIL_BYTES``, but not before the image data starts (``scan_start``, where PIL stopped
    reading the header): an EXIF thumbnail there has its own marker. Inside the image data the
    bytes FF D9 cannot occur (a data byte FF is always followed by 00 or a restart marker)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(scan_start, size - JPEG_TAIL_BYTES))
        tail = f.read()
    return None if JPEG_END_MARKER in tail else "truncated JPEG (no end-of-image marker)"


def _parts_below(path: Path, top: Path) -> tuple[str, ...]:
    """``path.relative_to(top).parts``, by string where it can be: ``relative_to`` costs more than
    a stat, which adds up over a million files."""
    here, above = str(path), str(top)
    if above != "." and here.startswith(above + os.sep):
        return tuple(here[len(above) + 1:].split(os.sep))
    return path.relative_to(top).parts


class FolderSource:
    """Images below a folder; labels from first-level subfolder names (sorted), else -1.

    Split folders: ``root/eval``, ``root/test`` or ``root/val`` is the eval split when present (and ``root/train``,
    if present, the train split); otherwise both splits come from the deterministic hold-out.
    Files are checked at construction (see :func:`check_image_file`; with ``limit`` only until
    that many good files are found; verdicts are cached across processes and stages, see
    :mod:`vqgen.data.folder_index`, with ``cache_dir`` where to keep them and ``use_index=False``
    to check every file afresh): a bad one raises a :class:`DataError` naming it, or with
    ``on_corrupt = "skip"`` is left out and listed in ``skipped`` (its reason in ``skip_reasons``).
    A file that still fails to decode when loaded (changed since, or damaged in a way the check
    does not see) raises a DataError naming it, or under ``"skip"`` is replaced by the next file
    that decodes, with a warning, so an epoch is not lost to one file.
    """

    def __init__(self, root: Path, split: Split, on_corrupt: str, mode: str, limit: int = 0,
                 cache_dir: Path | None = None, use_index: bool = True):
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        self.mode = mode
        self.root = root
        self.on_corrupt = on_corrupt
        self._warned: set[Path] = set()
        eval_dir = next((root / d for d in EVAL_FOLDERS if (root / d).is_dir()), None)
        train_dir = root / "train" if eval_dir is not None and (root / "train").is_dir() else root
        exclude = frozenset(root / d for d in EVAL_FOLDERS) if eval_dir is not None else frozenset()

        # One listing of the whole root serves both splits: a subfolder's files are a run of it in
        # the same order, so the subsets equal what listing each folder on its own gives.
        listing = scan_image_files(root, IMAGE_EXTENSIONS) if use_index else None
        paths = [root / f.rel for f in listing] if listing is not None else []
        train_files = (list_image_files(train_dir, exclude) if listing is None
                       else self._subset(root, listing, paths, train_dir, exclude))
        self.class_names = self._class_names(train_files, train_dir)
        if eval_dir is not None and split == "eval":
            top = eval_dir
            files = list_image_files(eval_dir) if listing is None else self._subset(root, listing, paths, eval_dir)
        elif eval_dir is not None:
            top, files = train_dir, train_files
        else:
            top, files = train_dir, [train_files[i] for i in holdout_indices(len(train_files), split)]
        if not files:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"no image files ({extensions}) found for split {split!r} under {top}")

        if listing is None:
            self.files, self.skip_reasons = self._verified(files, on_corrupt, limit, check_image_file)
        else:
            # Verdicts recorded by an earlier build (any process, any stage) for unchanged files
            # are reused; the rest are checked and recorded, also when a corrupt file raises.
            index = FolderIndex(root, cache_dir)
            listed = dict(zip(paths, listing))

            def check(path: Path) -> str | None:
                return index.verdict(listed[path], path, check_image_file)

            try:
                self.files, self.skip_reasons = self._verified(files, on_corrupt, limit, check)
            finally:
                index.save(listing)
        self.skipped = list(self.skip_reasons)
        class_ids = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [self._label(path, top, class_ids) for path in self.files]
        self.num_classes = len(self.class_names)

    @staticmethod
    def _subset(root: Path, listing: list[ListedFile], paths: list[Path], top: Path,
                exclude: frozenset[Path] = frozenset()) -> list[Path]:
        """The ``paths`` of the files of ``listing`` (relative to ``root``) below ``top`` and not
        below ``exclude``: string prefixes, as pathlib is slow per file."""
        def prefix(folder: Path) -> str:
            rel = folder.relative_to(root).as_posix()
            return "" if rel == "." else rel + "/"

        inside, outside = prefix(top), tuple(prefix(e) for e in exclude)
        return [path for f, path in zip(listing, paths)
                if f.rel.startswith(inside) and not (outside and f.rel.startswith(outside))]

    @staticmethod
    def _class_names(files: list[Path], top: Path) -> tuple[str, ...]:
        """Sorted names of the first-level subfolders that hold at least one image."""
        parts = (_parts_below(f, top) for f in files)
        return tuple(sorted({p[0] for p in parts if len(p) > 1}))

    @staticmethod
    def _label(path: Path, top: Path, class_ids: dict[str, int]) -> int:
        parts = _parts_below(path, top)
        if len(parts) == 1 or not class_ids:  # a file directly in the split folder has no class
            return -1
        if parts[0] not in class_ids:
            raise DataError(f"{path}: class folder {parts[0]!r} is not one of the train classes "
                            f"{list(class_ids)}")
        return class_ids[parts[0]]

    @staticmethod
    def _verified(files: list[Path], on_corrupt: str, limit: int,
                  check: Callable[[Path], str | None]) -> tuple[list[Path], dict[Path, str]]:
        """The good files, and the skipped ones with their reasons (in order); ``check`` gives a
        file's problem (see :func:`check_image_file`), or ``None``."""
        good, skipped = [], {}
        for path in files:
            if limit and len(good) == limit:
                break
            problem = check(path)
            if problem is None:
                good.append(path)
            elif on_corrupt == "skip":
                skipped[path] = problem
            else:
                raise DataError(f"corrupt or unreadable image {path} ({problem}); "
                                "set data.on_corrupt = \"skip\" to skip such files")
        if not good:
            first = next(iter(skipped))
            raise DataError(f"every image file was corrupt ({len(skipped)} skipped, e.g. {first}: {skipped[first]})")
        return good, skipped

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Pixels and label of file ``index``; under ``"skip"`` those of the next file (index + 1,
        + 2, ..., wrapping) that decodes, when this one does not."""
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            try:
                return self._decode(self.files[candidate]), self.labels[candidate]
            except DataError as err:
                if self.on_corrupt != "skip":
                    raise
                self._warn_once(self.files[candidate], err)
        raise DataError(f"no image file under {self.root} could be decoded")

    def _decode(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert(self.mode))  # convert() decodes the whole file
        except Exception as err:  # damaged data may only show up when decoding
            raise DataError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err

    def _warn_once(self, path: Path, err: DataError) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"{err}; using the next image that decodes in its place "
                          "(data.on_corrupt = \"skip\")", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# The dataset


class ImageDataset(Dataset):
    """The first ``length`` items of ``source``, transformed: ``(float [C,S,S] in [-1,1], label)``.

    Attributes: ``num_classes`` (0 when unlabelled), ``class_names``, ``num_skipped`` (corrupt files
    left out of a folder dataset) and ``skipped_files``.
    """

    def __init__(self, source: ImageSource, transform: ImageTransform, limit: int = 0):
        self.source = source
        self.transform = transform
        self.length = min(limit, len(source)) if limit > 0 else len(source)
        self.num_classes = source.num_classes
        self.class_names = tuple(source.class_names)
        self.skipped_files = tuple(getattr(source, "skipped", ()))
        self.num_skipped = len(self.skipped_files)
        self._skip_reasons: dict[Path, str] = dict(getattr(source, "skip_reasons", {}))
        self._root: Path | None = getattr(source, "root", None)

    def skipped_summary(self) -> str | None:
        """One line for a log, e.g. ``skipped 2 corrupt image files (e.g. a/b.jpg: truncated JPEG
        (no end-of-image marker))``; ``None`` when nothing was skipped."""
        if not self.num_skipped:
            return None
        first = self.skipped_files[0]
        shown = first.relative_to(self._root) if self._root and first.is_relative_to(self._root) else first
        reason = self._skip_reasons.get(first, "unreadable")
        files = "file" if self.num_skipped == 1 else "files"
        return f"skipped {self.num_skipped} corrupt image {files} (e.g. {shown}: {reason})"

    def __len__(self) -> int:
        return self.length

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        """The source's own training order over this dataset's items, when it has one (a source's
        ``train_sampler(seed, length)``: shards read a few at a time); ``None``: shuffle uniformly."""
        make = getattr(self.source, "train_sampler", None)
        return None if make is None else make(seed, self.length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} images")
        image, label = self.source.load(index)
        return self.transform(image), label


class WithFlippedCopies(Dataset):
    """``dataset`` followed by each of its images flipped left to right: item ``i`` is item ``i``
    of ``dataset`` for ``i < N`` and item ``i - N`` flipped for ``N <= i < 2N``, with its label. The
    codes stage stores both halves when ``codes.hflip`` is set."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        count = len(self.dataset)
        if not 0 <= index < 2 * count:
            raise IndexError(f"index {index} out of range for {2 * count} images and their flips")
        image, label = self.dataset[index % count]
        return (image.flip(-1) if index >= count else image), label


def _procedural_source(cfg: DataConfig, split: Split) -> ProceduralShapes:
    shapes = cfg.procedural
    stream = TRAIN_STREAM if split == "train" else EVAL_STREAM
    return ProceduralShapes(shapes.split_size(split), cfg.image_size, shapes.seed, stream, shapes.palette,
                            shapes.backgrounds, shapes.rotate)


def check_data_root(cfg: DataConfig) -> None:
    """A DataError when ``data.root`` does not exist and nothing will fetch it: cheap (one stat), so
    a run checks it before its first stage rather than when a later stage opens the data. A pack
    must also be finished (hold its ``index.json``); a URL is not checked (no network here)."""
    if cfg.kind == "shards" and is_url(cfg.root):
        return
    if cfg.kind == "procedural" or Path(cfg.root).exists() or (cfg.kind in _TORCHVISION_CLASSES and cfg.download):
        if cfg.kind == "shards" and not (Path(cfg.root) / INDEX_JSON).is_file():
            raise DataError(unfinished_pack_message(cfg.root))
        return
    raise DataError(f"data root not found: {cfg.root} (data.kind = {cfg.kind!r})"
                    + ("; set data.download = true to fetch it" if cfg.kind in _TORCHVISION_CLASSES else ""))


def build_source(cfg: DataConfig, split: Split, index_dir: Path | None = None) -> ImageSource:
    """The untransformed source of ``cfg.kind`` for ``split``; raises DataError when it is missing.
    ``index_dir``: where a folder's file index is kept (see :mod:`vqgen.data.folder_index`)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.kind == "procedural":
        return _procedural_source(cfg, split)
    check_data_root(cfg)
    if cfg.kind in _TORCHVISION_CLASSES:
        return torchvision_source(cfg, split)
    if cfg.kind == "npz":
        return npz_source(cfg, split)
    limit = cfg.num_train if split == "train" else cfg.num_eval
    mode = "L" if cfg.channels == 1 else "RGB"
    if cfg.kind == "shards":
        return ShardSource(cfg.root, split, mode, cfg.on_corrupt, cache_dir=cfg.cache_dir, limit=limit,
                           window_shards=cfg.shuffle_window_shards)
    return FolderSource(Path(cfg.root), split, cfg.on_corrupt, mode=mode, limit=limit, cache_dir=index_dir)


def build_dataset(cfg: DataConfig, split: Split, augment: bool = False, index_dir: Path | None = None) -> ImageDataset:
    """The dataset of ``cfg`` for ``split``: items ``(image float [C,S,S] in [-1,1], label int)``.

    ``augment`` enables the train-time augmentation the config asks for (``hflip``). The first
    ``num_train`` / ``num_eval`` items are kept when those are set. Deterministic apart from flips.
    ``index_dir``: where an image folder's file index is kept (the stages: beside the runs).
    """
    source = build_source(cfg, split, index_dir)
    transform = ImageTransform(cfg.image_size, cfg.channels, hflip=augment and cfg.hflip)
    limit = cfg.num_train if split == "train" else cfg.num_eval
    return ImageDataset(source, transform, limit)


def skipped_files_report(**splits: ImageDataset) -> tuple[dict[str, int], list[str]]:
    """Corrupt files the datasets left out (``data.on_corrupt = "skip"``): ``({"SPLIT_num_skipped":
    n}, lines to log)``, so a stage records the count in its manifest and says it on the console."""
    metrics, lines = {}, []
    for split, dataset in splits.items():
        metrics[f"{split}_num_skipped"] = dataset.num_skipped
        if (summary := dataset.skipped_summary()) is not None:
            lines.append(f"data ({split} split): {summary}")
    return metrics, lines
