"""One run at a time per run folder: ``hold(folder)`` takes an exclusive lock on ``folder/.lock``.

A separate module, not part of ``askd.train``: it needs no torch, so any tool that writes into a run folder
(and the tests' lock holder) can take the same lock cheaply, as ``askd.atomic`` does for file writes.

The lock is ``flock`` on the open file, so it ends with the process however that ends (crash, kill -9):
a stale ``.lock`` file left behind locks nothing. The file is never deleted, because deleting it would let
a second run lock a new file while a first still holds the old one. While held it contains the holder's
pid, which the refused run names. POSIX only: where ``fcntl`` is missing (Windows) runs are not locked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The run folder is in use by another run, or cannot be created or locked."""


@contextmanager
def hold(folder: str | Path) -> Iterator[Path]:
    """Create ``folder`` if missing and hold its lock for the block; yields the lock file's path.

    Does not wait: a folder locked by another process raises RunLockError naming that process's pid.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunLockError(f"cannot use run folder {folder}: {e.strerror}") from None
    try:
        _lock(fd, folder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the pid of a finished run would mislead whoever reads the file
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, folder: Path) -> None:
    """flock ``fd`` exclusively without waiting; RunLockError when another process holds it."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # the holder writes its pid just after locking: a reader in between finds the file still empty
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise RunLockError(
            f"run folder {folder} is in use by another run (pid {pid}); wait for it to end or use another --out"
        ) from None
    except OSError as e:  # e.g. a network filesystem without locks
        raise RunLockError(f"cannot lock {folder / LOCK_NAME}: {e.strerror}") from None
