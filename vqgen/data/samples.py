"""Samples files: generated images as an ``.npz`` with uint8 ``images [N, C, H, W]`` (C = 1 or 3)
and, optionally, int64 ``labels [N]`` (-1 for an unconditional sample).

The sample stage writes them (``samples/samples.npz``); the evaluate stage and ``vqgen fid`` read
them. Reading never unpickles: object arrays are refused with a :class:`~vqgen.errors.DataError`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from vqgen.data.datasets import open_npz, read_npz_array
from vqgen.errors import DataError
from vqgen.utils import atomic_write_bytes


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


def save_samples(path: str | os.PathLike, images, labels=None) -> None:
    """Write a samples file atomically (a reader sees the old file or the whole new one).

    ``images``: uint8 ``[N, C, H, W]``; ``labels``: ``[N]`` integers or ``None``. Arrays or CPU tensors.
    """
    path = Path(path)
    arrays = {"images": _check_images(np.asarray(images), path)}
    if labels is not None:
        arrays["labels"] = _check_labels(np.asarray(labels), len(arrays["images"]), path)
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
