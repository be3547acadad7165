"""Child processes a job starts to share its work: settings passed down, and
never outliving the job.

A job such as a backfill publishes from its own process while a ``strata
worker`` child projects beside it, so the two use separate cores instead of
one interpreter. The child gets the job's settings through the environment
and, on Linux, is sent SIGTERM by the kernel if the job dies first, even
from SIGKILL, so a killed job leaves nothing running behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from strata.config import Settings

log = structlog.get_logger(__name__)

#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: How long a child has to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0


def _resolve_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()


def settings_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with every ``STRATA_`` variable replaced by
    ``settings``, so a child process reads exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, dict):
            value = json.dumps(value)
        env[f"STRATA_{name.upper()}"] = str(value)
    return env


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: one system call, no locks.
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def start_worker(
    settings: Settings, *, group: str, log_path: Path
) -> asyncio.subprocess.Process:
    """Start ``strata worker`` in ``group`` with ``settings``, its output to
    ``log_path``.

    Raises:
        OSError: the process cannot be started or the log file opened.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "strata",
            "worker",
            "--group",
            group,
            env=settings_environment(settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )


async def stop_child(child: asyncio.subprocess.Process) -> int:
    """Ask a child to stop (SIGTERM), kill it if it has not within
    :data:`STOP_TIMEOUT_S`, and return its exit status."""
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(child.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("child.killed", pid=child.pid, waited_s=STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
    assert child.returncode is not None
    return child.returncode
