"""Shadow migration of L2 on a live topic: build, compare, cut over, roll back.

A live worker projects while a writer publishes and a reader reads each
acknowledged write back, the whole time. The reader resolves the live L2
through the pointer on every read, and the worker follows the pointer before
every batch. No read may fail, return less than was
acknowledged, or go back to an older value than one already seen.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumers.migrate import switch_l2
from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.reader import Memory, Reader, WriteToken
from strata.config import Settings
from strata.errors import CheckFailedError
from strata.keystore import LocalKeystore
from strata.paths import StorePaths, read_l2_pointer

STRATA = str(Path(sys.executable).with_name("strata"))
TENANT = "acme"
KEYS = [f"agent-{i % 4}/fact-{i:02d}" for i in range(40)]


@dataclass
class Traffic:
    """What the writer acknowledged and what the reader saw."""

    acked: dict[str, tuple[int, WriteToken]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    reads: dict[int, int] = field(default_factory=dict)  # by L2 version
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    phase: str = "start"


async def read_after(
    paths: StorePaths, keystore: LocalKeystore, token: WriteToken, key: str
) -> tuple[Memory, int]:
    """Read a key once the live L2, resolved afresh each time, holds the token."""
    for _ in range(1000):
        version = paths.l2_live_version
        reader = Reader(paths.l2_version_db(version), keystore, track_reads=False)
        try:
            if reader.l2.checkpoint(token.partition) > token.offset:
                return reader.get(TENANT, key), version
        finally:
            reader.close()
        await asyncio.sleep(0.01)
    ckpts = {}
    for v in (1, 2):
        r = Reader(paths.l2_version_db(v), keystore, track_reads=False)
        ckpts[v] = r.l2.checkpoints()
        r.close()
    raise TimeoutError(
        f"{token} never projected; live v{paths.l2_live_version}; {ckpts}"
    )


async def write_loop(producer: MemoryProducer, traffic: Traffic) -> None:
    seq = 0
    while not traffic.stop.is_set():
        seq += 1
        key = KEYS[seq % len(KEYS)]
        token = await producer.write(TENANT, key, f"{key}#{seq}")
        traffic.acked[key] = (seq, token)
        await asyncio.sleep(0.005)


async def read_loop(
    paths: StorePaths, keystore: LocalKeystore, traffic: Traffic
) -> None:
    turn = 0
    while not traffic.stop.is_set():
        turn += 1
        key = KEYS[turn % len(KEYS)]
        if key not in traffic.acked:
            await asyncio.sleep(0.01)
            continue
        seq, token = traffic.acked[key]
        try:
            memory, version = await read_after(paths, keystore, token, key)
        except Exception as exc:
            traffic.failures.append(
                f"{key}: {type(exc).__name__}: {exc} {traffic.reads} {traffic.phase}"
            )
            continue
        got = int(memory.payload.split(b"#")[1])
        if got < seq or got < traffic.seen.get(key, 0):
            traffic.failures.append(f"{key}: read #{got} after #{seq} was acked")
        traffic.seen[key] = max(got, traffic.seen.get(key, 0))
        traffic.reads[version] = traffic.reads.get(version, 0) + 1
        await asyncio.sleep(0.005)  # a read that needs no wait must still yield


async def migrate(env: dict[str, str], *flags: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        STRATA,
        "migrate",
        "--projection",
        "l2",
        "--version",
        "2",
        "--json",
        *flags,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out)
    return result


async def reads_on(traffic: Traffic, version: int, more: int) -> None:
    """Wait until the reader has done ``more`` further reads on ``version``."""
    target = traffic.reads.get(version, 0) + more
    for _ in range(3000):
        if traffic.reads.get(version, 0) >= target or traffic.failures:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"only {traffic.reads} reads")


async def test_shadow_migration_cutover_and_rollback_under_live_writes(
    topics: Settings, cli_env: dict[str, str], keystore: LocalKeystore
) -> None:
    """Build and compare v2 while writes arrive, cut over only once caught up,
    roll back to v1; every read succeeds and none goes backwards."""
    paths = StorePaths(topics.data_dir)
    traffic = Traffic()
    worker = Worker(topics, group=f"{topics.topic_prefix}.live", keystore=keystore)
    async with MemoryProducer(topics, keystore) as producer:
        for i in range(200):
            await producer.write(
                TENANT, KEYS[i % len(KEYS)], f"{KEYS[i % len(KEYS)]}#0"
            )
        tasks = [
            asyncio.create_task(worker.run()),
            asyncio.create_task(write_loop(producer, traffic)),
            asyncio.create_task(read_loop(paths, keystore, traffic)),
        ]
        try:
            await reads_on(traffic, 1, 30)

            built = await migrate(cli_env)
            assert built["ok"] is True
            assert built["build"]["complete"] is True
            assert built["build"]["records"] >= 200
            assert (built["diff"]["only_live"], built["diff"]["only_shadow"]) == (0, 0)
            assert built["diff"]["differing"] == 0
            assert built["diff"]["compared"] == len(KEYS)
            assert built["live_version"] == 1
            await reads_on(traffic, 1, 20)

            traffic.phase = "cutover"
            cut = await migrate(cli_env, "--cutover")
            traffic.phase = "after cutover"
            switch = cut["switch"]
            assert (switch["from_version"], switch["to_version"]) == (1, 2)
            for partition, offset in switch["outgoing_checkpoints"].items():
                assert switch["incoming_checkpoints"][partition] >= offset
            assert paths.l2_live_version == 2
            await reads_on(traffic, 2, 30)
            assert worker.l2 is not None
            assert worker.l2.path == paths.l2_version_db(2)

            traffic.phase = "rollback"
            back = await migrate(cli_env, "--rollback")
            traffic.phase = "after rollback"
            assert back["live_version"] == 1
            assert back["build"] is None
            assert (back["switch"]["from_version"], back["switch"]["to_version"]) == (
                2,
                1,
            )
            pointer = read_l2_pointer(paths.l2_pointer)
            assert pointer is not None
            assert (pointer.version, pointer.previous) == (1, 2)
            await reads_on(traffic, 1, 30)
            assert worker.l2.path == paths.l2_version_db(1)
            # After the rollback v1 holds every acknowledged write, latest last.
            traffic.stop.set()
            await asyncio.gather(*tasks[1:])
            for key, (seq, token) in traffic.acked.items():
                memory, version = await read_after(paths, keystore, token, key)
                assert version == 1
                assert memory.payload == f"{key}#{seq}".encode()
        finally:
            traffic.stop.set()
            worker.request_stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert traffic.failures == []
    assert traffic.reads[1] >= 80
    assert traffic.reads[2] >= 30


async def test_cutover_is_refused_while_the_shadow_is_behind(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Without catching up, a version behind the live checkpoints is not
    switched to, and the pointer stays as it was."""
    async with MemoryProducer(topics, keystore) as producer:
        for i in range(30):
            await producer.write(TENANT, KEYS[i], "x")
    await Worker(topics, keystore=keystore, until_caught_up=True).run()
    paths = StorePaths(topics.data_dir)

    with pytest.raises(CheckFailedError, match="l2 v3 is behind the live version"):
        await switch_l2(topics, 3, catch_up=False)
    assert read_l2_pointer(paths.l2_pointer) is None
    assert paths.l2_live_version == 1

    report = await switch_l2(topics, 3)
    assert paths.l2_live_version == 3
    assert report.incoming_checkpoints == report.outgoing_checkpoints
    reader = Reader(paths.l2_db, keystore)
    try:
        assert len(reader.list(TENANT)) == 30
    finally:
        reader.close()
