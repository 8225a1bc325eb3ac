"""An exclusive flock on a lock file: mutual exclusion between the processes (and the threads, each opening the
file anew) of one machine, for the local stack's state directory and for claims on a local path."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` while inside, waiting for as long as another holder keeps it. The file
    (and its folder) is created if missing and left in place: deleting it would let a waiter lock a file
    that a newcomer no longer sees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
