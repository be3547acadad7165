"""Publish, project and read back through a real broker: the walking skeleton."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.ledger import verify_ledger
from projections.reader import Reader
from projections.registry import digests
from strata.config import Settings
from strata.keystore import LocalKeystore
from strata.paths import StorePaths


async def _publish(
    settings: Settings, keystore: LocalKeystore, count: int, *, seed: int = 3
) -> dict[tuple[str, str], list[str]]:
    """Publish ``count`` writes over 3 tenants and 50 keys; return payloads per key."""
    rng = random.Random(seed)
    written: dict[tuple[str, str], list[str]] = {}
    async with MemoryProducer(settings, keystore) as producer:
        pending = []
        for i in range(count):
            tenant = f"tenant-{i % 3}"
            key = f"agent-{rng.randrange(5)}/note/{rng.randrange(10)}"
            payload = f"payload {i} {rng.random()} for {tenant}/{key}"
            written.setdefault((tenant, key), []).append(payload)
            event = producer.seal_write(tenant, key, payload, cls="chat", agent="test")
            pending.append(await producer.publish(event))
        await asyncio.gather(*pending)
    return written


async def test_thousand_writes_project_latest_version_history_and_ledger(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """L2 holds each key's latest value and full history; one ledger entry per event."""
    written = await _publish(topics, keystore, 1000)

    report = await Worker(topics, until_caught_up=True).run()

    assert report.events_applied == 1000
    assert report.dead_letters == 0
    paths = StorePaths(topics.data_dir)
    reader = Reader(paths.l2_db, keystore)
    for (tenant, key), payloads in written.items():
        memory = reader.get(tenant, key)
        assert memory.payload.decode() == payloads[-1]
        assert memory.version == len(payloads)
        history = reader.history(tenant, key)
        assert [h.version for h in history] == list(range(1, len(payloads) + 1))
        assert {h.action for h in history} == {"written"}
        for version, payload in enumerate(payloads, start=1):
            stored = reader.l2.version_payload(tenant, key, version)
            assert stored is not None
            assert reader.decrypt(stored).payload.decode() == payload
    reader.close()

    verified = verify_ledger(paths.ledger)
    assert verified.ok, verified.findings
    assert verified.entries == 1000


async def test_second_run_applies_nothing_twice(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """A worker rerun over the same events changes no state."""
    await _publish(topics, keystore, 300)
    await Worker(topics, until_caught_up=True).run()
    paths = StorePaths(topics.data_dir)
    before = digests(paths)

    again = await Worker(topics, group="another-group", until_caught_up=True).run()

    assert again.events_applied == 0
    assert digests(paths) == before
    with sqlite3.connect(paths.l2_db) as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM history").fetchone()
        dupes = db.execute(
            "SELECT tenant, key, version, COUNT(*) FROM history "
            "GROUP BY tenant, key, version HAVING COUNT(*) > 1"
        ).fetchall()
    assert rows == 300
    assert dupes == []
    assert verify_ledger(paths.ledger).entries == 300


async def test_read_your_writes_with_token(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """A read that waits for a write's token sees the new value."""
    worker = Worker(topics)
    task = asyncio.create_task(worker.run())
    try:
        reader = Reader(StorePaths(topics.data_dir).l2_db, keystore)
        async with MemoryProducer(topics, keystore) as producer:
            for i in range(5):
                token = await producer.write("acme", "agent-1/mood", f"mood {i}")
                await reader.wait_for(token, timeout_s=30)
                memory = reader.get("acme", "agent-1/mood")
                assert memory.payload == f"mood {i}".encode()
                assert memory.version == i + 1
                assert (memory.partition, memory.offset) == (
                    token.partition,
                    token.offset,
                )
        reader.close()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)


async def test_no_plaintext_in_topic_or_l2(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Raw topic bytes and the L2 database file hold none of the payloads."""
    written = await _publish(topics, keystore, 200, seed=11)
    await Worker(topics, until_caught_up=True).run()
    plaintexts = [p.encode() for payloads in written.values() for p in payloads]

    consumer = AIOKafkaConsumer(
        topics.memory_topic,
        bootstrap_servers=topics.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    raw = bytearray()
    try:
        seen = 0
        while seen < 200:
            batch = await consumer.getmany(timeout_ms=2000)
            for messages in batch.values():
                for msg in messages:
                    raw += msg.value + (msg.key or b"")
                    seen += 1
    finally:
        await consumer.stop()

    data_dir_bytes = b"".join(
        p.read_bytes() for p in Path(topics.data_dir).rglob("*") if p.is_file()
    )
    assert len(raw) > 200 * 40
    for plaintext in plaintexts:
        assert plaintext not in raw
        assert plaintext not in data_dir_bytes


def test_demo_json_end_to_end(cli_env: dict[str, str]) -> None:
    """`strata demo --json` publishes the corpus, projects it all, verifies the ledger."""
    result = subprocess.run(
        [sys.executable, "-m", "strata", "demo", "--json", "--sample", "100"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["events_published"] > 1000
    assert summary["events_projected"] == summary["events_published"]
    assert summary["ledger_verified"] is True
    assert summary["ledger_entries"] == summary["events_published"]
    assert summary["sample_mismatches"] == []
    assert summary["dlq"] == 0
    assert summary["tenants"] > 10
    assert summary["tiers"]["l2"] > 0
    assert summary["broker_started"] is False


def test_tenant_counts_match_corpus_languages() -> None:
    """The demo maps one tenant per corpus language and one agent per topic file."""
    from strata.demo import corpus_dir, corpus_turns

    turns = list(corpus_turns())
    languages = {
        p.name for p in corpus_dir().iterdir() if p.is_dir() and any(p.glob("*.yml"))
    }
    assert {t.tenant for t in turns} == {f"lang-{lang}" for lang in languages}
    per_key = Counter((t.tenant, t.key) for t in turns)
    assert max(per_key.values()) == 1


async def test_ledger_verify_finds_a_deleted_partition(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str]
) -> None:
    """Deleting a whole partition's ledger files is a finding, not a smaller ledger."""
    await _publish(topics, keystore, 120)
    await Worker(topics, until_caught_up=True).run()
    ledger = StorePaths(topics.data_dir).ledger
    victim = sorted(ledger.glob("p*.log"))[0]
    partition = int(victim.stem[1:])
    for path in ledger.glob(f"{victim.stem}.*"):
        path.unlink()

    result = subprocess.run(
        [sys.executable, "-m", "strata", "ledger", "verify", "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["partition"], f["kind"]) for f in findings] == [(partition, "deleted")]
