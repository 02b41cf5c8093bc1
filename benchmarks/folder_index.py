"""Time to the first item of a folder dataset: every file checked (no index), cold index, warm index.

    OMP_NUM_THREADS=1 python benchmarks/folder_index.py [--root /tmp/vqgen-folder-bench] [--files 100000]

Creates ``--root`` when missing (``--files`` 16x16 PNGs in 10 class subfolders; a minute or two
for 100,000), then times each case once. The index is kept in a fresh temporary ``cache_dir``, so
the data folder is never written to and the cold case really is cold. The listing alone (one stat
per file, what a warm build still does) is timed too. "no index" is what every build did before
the index (``use_index=False``; it shares the index's faster label code, so the pre-index code
itself was somewhat slower still). The OS page cache is warm in every case
after the folder was made: on a cold network filesystem the opens cost far more.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vqgen.data.datasets import IMAGE_EXTENSIONS, FolderSource, ImageDataset, ImageTransform
from vqgen.data.folder_index import scan_image_files

CLASSES = 10


def make_folder(root: Path, count: int) -> None:
    """``count`` 16x16 noise PNGs, ``root/classK/NNNNNN.png``; skipped when ``root`` already exists."""
    if root.exists():
        return
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + ".partial")  # a run cut short does not leave a short folder
    for i in range(count):
        path = tmp / f"class{i % CLASSES}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    tmp.rename(root)


def time_to_first_item(build: Callable[[], FolderSource]) -> tuple[float, int]:
    start = time.perf_counter()
    dataset = ImageDataset(build(), ImageTransform(16, 3))
    dataset[0]
    return time.perf_counter() - start, len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/vqgen-folder-bench"))
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    make_folder(args.root, args.files)

    start = time.perf_counter()
    listed = len(scan_image_files(args.root, IMAGE_EXTENSIONS))
    print(f"listing only (scandir + stat): {time.perf_counter() - start:7.2f} s  ({listed} files)")
    with tempfile.TemporaryDirectory() as cache:
        cases = [
            ("no index (every file opened)", dict(use_index=False)),
            ("index, cold", dict(cache_dir=Path(cache))),
            ("index, warm", dict(cache_dir=Path(cache))),
        ]
        for name, options in cases:
            seconds, n = time_to_first_item(lambda: FolderSource(args.root, "train", "error", "RGB", **options))
            print(f"{name:30s} {seconds:7.2f} s  ({n} train items)")


if __name__ == "__main__":
    main()
