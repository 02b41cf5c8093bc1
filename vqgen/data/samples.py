"""Samples files: generated images as an ``.npz`` with uint8 ``images [N, C, H, W]`` (C = 1 or 3)
and, optionally, int64 ``labels [N]`` (-1 for an unconditional sample).

The sample stage writes them (``samples/samples.npz``); the evaluate stage and ``vqgen fid`` read
them. Reading never unpickles: object arrays are refused with a :class:`~vqgen.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from vqgen.data.datasets import IMAGE_EXTENSIONS, open_npz, read_npz_array
from vqgen.errors import DataError
from vqgen.utils import atomic_replace, atomic_write_bytes


def _check_images(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or 0 in images.shape:
        raise DataError(f"{path}: 'images' must be [N, C, H, W] with C = 1 or 3 and N, H, W > 0, "
                        f"got shape {images.shape}")
    return images


def _check_labels(labels: np.ndarray, count: int, path: Path) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    if labels.shape != (count,):
        raise DataError(f"{path}: 'labels' must have shape ({count},), one per image, got {labels.shape}")
    return labels.astype(np.int64, copy=False)


def save_samples(path: str | os.PathLike, images, labels=None, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write a samples file atomically (a reader sees the old file or the whole new one).

    ``images``: uint8 ``[N, C, H, W]``; ``labels``: ``[N]`` integers or ``None``. Arrays or CPU tensors.
    ``extra``: further numeric arrays stored beside them (a sampling part's rejection figures);
    the readers of samples files leave them alone.
    """
    path = Path(path)
    arrays = {"images": _check_images(np.asarray(images), path)}
    if labels is not None:
        arrays["labels"] = _check_labels(np.asarray(labels), len(arrays["images"]), path)
    for key, value in (extra or {}).items():
        if key in arrays:
            raise ValueError(f"extra array {key!r} would replace the samples' own")
        arrays[key] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 [N, C, H, W], labels int64 [N] or None)`` of a samples file.

    A missing file, one that is not an ``.npz``, one without an ``images`` array, object arrays,
    and arrays of the wrong dtype or shape raise :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file not found: {path}")
    with open_npz(path) as arrays:
        if "images" not in arrays.files:
            raise DataError(f"{path}: no 'images' array (arrays found: {sorted(arrays.files)}); a samples "
                            "file holds uint8 images [N, C, H, W] under the key 'images'")
        images = _check_images(read_npz_array(arrays, path, "images"), path)
        labels = read_npz_array(arrays, path, "labels") if "labels" in arrays.files else None
    return images, None if labels is None else _check_labels(labels, len(images), path)


def load_image_folder(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 [N, C, H, W], labels or None)`` of a folder of image files (any model's
    samples), in sorted path order. Images in subfolders named by integers (``3/0001.png``, as
    ``vqgen sample`` writes class-conditional samples) carry those labels. Every image must have the
    same size; an unreadable file or a size mismatch is a DataError naming the file. A ``vqgen
    sample`` output folder is read from its ``images/``."""
    from PIL import Image, UnidentifiedImageError  # here: reading samples files needs no Pillow

    root = Path(path)
    if (root / "images").is_dir() and (root / "manifest.json").is_file():
        root = root / "images"  # a `vqgen sample` folder: its images, not its grid
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
    images, labels = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{file}: not a readable image ({err})") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if images and array.shape != images[0].shape:
            raise DataError(f"{file}: image of shape {array.shape[1:]} (C {array.shape[0]}), but "
                            f"{files[0]} is {images[0].shape[1:]} (C {images[0].shape[0]}): score images of one size")
        images.append(array)
        parent = file.parent.relative_to(root)
        labels.append(int(parent.name) if parent.name.isdigit() and len(parent.parts) == 1 else None)
    labelled = all(label is not None for label in labels)
    return np.stack(images), np.asarray(labels, dtype=np.int64) if labelled else None


def load_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """A samples ``.npz`` (:func:`load_samples`) or a folder of images (:func:`load_image_folder`)."""
    return load_image_folder(path) if Path(path).is_dir() else load_samples(path)


def _npy_shape(arrays: np.lib.npyio.NpzFile, path: Path, key: str) -> tuple[int, ...]:
    """The shape in array ``key``'s ``.npy`` header, read without loading the data."""
    try:
        with arrays.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            return tuple(read_header(member)[0])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read array {key!r} ({type(err).__name__}: {err})") from err


def _read_part(path: Path, key: str, count: int) -> np.ndarray:
    """Array ``key`` ("images" or "labels", ``count`` of them) of a samples file, checked as
    :func:`load_samples` checks it, without reading the other array."""
    with open_npz(path) as arrays:
        array = read_npz_array(arrays, path, key)
    return _check_images(array, path) if key == "images" else _check_labels(array, count, path)


def _write_member(archive, key: str, dtype: np.dtype, shape: tuple[int, ...], chunks, digest) -> None:
    """Array ``key`` of ``shape`` into the open zip ``archive`` as an ``.npy``: the header, then
    each chunk's bytes (C order), each also fed to ``digest``."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype).data
            member.write(data)
            digest.update(data)


def concatenate_samples(path: str | os.PathLike, parts: list[str | os.PathLike]) -> str:
    """Join samples files (``parts``, in order) into one samples file at ``path`` with one part's
    array in memory at a time: the ``.npz`` is written member by member, each ``.npy`` header (of
    the joined shape) followed by every part's bytes. Written to a temporary name and renamed.

    Returns the sha256 of ``repr(shape)``, the image bytes and the label bytes: a fingerprint of the
    arrays that, unlike the file's checksum, does not depend on the zip's timestamps. The parts
    must all hold labels or all hold none, and images of one ``[C, H, W]``.
    """
    path, parts = Path(path), [Path(p) for p in parts]
    if not parts:
        raise DataError(f"{path}: no samples files to join")
    shapes, labelled = [], []
    for part in parts:  # headers only: the joined shape comes first in the file
        with open_npz(part) as arrays:
            shapes.append(_npy_shape(arrays, part, "images"))
            labelled.append("labels" in arrays.files)
    for part, shape, has_labels in zip(parts, shapes, labelled):
        if shape[1:] != shapes[0][1:] or has_labels != labelled[0]:
            raise DataError(f"{part}: images {shape} {'with' if has_labels else 'without'} labels cannot join "
                            f"{parts[0]}'s images {shapes[0]} {'with' if labelled[0] else 'without'} labels")
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    digest = hashlib.sha256(repr(shape).encode())
    with atomic_replace(path) as tmp, open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            images = (_read_part(p, "images", s[0]) for p, s in zip(parts, shapes))
            _write_member(archive, "images", np.dtype(np.uint8), shape, images, digest)
            if labelled[0]:
                labels = (_read_part(p, "labels", s[0]) for p, s in zip(parts, shapes))
                _write_member(archive, "labels", np.dtype(np.int64), shape[:1], labels, digest)
    return digest.hexdigest()


def first_images(parts: list[str | os.PathLike], count: int) -> np.ndarray:
    """The first ``count`` images of samples files taken in order, reading no part beyond them."""
    taken, have = [], 0
    for part in parts:
        if have >= count:
            break
        taken.append(load_samples(part)[0])
        have += len(taken[-1])
    return np.concatenate(taken)[:count]
