"""A full, read-only or forbidden disk is a named StorageError; nothing already written is lost."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vqgen import utils
from vqgen.errors import StorageError, VQGenError
from vqgen.utils import atomic_write_bytes, storage_errors

SCRIPT = Path(__file__).parent / "scripts" / "full_disk_train.py"


def can_mount_tmpfs(where: Path) -> str | None:
    """None when this process may mount a tmpfs in a namespace of its own, else why not."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux with unshare"
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -m + mount -t tmpfs not permitted: {probe.stderr.strip()}"


def test_checkpoints_on_a_disk_that_fills_up(tmp_path):
    mnt, ref = tmp_path / "mnt", tmp_path / "ref"
    mnt.mkdir()
    ref.mkdir()
    if (reason := can_mount_tmpfs(mnt)) is not None:
        pytest.skip(reason)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["unshare", "-m", sys.executable, str(SCRIPT), str(mnt), str(ref)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-6000:]


def test_no_space_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=f"no space left on device while writing {target}"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_permission_denied_is_named(tmp_path, monkeypatch):
    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(StorageError, match="cannot write .*state.json: permission denied"):
        atomic_write_bytes(tmp_path / "state.json", b"new")
    assert list(tmp_path.iterdir()) == []


def test_a_bare_runtime_error_counts_as_full_only_on_a_full_disk(tmp_path, monkeypatch):
    # torch.save reports ENOSPC as "unexpected pos ..." or "basic_ios::clear", with no errno.
    cleaned = []
    with pytest.raises(RuntimeError, match="basic_ios::clear"):
        with storage_errors(tmp_path / "x", "checkpoint x", cleanup=lambda: cleaned.append(1)):
            raise RuntimeError("basic_ios::clear: iostream error")
    assert cleaned == [1]  # a real bug keeps its own error, but the leftovers still go

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(StorageError, match=r"no space left on device while writing checkpoint x \(0.0 MiB free on /"):
        with storage_errors(tmp_path / "x", "checkpoint x"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError):
        with storage_errors(tmp_path / "x", "x"):
            raise ValueError("not about the disk")
    assert issubclass(StorageError, VQGenError)
