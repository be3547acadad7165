"""A cross-process lock on a file that waits without blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

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
