"""One vqgen invocation at a time per run folder.

The main process of a launch holds an advisory ``flock`` on ``RUN/.vqgen.lock`` for the whole
command. The kernel releases it when the process ends, however it ends, so a killed run never
leaves the folder locked; the other processes of the same ``accelerate launch``/``torchrun`` are
part of the same run and learn the outcome from the main process. (``flock`` on network
filesystems depends on their lock support: NFSv4 and Lustre with ``flock`` mounts honour it.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from vqgen.errors import VQGenError

LOCK_NAME = ".vqgen.lock"
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class RunDirBusy(VQGenError):
    """Another vqgen command is working in the same run folder."""


class RunLock:
    """``acquire()`` → True when the run folder is locked for this command, False when the folder
    cannot be written at all (read-only storage): then nothing may be written, and the runner only
    checks whether every stage is up to date."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> bool:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in _NOT_WRITABLE:
                return False
            raise VQGenError(f"cannot create the run folder lock {self.path}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"run folder {self.run_dir} is in use by another vqgen command ({holder}); wait for it "
                "to finish or stop it, or give this run another run.name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_info()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['started_at']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
