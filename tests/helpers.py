"""Helpers shared by tests that drive workers and inspect stores."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from projections.l3 import L3Reader
from projections.ledger import LedgerProjection
from strata.config import Settings
from strata.kafka import end_offsets
from strata.paths import StorePaths


async def committed_offsets(settings: Settings, group: str) -> dict[int, int | None]:
    """The Kafka offsets ``group`` committed on each memory partition (None: none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        return {
            p: await consumer.committed(TopicPartition(settings.memory_topic, p))
            for p in range(settings.partitions)
        }
    finally:
        await consumer.stop()


def start_worker_process(
    env: dict[str, str], group: str, *extra: str
) -> subprocess.Popen[bytes]:
    """Run `strata worker` in its own process, as an operator would."""
    return subprocess.Popen(
        [sys.executable, "-m", "strata", "worker", "--group", group, *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def applied_offsets(paths: StorePaths) -> int:
    """Sum over partitions of the lowest checkpoint of L2, the ledger and L3."""
    if not paths.l2_db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{paths.l2_db}?mode=ro", uri=True, timeout=5) as db:
            l2 = dict(db.execute("SELECT partition, next_offset FROM checkpoints"))
    except sqlite3.OperationalError:
        return 0
    ledger = LedgerProjection(paths.ledger).checkpoints()
    l3 = L3Reader(paths.l3)
    try:
        archive = l3.checkpoints()
    except sqlite3.OperationalError:
        return 0  # the index exists but its worker has not created the tables yet
    finally:
        l3.close()
    return sum(min(off, ledger.get(p, 0), archive.get(p, 0)) for p, off in l2.items())


async def wait_caught_up(settings: Settings, *, timeout_s: float = 120.0) -> None:
    """Wait until L2 and the ledger reach the end of every partition."""
    ends = await end_offsets(settings, [settings.memory_topic])
    target = sum(ends.values())
    paths = StorePaths(settings.data_dir)
    deadline = time.monotonic() + timeout_s
    while applied_offsets(paths) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"projected {applied_offsets(paths)} of {target} offsets"
            )
        await asyncio.sleep(0.1)


def history_duplicates(db_path: Path) -> list[tuple[object, ...]]:
    """(tenant, key, version) that more than one applied event claims."""
    with sqlite3.connect(db_path) as db:
        return db.execute(
            "SELECT tenant, key, version, COUNT(*) FROM history "
            "WHERE action IN ('written', 'deleted') "
            "GROUP BY tenant, key, version HAVING COUNT(*) > 1"
        ).fetchall()


def kill_all(*procs: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever still runs, and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def env_with(env: dict[str, str], **extra: str) -> dict[str, str]:
    """A copy of ``env`` with more variables."""
    out = dict(env)
    out.update(extra)
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out
