"""Read-only access to code stores: one shared LMDB handle per store and process.

Readers open the environment lazily, once per process, read-only and without locks, so a
``CodeDataset`` works in DataLoader workers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from vqgen.data.code_format import META_KEY, decode_meta
from vqgen.errors import DataError


def store_not_found(path: Path) -> DataError:
    return DataError(f"code store not found: {path} (no data.mdb; run the extract-codes stage first)")


def _open_readonly(path: str | os.PathLike) -> lmdb.Environment:
    """Open a store for reading: read-only, no lock file writes, no readahead (random access)."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise store_not_found(path)
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as err:
        raise DataError(f"cannot open code store {path}: {err} "
                        "(close its writer in this process first)") from err


class SharedReaders:
    """Read-only environments shared by every reader of a store within one process.

    LMDB forbids opening one environment twice in a process (its file locks belong to the
    process, and closing a second handle would drop the first one's), so two datasets on the same
    store, or an inspection while a dataset is open, must share one handle. Handles are counted
    and the last reader to release one closes it. Keys hold the process id, so a forked child
    never reuses its parent's handle, and the data file's inode, so a store deleted and written
    again is opened afresh.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._envs: dict[tuple[int, int, int], tuple[lmdb.Environment, int]] = {}

    @staticmethod
    def _key(path: Path) -> tuple[int, int, int]:
        try:
            stat = (path / "data.mdb").stat()
        except OSError:
            raise store_not_found(path) from None
        return os.getpid(), stat.st_dev, stat.st_ino

    def acquire(self, path: str | os.PathLike) -> tuple[tuple[int, int, int], lmdb.Environment]:
        """A read-only environment of the store at ``path`` and the key to release it with."""
        key = self._key(Path(path))
        with self._lock:
            self._drop_inherited(key)
            env, refs = self._envs.get(key) or (_open_readonly(path), 0)
            self._envs[key] = (env, refs + 1)
        return key, env

    def _drop_inherited(self, key: tuple[int, int, int]) -> None:
        """Close handles of this store copied from a parent by fork (e.g. into a DataLoader worker).

        LMDB handles must not be used across fork, and py-lmdb's one-handle-per-process guard is
        copied too, so the child must close its copy before opening its own. For these read-only,
        lock-free handles that only unmaps the child's memory; the parent's handle is untouched.
        """
        for other in [k for k in self._envs if k[0] != key[0] and k[1:] == key[1:]]:
            self._envs.pop(other)[0].close()

    def release(self, key: tuple[int, int, int]) -> None:
        with self._lock:
            if key not in self._envs or key[0] != os.getpid():
                return
            env, refs = self._envs.pop(key)
            if refs > 1:
                self._envs[key] = (env, refs - 1)
            else:
                env.close()


# One registry per process: the rule it enforces (one handle per store) is per process too.
READERS = SharedReaders()


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[lmdb.Environment]:
    key, env = READERS.acquire(path)
    try:
        yield env
    finally:
        READERS.release(key)


def read_store_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The validated metadata of the store at ``path`` (complete or not).

    ``None`` when there is no store there yet, or it has no metadata record (an extraction that
    stopped before writing any); a metadata record that cannot be read raises :class:`DataError`.
    """
    if not (Path(path) / "data.mdb").is_file():
        return None
    with reading(path) as env, env.begin() as txn:
        return decode_meta(txn.get(META_KEY), str(path))


def require_store_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Like :func:`read_store_meta`, but a missing store or metadata record raises DataError."""
    meta = read_store_meta(path)
    if meta is None:
        if not (Path(path) / "data.mdb").is_file():
            raise store_not_found(Path(path))
        raise DataError(f"code store {path} has no {META_KEY.decode()} record: extraction did not finish "
                        "(it stopped before writing any); run the extract-codes stage again")
    return meta
