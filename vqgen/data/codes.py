"""The code store: the VQ-VAE's code maps of every image, in LMDB, without pickle.

Format (``FORMAT_VERSION`` 1) of a ``codes.lmdb`` environment directory:

- one record per image; key ``f"{index:09d}".encode()``; value = the raw little-endian int16 bytes
  of each level's code map [H,W] (row-major) concatenated in level order (top, then bottom),
  followed by the label as a little-endian int32 (always present, -1 when the source has none);
- a metadata record under ``b"__meta__"``: UTF-8 JSON with ``format_version``, ``levels`` (a list of
  ``{"name", "shape": [H, W], "num_codes"}``), ``dtype`` ``"<i2"``, ``label_dtype`` ``"<i4"``,
  ``count``, ``num_classes``, ``source_checksum`` (of the VQ-VAE export the codes came from) and
  ``complete``. ``complete`` becomes true only after :meth:`CodeStoreWriter.finalize` has checked
  that records ``0 .. count-1`` all exist, so a reader can tell an interrupted extraction.

Several processes may write into one store at once (each with its own writer on disjoint
indices; LMDB serialises their write transactions). Readers open the environment lazily, once
per process, read-only and without locks, so a :class:`CodeDataset` works in DataLoader workers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from vqgen.errors import ConfigError, DataError
from vqgen.metrics.image import usage_from_counts

FORMAT_VERSION = 1
META_KEY = b"__meta__"
CODE_DTYPE = "<i2"
LABEL_DTYPE = "<i4"
KEY_DIGITS = 9
MAX_INDEX = 10**KEY_DIGITS - 1
MAX_NUM_CODES = 2**15  # codes are stored as int16
DEFAULT_MAP_SIZE = 1 << 26  # 64 MiB to start; the writer doubles it whenever it fills up

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Format helpers


@dataclass(frozen=True)
class CodeLevel:
    """One level of codes: its name, code-map shape [H, W] and codebook size."""

    name: str
    shape: tuple[int, int]
    num_codes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "num_codes": self.num_codes}


def index_key(index: int) -> bytes:
    """The record key of image ``index``: zero-padded decimal, so LMDB's byte order is index order."""
    if not 0 <= index <= MAX_INDEX:
        raise DataError(f"code store index {index} is outside 0..{MAX_INDEX}")
    return f"{index:0{KEY_DIGITS}d}".encode()


def parse_key(key: bytes) -> int | None:
    """The index of a record key, or None for a key that is not a record key (such as the meta)."""
    if len(key) == KEY_DIGITS and key.isdigit():
        return int(key)
    return None


def record_dtype(levels: Sequence[CodeLevel]) -> np.dtype:
    """A packed NumPy record type that matches the value layout byte for byte."""
    fields = [(level.name, CODE_DTYPE, level.shape) for level in levels]
    return np.dtype(fields + [("label", LABEL_DTYPE)])


def make_meta(levels: Sequence[CodeLevel], *, num_classes: int, source_checksum: str,
              count: int = 0) -> dict[str, Any]:
    """Metadata for a new store, ``complete`` false until :meth:`CodeStoreWriter.finalize`."""
    meta = {
        "format_version": FORMAT_VERSION,
        "levels": [level.to_json() for level in levels],
        "dtype": CODE_DTYPE,
        "label_dtype": LABEL_DTYPE,
        "count": count,
        "num_classes": num_classes,
        "source_checksum": source_checksum,
        "complete": False,
    }
    check_meta(meta, "new code store metadata")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(meta: Any, where: str) -> list[CodeLevel]:
    """Validate a metadata dict; returns its levels. Raises DataError naming the bad field."""

    def bad(field: str, problem: str) -> DataError:
        return DataError(f"{where}: metadata field {field!r} {problem}")

    if not isinstance(meta, dict):
        raise DataError(f"{where}: metadata is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise bad("format_version", f"is {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    if meta.get("dtype") != CODE_DTYPE or meta.get("label_dtype") != LABEL_DTYPE:
        raise bad("dtype", f"must be {CODE_DTYPE!r} with label_dtype {LABEL_DTYPE!r}")
    for field in ("count", "num_classes"):
        if not _is_int(meta.get(field)) or meta[field] < 0:
            raise bad(field, f"must be an int >= 0, got {meta.get(field)!r}")
    if not isinstance(meta.get("source_checksum"), str):
        raise bad("source_checksum", "must be a string")
    if not isinstance(meta.get("complete"), bool):
        raise bad("complete", "must be true or false")
    raw_levels = meta.get("levels")
    if not isinstance(raw_levels, list) or not raw_levels:
        raise bad("levels", "must be a non-empty list")
    levels = []
    for i, level in enumerate(raw_levels):
        if not isinstance(level, dict):
            raise bad(f"levels[{i}]", "must be an object")
        name, shape, num_codes = level.get("name"), level.get("shape"), level.get("num_codes")
        if not isinstance(name, str) or not name or name == "label":
            raise bad(f"levels[{i}].name", f"must be a non-empty string other than 'label', got {name!r}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
            raise bad(f"levels[{i}].shape", f"must be [H, W] of positive ints, got {shape!r}")
        if not _is_int(num_codes) or not 1 <= num_codes <= MAX_NUM_CODES:
            raise bad(f"levels[{i}].num_codes", f"must be an int in 1..{MAX_NUM_CODES}, got {num_codes!r}")
        levels.append(CodeLevel(name, (shape[0], shape[1]), num_codes))
    if len({level.name for level in levels}) != len(levels):
        raise bad("levels", "has duplicate level names")
    return levels


def _decode_meta(raw: bytes | None, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where}: the {META_KEY.decode()} record is not valid JSON: {err}") from err
    check_meta(meta, where)
    return meta


def _encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def _store_not_found(path: Path) -> DataError:
    return DataError(f"code store not found: {path} (no data.mdb; run the extract-codes stage first)")


def _open_readonly(path: str | os.PathLike) -> lmdb.Environment:
    """Open a store for reading: read-only, no lock file writes, no readahead (random access)."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise _store_not_found(path)
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
            raise _store_not_found(path) from None
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
_READERS = SharedReaders()


@contextmanager
def _reading(path: str | os.PathLike) -> Iterator[lmdb.Environment]:
    key, env = _READERS.acquire(path)
    try:
        yield env
    finally:
        _READERS.release(key)


def read_store_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The validated metadata of the store at ``path`` (complete or not).

    ``None`` when there is no store there yet, or it has no metadata record (an extraction that
    stopped before writing any); a metadata record that cannot be read raises :class:`DataError`.
    """
    if not (Path(path) / "data.mdb").is_file():
        return None
    with _reading(path) as env, env.begin() as txn:
        return _decode_meta(txn.get(META_KEY), str(path))


def _require_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta = read_store_meta(path)
    if meta is None:
        if not (Path(path) / "data.mdb").is_file():
            raise _store_not_found(Path(path))
        raise DataError(f"code store {path} has no {META_KEY.decode()} record: extraction did not finish "
                        "(it stopped before writing any); run the extract-codes stage again")
    return meta


def store_checksum(path: str | os.PathLike) -> str:
    """sha256 of a store's content (metadata and every record, in key order), independent of how
    LMDB laid the pages out: stores written by one process or by eight, in one go or resumed, hold
    the same codes exactly when their checksums agree."""
    import hashlib

    digest = hashlib.sha256()
    with _reading(path) as env, env.begin() as txn:
        for key, value in txn.cursor().iternext(keys=True, values=True):
            digest.update(len(key).to_bytes(4, "little") + bytes(key))
            digest.update(len(value).to_bytes(4, "little") + bytes(value))
    return digest.hexdigest()


def _as_numpy(values: Any) -> np.ndarray:
    if torch.is_tensor(values):
        return values.detach().cpu().numpy()
    return np.asarray(values)


# ----------------------------------------------------------------------------------------------
# Writing


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
        self._meta = self._run(lambda txn: _decode_meta(txn.get(META_KEY), str(self.path)), write=False)
        self._levels = check_meta(self._meta, str(self.path)) if self._meta else None

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
        levels = check_meta(meta, str(self.path))

        def work(txn: lmdb.Transaction) -> None:
            existing = _decode_meta(txn.get(META_KEY), str(self.path))
            if existing is not None:
                for field in ("levels", "num_classes", "source_checksum"):
                    if existing[field] != meta[field]:
                        raise DataError(
                            f"code store {self.path} holds codes with {field} = {existing[field]!r}, "
                            f"not {meta[field]!r}; delete it to extract again"
                        )
            txn.put(META_KEY, _encode_meta(meta))

        self._run(work)
        self._meta, self._levels = meta, levels

    def _require_levels(self) -> list[CodeLevel]:
        if self._levels is None:
            # Another process may have written the metadata since this writer opened.
            self._meta = self._run(lambda txn: _decode_meta(txn.get(META_KEY), str(self.path)), write=False)
            if self._meta is None:
                raise DataError(f"code store {self.path}: call write_meta() before writing records")
            self._levels = check_meta(self._meta, str(self.path))
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
            meta = {**_decode_meta(txn.get(META_KEY), str(self.path)), "count": count, "complete": True}
            txn.put(META_KEY, _encode_meta(meta))
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


# ----------------------------------------------------------------------------------------------
# Reading


class CodeDataset(Dataset):
    """A complete code store as a dataset: item ``i`` is ``{level: LongTensor [H,W], ..., "label": int}``.

    The metadata is checked at construction; the LMDB environment is opened on the first
    ``__getitem__`` in each process (and never pickled), so the dataset can be sent to DataLoader
    workers. Attributes: ``levels`` (names, top first), ``num_codes`` and ``shapes`` (per level),
    ``num_classes``, ``source_checksum``, ``meta``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        meta = _require_meta(path)
        if not meta["complete"]:
            raise DataError(f"code store {path} is incomplete: extraction did not finish "
                            "(finalize was never reached); run the extract-codes stage again to resume it")
        self.meta = meta
        level_specs = check_meta(meta, self.path)
        self.levels = tuple(level.name for level in level_specs)
        self.num_codes = {level.name: level.num_codes for level in level_specs}
        self.shapes = {level.name: level.shape for level in level_specs}
        self.num_classes: int = meta["num_classes"]
        self.source_checksum: str = meta["source_checksum"]
        self.count: int = meta["count"]
        self._dtype = record_dtype(level_specs)
        self._env: lmdb.Environment | None = None
        self._env_key: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return self.count

    def _txn_env(self) -> lmdb.Environment:
        # An environment must not cross a fork: acquire one in every new process.
        if self._env is None or self._env_key[0] != os.getpid():
            self._env_key, self._env = _READERS.acquire(self.path)
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

    def validate_against(self, level: str, num_codes: int, shape: Sequence[int] | None = None, *,
                         num_classes: int | None = None, prefix: str = "") -> None:
        """Check a prior's config against this store; raise ConfigError naming the mismatched field.

        ``prefix`` is the config section of the prior (e.g. ``"prior.top"``) for the error's key.
        ``num_classes`` > 0 means the prior is class-conditional: the store must have labels that fit.
        """

        def key(field: str) -> str:
            return f"{prefix}.{field}" if prefix else field

        if level not in self.levels:
            raise ConfigError(key("level"), f"{level!r} is not a level of the code store {self.path} "
                                             f"(it has {list(self.levels)})")
        if num_codes != self.num_codes[level]:
            raise ConfigError(key("num_codes"), f"is {num_codes} but the {level} codes in {self.path} come from "
                                                f"a codebook of {self.num_codes[level]}")
        if shape is not None and tuple(shape) != self.shapes[level]:
            raise ConfigError(key("shape"), f"is {tuple(shape)} but the {level} code maps in {self.path} "
                                            f"are {self.shapes[level]}")
        if num_classes:
            if self.num_classes == 0:
                raise ConfigError(key("num_classes"), f"is {num_classes} but the code store {self.path} "
                                                      "has no labels")
            if num_classes < self.num_classes:
                raise ConfigError(key("num_classes"), f"is {num_classes} but the code store {self.path} "
                                                      f"has {self.num_classes} classes")

    def close(self) -> None:
        """Release this process's handle on the store (reopened by the next read)."""
        if getattr(self, "_env", None) is not None:  # also called by __del__ after a failed __init__
            _READERS.release(self._env_key)
        self._env, self._env_key = None, None

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None  # LMDB handles cannot travel to another process
        state["_env_key"] = None
        return state


# ----------------------------------------------------------------------------------------------
# Inspection


def find_store(path: str | os.PathLike) -> Path:
    """The ``codes.lmdb`` directory given itself, the codes stage directory or the run directory."""
    path = Path(path)
    for candidate in (path, path / "codes.lmdb", path / "codes" / "codes.lmdb"):
        if (candidate / "data.mdb").is_file():
            return candidate
    raise DataError(f"no code store at {path} (looked for data.mdb in it, in codes.lmdb/ and in "
                    "codes/codes.lmdb/; run the extract-codes stage first)")


def inspect_store(path: str | os.PathLike, chunk: int = 4096) -> dict[str, Any]:
    """Counts, shapes, codebook sizes and per-level code usage of a store.

    ``path`` is the ``codes.lmdb`` directory, the codes stage directory or the run directory.
    Works on incomplete stores too (``complete`` tells). Per level: ``used`` distinct codes,
    ``usage_fraction`` of the codebook and ``perplexity`` (exp of the histogram's entropy).
    """
    path = find_store(path)
    meta = _require_meta(path)
    levels = check_meta(meta, str(path))
    dtype = record_dtype(levels)
    histograms = {level.name: np.zeros(level.num_codes, dtype=np.int64) for level in levels}
    label_counts: dict[int, int] = {}
    records = 0

    def add(values: list[bytes]) -> None:
        batch = np.frombuffer(b"".join(values), dtype=dtype)
        for level in levels:
            codes = batch[level.name].reshape(-1)
            if codes.size and (codes.min() < 0 or codes.max() >= level.num_codes):
                raise DataError(f"code store {path}: {level.name} codes outside 0..{level.num_codes - 1}")
            histograms[level.name] += np.bincount(codes, minlength=level.num_codes)
        for label, n in zip(*np.unique(batch["label"], return_counts=True)):
            label_counts[int(label)] = label_counts.get(int(label), 0) + int(n)

    with _reading(path) as env:
        with env.begin() as txn:
            values: list[bytes] = []
            for key, value in txn.cursor().iternext(keys=True, values=True):
                if parse_key(key) is None:
                    continue
                if len(value) != dtype.itemsize:
                    raise DataError(f"code store {path}: record {bytes(key).decode()} has {len(value)} bytes, "
                                    f"expected {dtype.itemsize}")
                values.append(bytes(value))
                if len(values) == chunk:
                    add(values)
                    records, values = records + len(values), []
            if values:
                add(values)
                records += len(values)

    level_info = []
    for level in levels:
        counts = histograms[level.name]
        fraction, perplexity = usage_from_counts(torch.from_numpy(counts))
        level_info.append({**level.to_json(), "used": int((counts > 0).sum()), "usage_fraction": fraction,
                           "perplexity": perplexity if counts.any() else 0.0})
    return {
        "path": str(path),
        "format_version": meta["format_version"],
        "complete": meta["complete"],
        "count": meta["count"],
        "records": records,
        "num_classes": meta["num_classes"],
        "source_checksum": meta["source_checksum"],
        "levels": level_info,
        "label_counts": dict(sorted(label_counts.items())),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """A human-readable report of :func:`inspect_store`'s result."""
    state = "complete" if info["complete"] else "INCOMPLETE (extraction did not finish)"
    lines = [
        f"code store {info['path']}",
        f"  records: {info['records']} (metadata count {info['count']}), {state}",
        f"  source checksum: {info['source_checksum'] or '-'}",
    ]
    labels = info["label_counts"]
    if info["num_classes"]:
        per_class = ", ".join(f"{label}: {n}" for label, n in labels.items())
        lines.append(f"  classes: {info['num_classes']} (images per label: {per_class})")
    else:
        lines.append("  classes: none (unlabelled)")
    lines.append(f"  {'level':<8} {'shape':>9} {'codebook':>9} {'used':>16} {'perplexity':>11}")
    for level in info["levels"]:
        shape = "x".join(str(s) for s in level["shape"])
        used = f"{level['used']} ({100 * level['usage_fraction']:.1f}%)"
        lines.append(f"  {level['name']:<8} {shape:>9} {level['num_codes']:>9} {used:>16} "
                     f"{level['perplexity']:>11.1f}")
    return "\n".join(lines)
