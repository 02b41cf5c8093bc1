"""Writing code stores: batched, resumable, from several processes at once.

Several processes may write into one store at once (each with its own writer on disjoint
indices; LMDB serialises their write transactions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np
import torch

from vqgen.data.code_format import (
    CODE_DTYPE,
    FORMAT_VERSION,
    LABEL_DTYPE,
    META_KEY,
    CodeLevel,
    decode_meta,
    encode_meta,
    index_key,
    parse_key,
    parse_meta,
    record_dtype,
)
from vqgen.errors import DataError

DEFAULT_MAP_SIZE = 1 << 26  # 64 MiB to start; the writer doubles it whenever it fills up

T = TypeVar("T")


def _as_numpy(values: Any) -> np.ndarray:
    if torch.is_tensor(values):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class CodeStoreWriter:
    """Writes code records into ``path`` (an LMDB directory), in batched transactions.

    Use as a context manager. Call :meth:`write_meta` before the first record (every process may
    call it with the same metadata; a store written from a different VQ-VAE export is refused),
    then :meth:`put` / :meth:`put_batch`, and finally (one process, after all have closed their
    writers or at least flushed) :meth:`finalize`. A record whose index is already stored is
    dropped (``num_duplicates``): DistributedSampler pads its last batch with repeated images, and
    a resumed extraction may write an image again. When the memory map fills up it is doubled and
    the transaction retried.
    """

    def __init__(self, path: str | os.PathLike, *, map_size: int = DEFAULT_MAP_SIZE, commit_every: int = 512):
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # lock=True: LMDB's lock file serialises write transactions across processes.
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, subdir=True, lock=True,
                                 readahead=False, meminit=False)
        except lmdb.Error as err:
            raise DataError(f"cannot open code store {self.path} for writing: {err} "
                            "(close readers of it in this process first)") from err
        self.commit_every = commit_every
        self.num_written = 0
        self.num_duplicates = 0
        self._pending: dict[bytes, bytes] = {}
        self._meta = self._run(lambda txn: decode_meta(txn.get(META_KEY), str(self.path)), write=False)
        self._levels = parse_meta(self._meta, str(self.path)).levels if self._meta else None

    # --- transactions with map growth ---

    def _run(self, work: Callable[[lmdb.Transaction], T], write: bool = True) -> T:
        """Run ``work`` in one transaction; grow the map and retry when it is full.

        ``work`` must be safe to repeat: a failed transaction is aborted as a whole.
        """
        while True:
            try:
                with self.env.begin(write=write) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew the map: adopt its size

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    # --- metadata ---

    def write_meta(self, meta: dict[str, Any], complete: bool = False) -> None:
        """Store ``meta`` with ``complete`` set as given.

        ``meta`` needs ``levels``, ``num_classes`` and ``source_checksum`` (see :func:`make_meta`);
        the format fields and ``count`` are filled in when absent. Extra keys are kept.
        """
        defaults = {"format_version": FORMAT_VERSION, "dtype": CODE_DTYPE, "label_dtype": LABEL_DTYPE, "count": 0}
        meta = {**defaults, **meta, "complete": complete}
        levels = parse_meta(meta, str(self.path)).levels

        def work(txn: lmdb.Transaction) -> None:
            existing = decode_meta(txn.get(META_KEY), str(self.path))
            if existing is not None:
                for field in ("levels", "num_classes", "source_checksum"):
                    if existing[field] != meta[field]:
                        raise DataError(
                            f"code store {self.path} holds codes with {field} = {existing[field]!r}, "
                            f"not {meta[field]!r}; delete it to extract again"
                        )
            txn.put(META_KEY, encode_meta(meta))

        self._run(work)
        self._meta, self._levels = meta, levels

    def _require_levels(self) -> tuple[CodeLevel, ...]:
        if self._levels is None:
            # Another process may have written the metadata since this writer opened.
            self._meta = self._run(lambda txn: decode_meta(txn.get(META_KEY), str(self.path)), write=False)
            if self._meta is None:
                raise DataError(f"code store {self.path}: call write_meta() before writing records")
            self._levels = parse_meta(self._meta, str(self.path)).levels
        return self._levels

    # --- records ---

    def put(self, index: int, codes: Sequence[Any], label: int = -1) -> None:
        """Add the record of image ``index``: one int16-convertible [H,W] code map per level."""
        self.put_batch([index], [_as_numpy(c)[None] for c in codes], [label])

    def put_batch(self, indices: Any, codes_per_level: Sequence[Any], labels: Any = None) -> None:
        """Add B records: ``indices`` [B], one [B,H,W] code array per level, ``labels`` [B] or None (-1)."""
        levels = self._require_levels()
        indices = _as_numpy(indices).reshape(-1).astype(np.int64)
        if len(codes_per_level) != len(levels):
            raise DataError(f"code store {self.path}: got {len(codes_per_level)} code maps per image, "
                            f"expected one per level {[lv.name for lv in levels]}")
        records = np.zeros(len(indices), dtype=record_dtype(levels))
        for level, codes in zip(levels, codes_per_level):
            codes = _as_numpy(codes)
            if codes.shape != (len(indices), *level.shape):
                raise DataError(f"code store {self.path}: {level.name} codes have shape {codes.shape}, "
                                f"expected {(len(indices), *level.shape)}")
            if codes.size and (codes.min() < 0 or codes.max() >= level.num_codes):
                raise DataError(f"code store {self.path}: {level.name} codes must be in 0..{level.num_codes - 1}, "
                                f"got range {codes.min()}..{codes.max()}")
            records[level.name] = codes
        if labels is not None:
            labels = _as_numpy(labels).reshape(-1)
            if len(labels) != len(indices):
                raise DataError(f"code store {self.path}: {len(labels)} labels for {len(indices)} images")
        records["label"] = -1 if labels is None else labels
        blob, size = records.tobytes(), records.dtype.itemsize
        for i, index in enumerate(indices.tolist()):
            # setdefault: the first copy of a repeated index wins, as in the store.
            self._pending.setdefault(index_key(index), blob[i * size : (i + 1) * size])
        if len(self._pending) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit the pending records in one transaction."""
        if not self._pending:
            return
        pending = self._pending

        def work(txn: lmdb.Transaction) -> int:
            return sum(txn.put(key, value, overwrite=False) for key, value in pending.items())

        written = self._run(work)
        self.num_written += written
        self.num_duplicates += len(pending) - written
        self._pending = {}

    def existing_indices(self) -> set[int]:
        """Indices already stored (after committing pending records), so a resumed run can skip them."""
        self.flush()

        def work(txn: lmdb.Transaction) -> set[int]:
            keys = (parse_key(key) for key in txn.cursor().iternext(keys=True, values=False))
            return {index for index in keys if index is not None}

        return self._run(work, write=False)

    def finalize(self, count: int) -> dict[str, Any]:
        """Check that exactly records ``0 .. count-1`` exist with the right size; mark complete.

        The check and the metadata update happen in one write transaction, so the store is never
        marked complete with a record missing. Returns the final metadata.
        """
        self.flush()
        levels = self._require_levels()
        record_size = record_dtype(levels).itemsize

        def work(txn: lmdb.Transaction) -> dict[str, Any]:
            found = []
            for key, value in txn.cursor().iternext(keys=True, values=True):
                index = parse_key(key)
                if key == META_KEY:
                    continue
                if index is None:
                    raise DataError(f"code store {self.path}: unexpected key {bytes(key)!r}")
                if len(value) != record_size:
                    raise DataError(f"code store {self.path}: record {bytes(key).decode()} has {len(value)} bytes, "
                                    f"expected {record_size}")
                found.append(index)
            _check_indices(np.asarray(found, dtype=np.int64), count, self.path)
            meta = {**decode_meta(txn.get(META_KEY), str(self.path)), "count": count, "complete": True}
            txn.put(META_KEY, encode_meta(meta))
            return meta

        self._meta = self._run(work)
        return self._meta

    def close(self) -> None:
        """Commit what is pending and close the environment."""
        if self.env is None:
            return
        try:
            self.flush()
        finally:
            self.env.close()
            self.env = None

    def __enter__(self) -> CodeStoreWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_indices(found: np.ndarray, count: int, path: Path) -> None:
    """``found`` (sorted, unique: LMDB keys) must be exactly 0..count-1."""
    if len(found) == count and (count == 0 or (found[0] == 0 and found[-1] == count - 1)):
        return
    missing = np.setdiff1d(np.arange(count), found)
    extra = found[found >= count]
    problems = []
    if len(missing):
        problems.append(f"{len(missing)} missing (first: {missing[:5].tolist()})")
    if len(extra):
        problems.append(f"{len(extra)} beyond the count (first: {extra[:5].tolist()})")
    raise DataError(f"code store {path}: expected records 0..{count - 1}, found {len(found)}; "
                    + "; ".join(problems))
