"""The code store's format: record layout, record keys and the metadata record.

Format (``FORMAT_VERSION`` 1) of a ``codes.lmdb`` environment directory:

- one record per image; key ``f"{index:09d}".encode()``; value = the raw little-endian int16 bytes
  of each level's code map [H,W] (row-major) concatenated in level order (top, then bottom),
  followed by the label as a little-endian int32 (always present, -1 when the source has none);
- a metadata record under ``b"__meta__"``: UTF-8 JSON with ``format_version``, ``levels`` (a list of
  ``{"name", "shape": [H, W], "num_codes"}``), ``dtype`` ``"<i2"``, ``label_dtype`` ``"<i4"``,
  ``count``, ``num_classes``, ``source_checksum`` (of the VQ-VAE export the codes came from) and
  ``complete``. ``complete`` becomes true only after ``CodeStoreWriter.finalize`` has checked
  that records ``0 .. count-1`` all exist, so a reader can tell an interrupted extraction.
  Other keys (such as the extraction stage's ``data_sha256``) are kept as they are.

The metadata travels as its JSON dict; :func:`parse_meta` validates one into a :class:`StoreMeta`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqgen.configtools import from_dict
from vqgen.errors import ConfigError, DataError

FORMAT_VERSION = 1
META_KEY = b"__meta__"
CODE_DTYPE = "<i2"
LABEL_DTYPE = "<i4"
KEY_DIGITS = 9
MAX_INDEX = 10**KEY_DIGITS - 1
MAX_NUM_CODES = 2**15  # codes are stored as int16


@dataclass(frozen=True)
class CodeLevel:
    """One level of codes: its name, code-map shape [H, W] and codebook size."""

    name: str
    shape: tuple[int, ...]  # [H, W]; checked by StoreMeta
    num_codes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "num_codes": self.num_codes}


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """The fields of the metadata record that readers use, checked."""

    format_version: int
    levels: tuple[CodeLevel, ...]
    dtype: str
    label_dtype: str
    count: int
    num_classes: int
    source_checksum: str
    complete: bool

    def __post_init__(self):
        if self.format_version != FORMAT_VERSION:
            raise ConfigError("format_version", f"is {self.format_version!r}; this version reads {FORMAT_VERSION}")
        if self.dtype != CODE_DTYPE or self.label_dtype != LABEL_DTYPE:
            raise ConfigError("dtype", f"must be {CODE_DTYPE!r} with label_dtype {LABEL_DTYPE!r}")
        for field in ("count", "num_classes"):
            if getattr(self, field) < 0:
                raise ConfigError(field, f"must be an int >= 0, got {getattr(self, field)!r}")
        if not self.levels:
            raise ConfigError("levels", "must be a non-empty list")
        for i, level in enumerate(self.levels):
            if not level.name or level.name == "label":
                raise ConfigError(f"levels[{i}].name",
                                  f"must be a non-empty string other than 'label', got {level.name!r}")
            if len(level.shape) != 2 or not all(s > 0 for s in level.shape):
                raise ConfigError(f"levels[{i}].shape", f"must be [H, W] of positive ints, got {list(level.shape)!r}")
            if not 1 <= level.num_codes <= MAX_NUM_CODES:
                raise ConfigError(f"levels[{i}].num_codes",
                                  f"must be an int in 1..{MAX_NUM_CODES}, got {level.num_codes!r}")
        if len({level.name for level in self.levels}) != len(self.levels):
            raise ConfigError("levels", "has duplicate level names")


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
    """Metadata for a new store, ``complete`` false until ``CodeStoreWriter.finalize``."""
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
    parse_meta(meta, "new code store metadata")
    return meta


def _fields_in(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; other keys are left to the caller."""
    names = [f.name for f in dataclasses.fields(cls)]
    for name in names:
        if name not in data:
            raise ConfigError(f"{prefix}{name}", "is missing")
    return {name: data[name] for name in names}


def parse_meta(meta: Any, where: str) -> StoreMeta:
    """Validate a metadata dict. Raises DataError naming ``where`` and the bad field."""
    if not isinstance(meta, dict):
        raise DataError(f"{where}: metadata is not a JSON object")
    try:
        known = _fields_in(StoreMeta, meta)
        if isinstance(known["levels"], list):
            known["levels"] = [_fields_in(CodeLevel, level, f"levels[{i}].") if isinstance(level, dict) else level
                               for i, level in enumerate(known["levels"])]
        return from_dict(StoreMeta, known)
    except ConfigError as err:
        problem = str(err).removeprefix(f"{err.key}: ")
        raise DataError(f"{where}: metadata field {err.key!r} {problem}") from None


def decode_meta(raw: bytes | None, where: str) -> dict[str, Any] | None:
    """The checked metadata dict of a raw metadata record (None for no record)."""
    if raw is None:
        return None
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where}: the {META_KEY.decode()} record is not valid JSON: {err}") from err
    parse_meta(meta, where)
    return meta


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")
