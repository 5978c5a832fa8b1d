"""An exclusive lock on a run directory, so that two processes never write one run at the same time.

``train`` and ``sample-fid`` resume what a directory already holds; two of them on one directory would
interleave their logs and delete each other's temporary files. The lock is an advisory ``flock`` on
``DIR/.lock``: the operating system releases it when its process ends, however it ends (a ``kill -9``
included), so a killed run never leaves a stale lock behind. The file records who holds the lock, for
the error message of the next process. Where ``fcntl`` does not exist (Windows) there is no lock.

``flock`` works between processes of one machine; on a network file system (NFS) whether it also
works between machines depends on the server, so give each machine its own run directory.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsedit.errors import SparseditError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


@contextmanager
def run_lock(directory: Path, what: str = "run directory") -> Iterator[None]:
    """Hold the lock on ``directory`` (created if absent) for the body; a one-line error if another process has it."""
    if fcntl is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
            raise SparseditError(f"{directory} is in use by {holder}; wait for it to finish or stop it, or choose "
                                 f"another {what}") from None
        holder = (f"sparsedit process {os.getpid()} on {socket.gethostname()}, running since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
