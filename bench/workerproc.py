"""``strata worker --until-caught-up`` as a child process, watched from outside.

While the child runs, its resident set is sampled with psutil and its
progress is read from L2's checkpoints (a read-only SQLite connection, which
WAL mode lets run beside the writer).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from strata.config import Settings
from strata.paths import StorePaths

MIB = 1024 * 1024


@dataclass
class Sample:
    """One look at the child: when, how far it was, how much memory it held."""

    seconds: float
    applied: int
    rss: int


@dataclass
class ChildRun:
    """What a worker process did, seen from outside."""

    seconds: float
    returncode: int
    peak_rss: int
    samples: list[Sample] = field(default_factory=list)
    stderr_tail: str = ""

    def rss_at(self, applied: int) -> int | None:
        """The resident set of the first sample at or past ``applied`` events."""
        for s in self.samples:
            if s.applied >= applied:
                return s.rss
        return None


def strata_command() -> list[str]:
    """The ``strata`` console script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("strata")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("strata")
    if found is None:
        raise RuntimeError("the strata command is not installed (pip install -e .)")
    return [found]


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that points a worker at one broker, prefix and data dir."""
    env = dict(os.environ)
    env.update(
        STRATA_KAFKA_BOOTSTRAP=str(settings.kafka_bootstrap),
        STRATA_DATA_DIR=str(settings.data_dir),
        STRATA_TOPIC_PREFIX=settings.topic_prefix,
        STRATA_PARTITIONS=str(settings.partitions),
        STRATA_SQLITE_SYNCHRONOUS=settings.sqlite_synchronous,
    )
    return env


def applied_events(settings: Settings) -> int:
    """Events L2 holds: the sum of its checkpoints, 0 before it exists."""
    path = StorePaths(settings.data_dir).l2_db
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            row = conn.execute("SELECT COALESCE(SUM(next_offset), 0) FROM checkpoints")
            return int(row.fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0  # created but not yet given its tables


def run_worker(
    settings: Settings, *, group: str, interval_s: float = 0.25, timeout_s: float = 3600
) -> ChildRun:
    """Run a worker process until it is caught up, sampling it every ``interval_s``.

    Raises:
        RuntimeError: the worker exited with an error or ran past ``timeout_s``.
    """
    import psutil

    command = [*strata_command(), "worker", "--until-caught-up", "--group", group]
    errors = settings.data_dir / "worker.stderr"
    began = time.perf_counter()
    with errors.open("wb") as err:
        child = subprocess.Popen(
            command, env=worker_env(settings), stdout=subprocess.DEVNULL, stderr=err
        )
        proc = psutil.Process(child.pid)
        run = ChildRun(0.0, 0, 0)
        try:
            while child.poll() is None:
                if time.perf_counter() - began > timeout_s:
                    raise RuntimeError(f"worker ran past {timeout_s:g}s")
                try:
                    rss = proc.memory_info().rss
                    run.peak_rss = max(run.peak_rss, _high_water(child.pid) or rss)
                except psutil.NoSuchProcess:
                    break
                run.samples.append(
                    Sample(time.perf_counter() - began, applied_events(settings), rss)
                )
                time.sleep(interval_s)
        finally:
            if child.poll() is None:
                child.kill()
            run.returncode = child.wait()
    run.seconds = time.perf_counter() - began
    run.stderr_tail = errors.read_text(errors="replace")[-2000:]
    if run.returncode != 0:
        raise RuntimeError(
            f"worker exited {run.returncode}: {run.stderr_tail.strip()[-500:]}"
        )
    return run


def _high_water(pid: int) -> int | None:
    """The kernel's peak resident set of a process (VmHWM), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
