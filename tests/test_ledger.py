"""The ledger as the worker writes it from a real topic, and rebuilt from it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from consumers.worker import Worker
from producers.load import publish_synthetic
from producers.producer import MemoryProducer
from projections.ledger import LedgerProjection, ledger_digest, verify_ledger
from projections.ledger_files import partitions_in, read_state, read_tree_heads
from strata.config import Settings
from strata.keystore import LocalKeystore
from strata.paths import StorePaths

EVERY = 25


def use_ledger_interval(worker: Worker, every: int) -> None:
    """Make the worker's ledger sign every ``every`` entries."""
    settings = worker.settings.model_copy(update={"ledger_checkpoint_entries": every})
    worker.followers = [
        LedgerProjection(worker.paths.ledger, settings=settings)
        if f.name == "ledger"
        else f
        for f in worker.followers
    ]


async def publish(settings: Settings, keystore: LocalKeystore) -> int:
    """Writes over several tenants, plus a rejected write and a delete."""
    result = await publish_synthetic(
        settings, events=240, tenants=3, size=64, seed=5, keys=30
    )
    async with MemoryProducer(settings, keystore) as producer:
        await producer.write("acme", "notes/a", b"first")
        await producer.write("acme", "notes/a", b"stale", expected_version=7)
        await producer.delete("acme", "notes/a")
    return int(result["events"]) + 3


async def test_worker_ledger_verifies_and_a_rebuild_has_the_same_roots(
    topics: Settings, keystore: LocalKeystore, tmp_path: Path
) -> None:
    """The live ledger verifies with one entry per event; one rebuilt from the
    topic into a fresh data dir, in other batches and with another signing
    key, has the same entries, the same roots at the same sizes and the same
    digest."""
    events = await publish(topics, keystore)
    live = Worker(topics, until_caught_up=True)
    use_ledger_interval(live, EVERY)
    await live.run()
    live_ledger = StorePaths(topics.data_dir).ledger
    report = verify_ledger(live_ledger)
    assert report.ok, report.findings
    assert report.entries == events

    target = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    rebuilt_keys = StorePaths(target.data_dir).keys
    rebuilt_keys.mkdir(parents=True)
    for name in ("keystore.json", "master.key"):
        shutil.copy2(StorePaths(topics.data_dir).keys / name, rebuilt_keys / name)
    rebuild = Worker(
        target,
        group=f"{topics.topic_prefix}.rebuild",
        keystore=keystore,
        until_caught_up=True,
        max_batch=37,
    )
    use_ledger_interval(rebuild, EVERY)
    await rebuild.run()
    rebuilt_ledger = StorePaths(target.data_dir).ledger

    assert verify_ledger(rebuilt_ledger).ok
    assert ledger_digest(rebuilt_ledger) == ledger_digest(live_ledger)
    for partition in range(topics.partitions):
        name = f"p{partition:05d}.log"
        assert (rebuilt_ledger / name).read_bytes() == (live_ledger / name).read_bytes()
        on_count = {
            h.size: h.root
            for h in read_tree_heads(live_ledger, partition)
            if h.size % EVERY == 0
        }
        again = {
            h.size: h.root
            for h in read_tree_heads(rebuilt_ledger, partition)
            if h.size % EVERY == 0
        }
        assert on_count
        assert on_count == again
        live_key = read_tree_heads(live_ledger, partition)[0].key_id
        assert read_tree_heads(rebuilt_ledger, partition)[0].key_id != live_key


async def test_cli_verify_prints_one_object_and_exits_1_on_a_finding(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str]
) -> None:
    """`strata ledger verify --json` prints ok, entries and located findings;
    a changed byte makes it exit 1 naming the partition and entry."""
    events = await publish(topics, keystore)
    await Worker(topics, until_caught_up=True).run()
    command = [sys.executable, "-m", "strata", "ledger", "verify", "--json"]
    clean = subprocess.run(
        command, env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert clean.returncode == 0, clean.stderr
    obj = json.loads(clean.stdout)
    assert obj["ok"] is True
    assert obj["entries"] == events
    assert obj["findings"] == []

    log = StorePaths(topics.data_dir).ledger / "p00001.log"
    lines = log.read_bytes().splitlines()
    lines[3] = lines[3].replace(b'"action":"', b'"action":"X', 1)
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    broken = subprocess.run(
        command, env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert broken.returncode == 1
    findings = json.loads(broken.stdout)["findings"]
    located = [
        (f["partition"], f["entry"], f["kind"])
        for f in findings
        if f["entry"] is not None
    ]
    assert located == [(1, 3, "changed")]


def _signed_and_total(ledger: Path) -> tuple[int, int]:
    states = [read_state(ledger, p) for p in partitions_in(ledger)]
    return sum(s.signed_entries for s in states), sum(s.entries for s in states)


async def test_a_worker_signs_the_last_entries_of_idle_partitions(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Entries no later event follows are signed while the worker runs, once
    they have waited the signing interval."""
    settings = topics.model_copy(
        update={
            "ledger_checkpoint_interval_ms": 300,
            "ledger_checkpoint_entries": 10_000,
        }
    )
    async with MemoryProducer(settings, keystore) as producer:
        for i in range(12):
            await producer.write("acme", f"idle/{i}", b"quiet")
    worker = Worker(settings, keystore=keystore)
    running = asyncio.ensure_future(worker.run())
    ledger = StorePaths(settings.data_dir).ledger
    deadline = time.monotonic() + 60
    try:
        while _signed_and_total(ledger) != (12, 12):
            assert not running.done(), running.result()
            assert time.monotonic() < deadline, _signed_and_total(ledger)
            await asyncio.sleep(0.05)
    finally:
        worker.request_stop()
        await running
    assert verify_ledger(ledger).ok


async def test_a_worker_that_stops_signs_what_it_appended(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """A worker run until caught up leaves a signed head over every entry,
    though neither trigger was due."""
    events = await publish(topics, keystore)
    settings = topics.model_copy(
        update={
            "ledger_checkpoint_interval_ms": 3_600_000,
            "ledger_checkpoint_entries": 10_000,
        }
    )
    await Worker(settings, keystore=keystore, until_caught_up=True).run()
    ledger = StorePaths(settings.data_dir).ledger
    assert _signed_and_total(ledger) == (events, events)
    assert verify_ledger(ledger).ok
