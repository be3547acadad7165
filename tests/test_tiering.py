"""Aging, archiving, promotion and rebuild through a real broker.

Records are aged by injecting a clock into the tiering job and the readers;
nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from consumers.worker import Worker
from producers.producer import MemoryProducer, now_ms
from producers.tiering import DAY_S, TieringJob
from projections.l2 import L2Reader
from projections.l3 import L3Reader, verify_l3
from projections.ledger import verify_ledger
from projections.reader import Reader
from projections.registry import digests
from strata.commands.rebuild import rebuild
from strata.commands.tier import parse_time_ms
from strata.config import Settings
from strata.errors import StoreError, UsageError
from strata.keystore import LocalKeystore
from strata.paths import StorePaths
from tests.helpers import env_with, kill_all, start_worker_process

DAY_MS = int(DAY_S * 1000)


def _payloads() -> dict[tuple[str, str], bytes]:
    """Keys by class, with payloads of every kind a byte-for-byte check must survive."""
    return {
        ("chat/0", "chat"): b"read recently, so not idle enough to move",
        ("chat/1", "chat"): os.urandom(3_000),
        ("chat/2", "chat"): "unicode ✓ ünïcödé 😀 \u2013".encode(),
        ("chat/3", "chat"): b"\x00" * 200_000,
        ("chat/4", "chat"): b"",
        ("chat/5", "chat"): b"\xff\xfe not utf-8 \x80",
        ("legal/0", "legal"): b"kept warm for a year",
        ("pii/0", "pii"): b"never archived by default",
    }


async def test_aged_records_archive_read_back_identical_promote_and_rebuild(
    topics: Settings, keystore: LocalKeystore, tmp_path: Path
) -> None:
    """Records past the policy move to L3 and read back byte-identical from it;
    repeated reads promote one back; every move is an event in L2's history
    and the ledger; a rebuild from offset 0 reaches the same tier layout."""
    start = now_ms()
    payloads = _payloads()
    async with MemoryProducer(topics, keystore) as producer:
        for (key, cls), payload in payloads.items():
            await producer.write("acme", key, payload, cls=cls)
    await Worker(topics, until_caught_up=True).run()
    paths = StorePaths(topics.data_dir)

    # chat/0 is read on day 30, so on day 31 it has been idle one day only.
    day30 = Reader.from_paths(paths, keystore, clock=lambda: start + 30 * DAY_MS)
    day30.get("acme", "chat/0")
    day30.close()

    job = TieringJob(topics, clock=lambda: start + 31 * DAY_MS)
    preview = await job.run(dry_run=True)
    assert (preview.demoted, preview.published) == (5, 0)
    first = await job.run()
    repeat = await job.run()  # before the worker applied the first run
    moved = {f"chat/{i}" for i in range(1, 6)}
    assert {m.key for m in first.moves} == moved
    assert all((m.from_tier, m.to_tier) == ("l2", "l3") for m in first.moves)
    assert repeat.published == 5
    await Worker(topics, until_caught_up=True).run()

    clock = [start + 31 * DAY_MS + 1_000]
    reader = Reader.from_paths(paths, keystore, clock=lambda: clock[0])
    for (key, _), payload in payloads.items():
        memory = reader.get("acme", key)
        assert memory.payload == payload, key
        expected = "l3" if key in moved else "l2"
        assert (memory.tier, memory.served_by) == (expected, expected), key
    archive = L3Reader(paths.l3)
    assert archive.stats().records == 5
    assert L2Reader(paths.l2_db).counts() == {"l2": 3, "l3": 5}
    history = reader.history("acme", "chat/3")
    assert [h.action for h in history] == ["written", "tiered", "rejected"]
    assert history[1].reason.startswith("aged: class chat")
    assert "record is in l3" in history[2].reason
    ledger = verify_ledger(paths.ledger)
    assert ledger.ok
    assert ledger.entries == len(payloads) + 10

    # Two more reads of chat/1 make three while archived: it is promoted.
    for _ in range(2):
        clock[0] += 1_000
        reader.get("acme", "chat/1")
    promote = await TieringJob(topics, clock=lambda: clock[0] + 1_000).run()
    assert [(m.key, m.to_tier) for m in promote.moves] == [("chat/1", "l2")]
    await Worker(topics, until_caught_up=True).run()
    back = reader.get("acme", "chat/1")
    assert (back.payload, back.served_by) == (payloads[("chat/1", "chat")], "l2")
    assert archive.get("acme", "chat/1") is None
    settled = await TieringJob(topics, clock=lambda: clock[0] + 2_000).run()
    assert settled.moves == [], "no bounce back, no second promotion"
    reader.close()
    archive.close()
    assert verify_l3(paths.l3).ok

    fresh = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    rebuilt = await rebuild(topics, fresh, show_progress=False)
    assert rebuilt["projections"] == digests(paths)
    layout = L2Reader(StorePaths(fresh.data_dir).l2_db)
    assert layout.counts() == {"l2": 4, "l3": 4}
    assert L3Reader(StorePaths(fresh.data_dir).l3).stats().records == 4
    layout.close()


async def test_tier_commands(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str]
) -> None:
    """`strata tier run --now`, `tier status` and `tier verify` print one JSON
    object each; bad input exits 2 with one line. A reader built the way
    `strata get` builds it finds L3 beside L2, and `strata rebuild
    --projection l3` restores the same archive."""
    start = now_ms()
    async with MemoryProducer(topics, keystore) as producer:
        for i in range(3):
            await producer.write("acme", f"note/{i}", f"note {i}".encode(), cls="ops")
    await Worker(topics, until_caught_up=True).run()
    later = str(start + 40 * DAY_MS)

    done = _strata(cli_env, "tier", "run", "--now", later, "--json")
    assert (done["demoted"], done["published"]) == (3, 3)
    await Worker(topics, until_caught_up=True).run()

    status = _strata(cli_env, "tier", "status", "--json")
    assert status["tiers"] == {"l2": 0, "l3": 3}
    assert status["l3"]["records"] == 3
    reader = Reader(StorePaths(topics.data_dir).l2_db, keystore)
    memory = reader.get("acme", "note/1")
    assert (memory.payload, memory.served_by) == (b"note 1", "l3")
    reader.close()
    assert _strata(cli_env, "tier", "verify", "--json")["ok"] is True

    # L3 dropped and rebuilt alone recovers every archived payload from L2.
    before = digests(StorePaths(topics.data_dir))
    rebuilt = _strata(cli_env, "rebuild", "--projection", "l3", "--json")
    assert rebuilt["projections"] == before
    assert L3Reader(StorePaths(topics.data_dir).l3).stats().records == 3

    bad = subprocess.run(
        [sys.executable, "-m", "strata", "tier", "run", "--now", "next tuesday"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert "--now" in bad.stderr


def test_now_accepts_milliseconds_and_iso_times() -> None:
    """`--now` takes UTC milliseconds or ISO 8601 (UTC when no zone is given)."""
    assert parse_time_ms("1700000000000") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20") == 1_700_000_000_000
    assert parse_time_ms("2023-11-15T00:13:20+02:00") == 1_700_000_000_000
    for bad in ("soon", "-5"):
        with pytest.raises(UsageError, match="--now"):
            parse_time_ms(bad)


def _strata(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "strata", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    obj: dict[str, Any] = json.loads(done.stdout)
    assert done.stdout.count("\n") == 1
    return obj


def _archived_offsets(paths: StorePaths) -> int:
    reader = L3Reader(paths.l3)
    try:
        return sum(reader.checkpoints().values())
    except StoreError:
        return 0
    finally:
        reader.close()


async def test_workers_killed_while_archiving_lose_and_double_nothing(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Worker processes SIGKILLed at random points while moves and rewrites
    of archived keys are projected end with the state of a clean rebuild."""
    rng = random.Random(8)
    keys = [f"agent-{i % 7}/note/{i}" for i in range(1500)]
    async with MemoryProducer(topics, keystore) as producer:
        pending = [
            await producer.publish(producer.seal_write("acme", k, os.urandom(300)))
            for k in keys
        ]
        await asyncio.gather(*pending)
    await Worker(topics, until_caught_up=True).run()
    assert (
        await TieringJob(topics, clock=lambda: now_ms() + 40 * DAY_MS).run()
    ).demoted == 1500
    async with MemoryProducer(topics, keystore) as producer:
        rewritten = rng.sample(keys, 300)
        pending = [
            await producer.publish(producer.seal_write("acme", k, b"rewritten"))
            for k in rewritten
        ]
        await asyncio.gather(*pending)
    paths = StorePaths(topics.data_dir)
    env = env_with(cli_env, STRATA_CONSUMER_SESSION_TIMEOUT_MS="3000")
    start = _archived_offsets(paths)
    for target in sorted(rng.sample(range(start + 100, start + 1700), 3)):
        proc = start_worker_process(env, f"{topics.topic_prefix}.tier-crash")
        try:
            deadline = time.monotonic() + 120
            while _archived_offsets(paths) < target:
                assert proc.poll() is None
                assert time.monotonic() < deadline, f"no progress to {target}"
                await asyncio.sleep(0.005)
            # L2, the ledger and L3 take ~20-150 ms per batch: land anywhere.
            await asyncio.sleep(rng.random() * 0.3)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            kill_all(proc)
    final = start_worker_process(
        env, f"{topics.topic_prefix}.tier-crash", "--until-caught-up"
    )
    try:
        assert final.wait(timeout=120) == 0
    finally:
        kill_all(final)

    assert L3Reader(paths.l3).stats().records == 1200
    assert L2Reader(paths.l2_db).counts() == {"l2": 300, "l3": 1200}
    assert verify_l3(paths.l3).ok
    assert verify_ledger(paths.ledger).entries == 3300
    fresh = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    rebuilt = await rebuild(topics, fresh, show_progress=False)
    assert rebuilt["projections"] == digests(paths)
