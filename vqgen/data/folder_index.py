"""A cached listing of an image folder and of its files' header checks.

Checking every file of an image folder (:func:`vqgen.data.datasets.check_image_file`) means opening
each one: 1.28 M opens for ImageNet, repeated by every rank of every stage. The verdicts are kept in
an index file and reused as long as the file they describe is unchanged, so only the first build
(or the files added or changed since) pays for the opens. Listing the folder (one ``stat`` per
file, no open) is still done every time: it is what tells a file unchanged.

A verdict is reused only when the file's relative path, size, ``mtime_ns`` and inode all equal what
was recorded when it was checked; a file added, changed (or replaced) is checked again and a removed
one is simply no longer listed. So the index never has to be thrown away as a whole, and one new
file in a million costs one open, not a million.

Where the index lives (the first that can be written):

1. ``cache_dir`` when the caller gives one: ``cache_dir/folder-index-<hash of root>.npz`` (the
   pipeline's stages give ``out_dir/folder-index``, beside the runs);
2. (library use without ``cache_dir``) the data root itself: ``root/.vqgen-folder-index.npz`` (hidden, so never listed as an image;
   shared by every node that mounts the root, and still valid when the folder is moved);
3. ``$XDG_CACHE_HOME/vqgen/folder-index/folder-index-<hash of root>.npz`` (``~/.cache`` by default).

The file is an ``.npz`` of plain arrays (never a pickle), written atomically: processes that build
it at once each write a whole, valid file and the last rename wins. An index that cannot be read
(damaged, another version, another root) is ignored and rebuilt; one that cannot be written is
skipped, since it only saves time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqgen.errors import StorageError
from vqgen.utils import atomic_write_bytes

INDEX_VERSION = 1
ROOT_INDEX_NAME = ".vqgen-folder-index.npz"
_SEP = "\0"  # cannot occur in a file name, unlike a newline

# (size, mtime_ns, inode): what must be unchanged for a recorded verdict to still hold.
Stamp = tuple[int, int, int]
# None: the file passed the check; a string: why it failed.
Verdict = str | None


@dataclass(frozen=True)
class ListedFile:
    rel: str  # relative to the listed folder, "/"-separated (strings: pathlib is slow per file)
    stamp: Stamp | None  # None when it could not be stat'ed (a broken link): never cached


def scan_image_files(folder: Path, extensions: frozenset[str]) -> list[ListedFile]:
    """Every image file below ``folder`` with its stamp, in the order of
    :func:`vqgen.data.datasets.list_image_files` (a folder's files, sorted, then its subfolders,
    sorted, depth first; hidden entries skipped; linked folders listed but not entered)."""
    found: list[ListedFile] = []
    _scan(str(folder), "", extensions, found)
    return found


def _scan(folder: str, prefix: str, extensions: frozenset[str], found: list[ListedFile]) -> None:
    files, subdirs = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if _is_dir(entry):
                    # os.walk (followlinks=False) does not enter a linked folder either.
                    if not entry.is_symlink():
                        subdirs.append(entry.name)
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    files.append(entry)
    except OSError:  # os.walk skips an unreadable folder too
        return
    # Sorted by name as str, like os.walk's names in list_image_files.
    for entry in sorted(files, key=lambda e: e.name):
        found.append(ListedFile(prefix + entry.name, _stamp(entry)))
    for name in sorted(subdirs):
        _scan(os.path.join(folder, name), f"{prefix}{name}/", extensions, found)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stamp(entry: os.DirEntry) -> Stamp | None:
    try:
        st = entry.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _root_hash(root: Path) -> str:
    return hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def index_locations(root: Path, cache_dir: Path | None = None) -> list[Path]:
    """Where the index of ``root`` is looked for and written, best first (see the module doc)."""
    named = f"folder-index-{_root_hash(root)}.npz"
    if cache_dir is not None:
        return [Path(cache_dir) / named]
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    fallback = Path(xdg) / "vqgen" / "folder-index" / named
    # An unwritable root (a shared read-only dataset) goes straight to the per-user cache.
    return [root / ROOT_INDEX_NAME, fallback] if os.access(root, os.W_OK) else [fallback]


class FolderIndex:
    """Recorded verdicts for the files below ``root`` (by path relative to it); see :meth:`verdict`
    and :meth:`save`."""

    def __init__(self, root: Path, cache_dir: Path | None = None):
        self._locations = index_locations(root, cache_dir)
        self._known: dict[str, tuple[Stamp, Verdict]] = {}
        for location in self._locations:
            if (known := _read_index(location)) is not None:
                self._known = known
                break
        self._fresh: dict[str, tuple[Stamp, Verdict]] = {}  # checked by this process

    def verdict(self, listed: ListedFile, path: Path, check: Callable[[Path], Verdict]) -> Verdict:
        """The recorded verdict of ``listed`` (found at ``path``) when its stamp is unchanged, else
        ``check(path)``, recorded for :meth:`save`."""
        recorded = self._known.get(listed.rel)
        if recorded is not None and recorded[0] == listed.stamp:
            return recorded[1]
        problem = check(path)
        if listed.stamp is not None:
            self._fresh[listed.rel] = (listed.stamp, problem)
        return problem

    def save(self, listing: Iterable[ListedFile]) -> None:
        """Write the index when this process checked any file: the verdicts of the files in
        ``listing`` (those of files no longer there are dropped). Best effort."""
        if not self._fresh:
            return
        merged = {**self._known, **self._fresh}
        entries = {}
        for listed in listing:
            if (recorded := merged.get(listed.rel)) is not None and recorded[0] == listed.stamp:
                entries[listed.rel] = recorded
        data = _encode(entries)
        for location in self._locations:
            try:
                atomic_write_bytes(location, data)
            except (StorageError, OSError):
                continue  # try the next place; with none, the next build just checks again
            self._known, self._fresh = merged, {}
            return


def _encode(entries: dict[str, tuple[Stamp, Verdict]]) -> bytes:
    rels = list(entries)
    stamps = np.array([entries[r][0] for r in rels], dtype=np.int64).reshape(-1, 3)
    reasons = {str(i): entries[r][1] for i, r in enumerate(rels) if entries[r][1] is not None}
    meta = {"version": INDEX_VERSION, "count": len(rels), "reasons": reasons}
    buffer = io.BytesIO()
    np.savez(buffer,  # uncompressed: it is read by every process, and written once
             paths=np.frombuffer(_SEP.join(rels).encode("utf-8", "surrogateescape"), dtype=np.uint8),
             stamps=stamps,
             meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    return buffer.getvalue()


def _read_index(location: Path) -> dict[str, tuple[Stamp, Verdict]] | None:
    """The entries of the index at ``location``; ``None`` when it is missing or unusable."""
    try:
        with np.load(location, allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
            blob = arrays["paths"].tobytes().decode("utf-8", "surrogateescape")
            stamps = arrays["stamps"]
        if meta.get("version") != INDEX_VERSION:
            return None
        rels = blob.split(_SEP) if blob else []
        count = meta["count"]
        if len(rels) != count or stamps.shape != (count, 3):
            return None
        reasons = meta["reasons"]
        return {rel: ((int(s[0]), int(s[1]), int(s[2])), reasons.get(str(i)))
                for i, (rel, s) in enumerate(zip(rels, stamps.tolist()))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged or foreign index is rebuilt, never an error
