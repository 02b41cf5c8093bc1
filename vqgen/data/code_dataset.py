"""Reading code stores: a complete store as a dataset, finding a store, and its content checksum."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from vqgen.data.code_format import index_key, parse_meta, record_dtype
from vqgen.data.code_readers import READERS, reading, require_store_meta
from vqgen.errors import DataError


class CodeDataset(Dataset):
    """A complete code store as a dataset: item ``i`` is ``{level: LongTensor [H,W], ..., "label": int}``.

    The metadata is checked at construction; the LMDB environment is opened on the first
    ``__getitem__`` in each process (and never pickled), so the dataset can be sent to DataLoader
    workers. Attributes: ``levels`` (names, top first), ``num_codes`` and ``shapes`` (per level),
    ``num_classes``, ``source_checksum``, ``meta``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.meta = require_store_meta(path)
        spec = parse_meta(self.meta, self.path)
        if not spec.complete:
            raise DataError(f"code store {path} is incomplete: extraction did not finish "
                            "(finalize was never reached); run the extract-codes stage again to resume it")
        self.levels = tuple(level.name for level in spec.levels)
        self.num_codes = {level.name: level.num_codes for level in spec.levels}
        self.shapes = {level.name: level.shape for level in spec.levels}
        self.num_classes = spec.num_classes
        self.source_checksum = spec.source_checksum
        self.count = spec.count
        self._dtype = record_dtype(spec.levels)
        self._env: lmdb.Environment | None = None
        self._env_key: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return self.count

    def _txn_env(self) -> lmdb.Environment:
        # An environment must not cross a fork: acquire one in every new process.
        if self._env is None or self._env_key[0] != os.getpid():
            self._env_key, self._env = READERS.acquire(self.path)
        return self._env

    def read_record(self, index: int) -> np.void:
        """The raw record of image ``index`` as a NumPy structured scalar."""
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for a code store of {self.count} records")
        key = index_key(index)
        with self._txn_env().begin() as txn:
            value = txn.get(key)
        if value is None:
            raise DataError(f"code store {self.path}: record {key.decode()} is missing")
        if len(value) != self._dtype.itemsize:
            raise DataError(f"code store {self.path}: record {key.decode()} has {len(value)} bytes, "
                            f"expected {self._dtype.itemsize}")
        return np.frombuffer(value, dtype=self._dtype)[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.read_record(index)
        item: dict[str, Any] = {name: torch.from_numpy(record[name].astype(np.int64)) for name in self.levels}
        item["label"] = int(record["label"])
        return item

    def close(self) -> None:
        """Release this process's handle on the store (reopened by the next read)."""
        if getattr(self, "_env", None) is not None:  # also called by __del__ after a failed __init__
            READERS.release(self._env_key)
        self._env, self._env_key = None, None

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None  # LMDB handles cannot travel to another process
        state["_env_key"] = None
        return state


def find_store(path: str | os.PathLike) -> Path:
    """The ``codes.lmdb`` directory given itself, the codes stage directory or the run directory."""
    path = Path(path)
    for candidate in (path, path / "codes.lmdb", path / "codes" / "codes.lmdb"):
        if (candidate / "data.mdb").is_file():
            return candidate
    raise DataError(f"no code store at {path} (looked for data.mdb in it, in codes.lmdb/ and in "
                    "codes/codes.lmdb/; run the extract-codes stage first)")


def store_checksum(path: str | os.PathLike) -> str:
    """sha256 of a store's content (metadata and every record, in key order), independent of how
    LMDB laid the pages out: stores written by one process or by eight, in one go or resumed, hold
    the same codes exactly when their checksums agree."""
    digest = hashlib.sha256()
    with reading(path) as env, env.begin() as txn:
        for key, value in txn.cursor().iternext(keys=True, values=True):
            digest.update(len(key).to_bytes(4, "little") + bytes(key))
            digest.update(len(value).to_bytes(4, "little") + bytes(value))
    return digest.hexdigest()
