"""Small helpers shared across vqgen: atomic writes, checksums, JSON I/O, file locks and verified
downloads."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from tqdm.auto import tqdm

from vqgen.errors import StorageError

NEARLY_FULL_BYTES = 1 << 20
"""Free space under which a serialiser's error that names no cause counts as a full disk: torch's
writer reports ENOSPC as a bare ``RuntimeError`` ("unexpected pos ...", "basic_ios::clear")."""

_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_RESUME_HINT = "the stage resumes from its last finished checkpoint"


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _errno_of(err: BaseException) -> int | None:
    """The errno behind a failed write. torch and safetensors raise their own types but keep the
    system's words in the message ("... (os error 28)", "strerror: Read-only file system")."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    text = str(err)
    if match := re.search(r"os error (\d+)", text):
        return int(match.group(1))
    return next((code for code in _FULL + _UNWRITABLE if os.strerror(code) in text), None)


def _storage_fault(err: BaseException, path: Path) -> str | None:
    """"full", "read-only" or "denied" when the filesystem made writing ``path`` fail, else None."""
    if not isinstance(err, (OSError, RuntimeError, SafetensorError)):
        return None  # a bug, or a StorageError already named further in
    code, where = _errno_of(err), _existing(path)
    try:
        read_only, free = bool(os.statvfs(where).f_flag & os.ST_RDONLY), shutil.disk_usage(where).free
    except OSError:
        return None  # the filesystem cannot even be asked: leave the original error as it is
    if code in _FULL or (code is None and free < NEARLY_FULL_BYTES):
        return "full"
    if code == errno.EROFS or (code in _UNWRITABLE + (None,) and read_only):
        return "read-only"
    if code in _UNWRITABLE or (code is None and not os.access(where, os.W_OK)):
        return "denied"
    return None


def _storage_message(fault: str, path: Path, what: str, err: BaseException) -> str:
    mount = _mount_point(path)
    if fault == "full":
        free = shutil.disk_usage(mount).free / 2**20
        return (f"no space left on device while writing {what} ({free:.1f} MiB free on {mount}); "
                f"free space and run again: {_RESUME_HINT}")
    if fault == "read-only":
        return f"cannot write {what}: {mount} is mounted read-only; make it writable and run again: {_RESUME_HINT}"
    return f"cannot write {what}: permission denied ({err}); fix the permissions and run again: {_RESUME_HINT}"


@contextmanager
def storage_errors(path: str | os.PathLike, what: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Remove a failed write's leftovers (``cleanup``) and, where the filesystem is at fault (no
    space, read-only, no permission), raise :class:`StorageError` naming ``what`` instead."""
    try:
        yield
    except BaseException as err:
        # Judged before the clean-up: the partial file is what filled the disk.
        fault = _storage_fault(err, Path(path))
        if cleanup is not None:
            cleanup()
        if fault is None:
            raise
        raise StorageError(_storage_message(fault, Path(path), what, err)) from err


def _new_temp_file(path: Path, suffix: str = ".tmp") -> Path:
    """An empty new file beside ``path`` (same filesystem, so the rename is atomic), named
    ``.NAME.<random>SUFFIX``.

    Created with mode 0o666, which the kernel masks with the umask exactly as for ``open()``:
    ``tempfile.mkstemp``'s 0o600 would make every output readable by its owner only, and runs
    are often shared by a team.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer's temporary file: draw another name
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_replace(path: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (by name, with any writer); when the
    block ends it is fsynced and renamed over ``path``, so a reader sees either the old file or the
    whole new one. The file gets ``0o666 & ~umask``, as a plain ``open()`` would give it.

    If the block fails the temporary file is removed; a full, read-only or forbidden disk is a
    :class:`StorageError` naming ``what`` (default: the path).
    """
    path = Path(path)
    what = what or str(path)
    with storage_errors(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_file(path)
        mode = stat.S_IMODE(tmp.stat().st_mode)  # the kernel's 0o666 & ~umask, without reading the umask
    with storage_errors(path, what, cleanup=lambda: tmp.unlink(missing_ok=True)):
        yield tmp
        # Some writers replace the file rather than write into it (safetensors' save_file renames its
        # own 0o600 temporary file over the name it is given): put the mode back.
        os.chmod(tmp, mode)
        _fsync(tmp)  # before the rename: a crash must not leave an empty file under the real name
        os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Checksum of a JSON-serialisable object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` in eval mode inside the block, back in the mode it was in after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create ``folder`` if needed and write and remove a probe file in it: a StorageError naming
    ``what`` now rather than when a long job first writes there."""
    folder = Path(folder)
    with storage_errors(folder, what):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".vqgen-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block; the kernel drops it if the process dies.

    The lock file stays: deleting it would let a process still waiting on the old file and one
    that opens a new file at the same name both hold "the" lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


DOWNLOAD_TIMEOUT_S = 60
"""Seconds without a byte before a download counts as failed (per socket operation, not in total)."""
_DOWNLOAD_CHUNK_BYTES = 1 << 20


def download_verified(url: str, destination: Path, check: Callable[[str], None], *, progress: bool = True) -> None:
    """Download ``url`` into a temporary file beside ``destination`` and move it there once
    ``check(sha256 hex digest of the bytes)`` returns (it raises to refuse them): a reader sees no
    file or the whole checked one, never a partial one, and nothing is left behind on failure.

    Network errors propagate as ``OSError`` (``urllib.error.URLError`` included) or
    ``http.client.HTTPException``; a body shorter than its ``Content-Length`` is a ``ConnectionError``.
    """
    tmp = _new_temp_file(destination, suffix=".part")
    try:
        digest = _fetch(url, tmp, destination.name if progress else None)
        check(digest)
        os.replace(tmp, destination)
    except BaseException:  # Ctrl-C included: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise


def download_once(url: str, destination: Path, check: Callable[[str], None], *, progress: bool = True) -> None:
    """:func:`download_verified` unless ``destination`` exists. Processes that call this at once
    for one file download it once: the others wait on a lock beside it (``NAME.lock``), then find it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(destination.with_name(destination.name + ".lock")):
        if destination.is_file():  # the process that held the lock fetched it
            return
        download_verified(url, destination, check, progress=progress)


def _fetch(url: str, tmp: Path, label: str | None) -> str:
    """Stream ``url`` into ``tmp`` (with a progress bar named ``label``, none when ``None``);
    returns the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Downloading {label}",
                  disable=label is None) as bar:
            received = 0
            while chunk := response.read(_DOWNLOAD_CHUNK_BYTES):
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client ends a body that stops short without an error; say so instead of
        # reporting a checksum mismatch.
        if total is not None and received != total:
            raise ConnectionError(f"the connection closed after {received} of {total} bytes")
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc keep the memory of freed tensors for the next step, instead of unmapping every large
    block when it is freed and faulting fresh zeroed pages in for the next one: a training step
    frees and reallocates the same activations each time. Measured on the demo's bottom prior (2
    CPU cores, 300 steps, four pairs of alternating runs): system time 4.0-4.8 s → 0.9-1.2 s of
    about 130 s of CPU time; wall time 0-13% lower, within this machine's drift. The price is that
    the process keeps its peak memory until it exits.

    Does nothing off glibc, when the user has set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_``, or with ``VQGEN_MALLOC_TUNING=0``. Returns whether it applied."""
    if os.environ.get("VQGEN_MALLOC_TUNING") == "0":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not Linux, or not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
