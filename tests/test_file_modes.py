"""Atomically written files get the user's umask, as a plain ``open()`` would give them."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from vqgen.models.export import save_weights
from vqgen.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

WRITERS: dict[str, Callable[[Path], None]] = {
    "bytes": lambda path: atomic_write_bytes(path, b"\x00\x01"),
    "text": lambda path: atomic_write_text(path, "text\n"),
    "json": lambda path: atomic_write_json(path, {"a": 1}),
    "weights": lambda path: save_weights(torch.nn.Linear(2, 2), path, f"weights {path}"),
}


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test; the old one comes back afterwards, whatever happens."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_new_files_honour_the_umask(tmp_path, umask, writer, mask, expected):
    umask(mask)
    path = tmp_path / "out" / f"file.{writer}"
    WRITERS[writer](path)
    assert _mode(path) == expected
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_replaced_file_gets_the_umask_again(tmp_path, umask, writer):
    # The rename puts a new inode in place, so the old file's mode does not carry over; the umask
    # in force at the time of the write decides, as for any newly created file.
    path = tmp_path / f"file.{writer}"
    umask(0o077)
    WRITERS[writer](path)
    umask(0o022)
    WRITERS[writer](path)
    assert _mode(path) == 0o644
