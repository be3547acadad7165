"""Cross-process locks on files: one that waits without blocking the event
loop, and one that refuses at once when a job is already running."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from strata.errors import StoreError, UsageError

#: How long to sleep between attempts; writers hold these locks for one batch.
_POLL_S = 0.005


@contextlib.asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600 if missing).

    ``flock`` has no async form, and a blocking call would stall the worker's
    heartbeats, so the lock is tried without blocking and retried. The lock
    goes with the file descriptor, so a killed holder releases it at once.

    Raises:
        OSError: the lock file cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` locked while one ``what`` runs; refuse a second at once.

    The lock goes with the process: one that is killed releases it, so a
    rerun never finds a stale lock to clean up.

    Raises:
        UsageError: another process holds the lock.
        StoreError: the lock file cannot be created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another {what} is running on this data dir ({path} is locked)"
            ) from None
        yield
    finally:
        os.close(fd)
