"""Inspecting a code store: counts, shapes, code usage per level, and a text report of them."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vqgen.data.code_dataset import find_store
from vqgen.data.code_format import parse_key, parse_meta, record_dtype
from vqgen.data.code_readers import reading, require_store_meta
from vqgen.errors import DataError
from vqgen.metrics.image import usage_from_counts


def inspect_store(path: str | os.PathLike, chunk: int = 4096) -> dict[str, Any]:
    """Counts, shapes, codebook sizes and per-level code usage of a store.

    ``path`` is the ``codes.lmdb`` directory, the codes stage directory or the run directory.
    Works on incomplete stores too (``complete`` tells). Per level: ``used`` distinct codes,
    ``usage_fraction`` of the codebook and ``perplexity`` (exp of the histogram's entropy).
    """
    path = find_store(path)
    meta = require_store_meta(path)
    levels = parse_meta(meta, str(path)).levels
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

    with reading(path) as env:
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
