"""Poison events go to the dead-letter topic with their reason; the partition moves on."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumers.dlq import read_dead_letters
from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.reader import Reader
from projections.registry import digests
from schemas.codec import MARKER, Codec
from schemas.events import MemoryDeleted
from strata.commands.rebuild import rebuild
from strata.config import Settings
from strata.errors import NotFoundError
from strata.keystore import LocalKeystore
from strata.paths import StorePaths
from tests.helpers import wait_caught_up


async def test_each_poison_kind_is_dead_lettered_and_good_events_apply(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Bad bytes, unknown schema, wrong types, unknown key version, oversize, tombstone."""
    worker_settings = topics.model_copy(update={"max_payload_bytes": 2000})
    cli_env = {**cli_env, "STRATA_MAX_PAYLOAD_BYTES": "2000"}
    codec = Codec()
    # A producer whose keystore is ahead of the worker's (it has key v7 of
    # acme, the worker's copy stops at v1): its write cannot be applied yet.
    keystore.primary("acme")
    keys_dir = StorePaths(topics.data_dir).keys
    ahead_dir = tmp_path / "ahead-keys"
    shutil.copytree(keys_dir, ahead_dir)
    ahead = LocalKeystore(ahead_dir, topics.master_key_path)
    for _ in range(6):
        ahead.rotate("acme")
    async with MemoryProducer(topics, ahead) as early:
        unknown_version = early.seal_write("acme", "k/unknown-version", "needs key v7")
    assert unknown_version.key_version == 7
    async with MemoryProducer(topics, keystore) as good:
        seal = good.seal_write
        oversized = seal("acme", "k/oversized", "x" * 5000)
        deleted = codec.encode(MemoryDeleted("d-1", "acme", "k/x", "a", 1))
        written_fp = codec.registry.latest("MemoryWritten").fingerprint
        poison: list[tuple[bytes, bytes | None, str, str]] = [
            (b"acme/raw", b"not avro at all", "MalformedEventError", "marker"),
            (
                b"acme/fp",
                MARKER + b"\x01" * 8 + b"\x02\x04",
                "UnknownSchemaError",
                "0101010101010101",
            ),
            (
                b"acme/type",
                MARKER + written_fp + deleted[10:],
                "MalformedEventError",
                "body ends early",
            ),
            (
                unknown_version.message_key,
                codec.encode(unknown_version),
                "ApplyError",
                "key_version",
            ),
            (
                oversized.message_key,
                codec.encode(oversized),
                "ApplyError",
                "ciphertext is 5016 bytes",
            ),
            (b"acme/tombstone", None, "CodecError", "tombstone"),
        ]
        raw = AIOKafkaProducer(
            bootstrap_servers=topics.kafka_bootstrap, enable_idempotence=True
        )
        await raw.start()
        try:
            expected_good = []
            for i, (key, value, _, _) in enumerate(poison):
                token = await good.write("acme", f"good/{i}", f"good value {i}")
                expected_good.append((f"good/{i}", f"good value {i}", token))
                await raw.send_and_wait(topics.memory_topic, value=value, key=key)
            await good.write("acme", "good/last", "after the poison")
        finally:
            await raw.stop()

    worker = Worker(worker_settings)
    task = asyncio.create_task(worker.run())
    try:
        await wait_caught_up(topics, timeout_s=60)
        reader = Reader(StorePaths(topics.data_dir).l2_db, keystore)
        for key, text, _ in expected_good:
            assert reader.get("acme", key).payload.decode() == text
        assert reader.get("acme", "good/last").payload == b"after the poison"
        assert worker.report.dead_letters == len(poison)

        letters = await read_dead_letters(topics)
        assert len(letters) == len(poison)
        by_key = {d.source_key: d for d in letters}
        for key, value, error_class, reason in poison:
            letter = by_key[key]
            assert letter.error_class == error_class, letter
            assert reason in letter.error_message, letter
            assert letter.source_topic == topics.memory_topic
            assert letter.value == value
            assert letter.source_offset >= 0

        listed = subprocess.run(
            [sys.executable, "-m", "strata", "dlq", "list", "--json"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(listed.stdout)["count"] == len(poison)

        # Fix one cause: the worker's keystore catches up; replay sends it back.
        shutil.copy(ahead_dir / "keystore.json", keys_dir / "keystore.json")
        replay = subprocess.run(
            [sys.executable, "-m", "strata", "dlq", "replay", "--json"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result = json.loads(replay.stdout)
        assert result["replayed"] == 1
        assert result["still_failing"] == len(poison) - 1
        # What still fails fails for the reason the list gave (a tombstone's
        # letter holds an empty value, which must not read as a short event).
        listed_reasons = {
            (
                m["dlq_offset"],
                m["source"]["offset"],
                m["error_class"],
                m["error_message"],
            )
            for m in json.loads(listed.stdout)["messages"]
            if m["source"]["key"] != unknown_version.message_key.decode()
        }
        assert {
            (
                e["dlq_offset"],
                e["source"]["offset"],
                e["error_class"],
                e["error_message"],
            )
            for e in result["errors"]
        } == listed_reasons
        await wait_caught_up(topics, timeout_s=60)
        assert reader.get("acme", "k/unknown-version").payload == b"needs key v7"
        assert not task.done(), "the worker must still be running"
        remaining = await read_dead_letters(topics)
        assert {d.source_key for d in remaining} == {k for k, *_ in poison} - {
            unknown_version.message_key
        }
        reader.close()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)

    # A rebuild now has the key the live worker lacked and a larger payload
    # limit, yet it decides every dead-lettered position as the live worker
    # did: the replayed event applies once, from its copy, the rest are skipped.
    fresh = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    rebuilt = await rebuild(topics, fresh, show_progress=False)
    assert rebuilt["poison_skipped"] == len(poison)
    assert rebuilt["projections"] == digests(StorePaths(topics.data_dir))
    again = Reader(StorePaths(fresh.data_dir).l2_db, keystore)
    assert again.get("acme", "k/unknown-version").payload == b"needs key v7"
    with pytest.raises(NotFoundError):
        again.get("acme", "k/oversized")
    again.close()


async def test_copies_outside_their_keys_partition_are_dead_lettered(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """A keyless copy or a copy in another partition could race the original: refused."""
    from strata.kafka import key_partition

    codec = Codec()
    async with MemoryProducer(topics, keystore) as producer:
        event = producer.seal_write("acme", "notes/1", "the original")
        value = codec.encode(event)
        token = await (await producer.publish(event))
    home = key_partition(event.message_key, topics.partitions)
    assert token.partition == home
    raw = AIOKafkaProducer(
        bootstrap_servers=topics.kafka_bootstrap, enable_idempotence=True
    )
    await raw.start()
    try:
        await raw.send_and_wait(
            topics.memory_topic, value=value, key=None, partition=home
        )
        other = (home + 1) % topics.partitions
        await raw.send_and_wait(
            topics.memory_topic, value=value, key=event.message_key, partition=other
        )
    finally:
        await raw.stop()

    report = await Worker(topics, until_caught_up=True).run()

    assert report.dead_letters == 2
    reasons = sorted(d.error_message for d in await read_dead_letters(topics))
    assert reasons[0] == "message has no key; the event's tenant/key is 'acme/notes/1'"
    assert (
        reasons[1] == f"partition {other}: the key's events belong to partition {home}"
    )
    reader = Reader(StorePaths(topics.data_dir).l2_db, keystore)
    assert [h.action for h in reader.history("acme", "notes/1")] == ["written"]
    reader.close()


async def test_a_data_dir_refuses_another_topic(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Checkpoints belong to one topic: a changed prefix is refused, not silently skipped."""
    from strata.errors import ConfigError
    from strata.kafka import ensure_topics

    async with MemoryProducer(topics, keystore) as producer:
        await producer.write("acme", "k", "v")
    await Worker(topics, until_caught_up=True).run()
    other = topics.model_copy(update={"topic_prefix": topics.topic_prefix + "-other"})
    await ensure_topics(other)

    with pytest.raises(ConfigError, match="projects topic"):
        await Worker(other, until_caught_up=True).run()


async def test_the_dead_letter_topic_keeps_its_tombstones(topics: Settings) -> None:
    """A replayed letter's tombstone is how workers know its position was
    dead-lettered: compaction keeps it for centuries, and the retention is
    small enough that the cleaner's "now + retention" stamp cannot overflow
    (an overflowed stamp lies in the past, and the tombstone goes at once)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=topics.kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.dlq_topic)]
        )
    finally:
        await admin.close()
    [resource] = response.resources
    config = {entry[0]: entry[1] for entry in resource[4]}
    assert config["cleanup.policy"] == "compact"
    retention_ms = int(config["delete.retention.ms"])
    century_ms = 100 * 365 * 24 * 3600 * 1000
    assert retention_ms >= century_ms
    assert time.time() * 1000 + retention_ms < 2**63 - 1


async def test_a_letter_no_worker_wrote_is_listed_with_its_problem_named(
    topics: Settings,
) -> None:
    """Headers that are not numbers, or none at all: the letter is listed and
    says what is wrong with it, and the other letters are still read."""
    from consumers.dlq import H_ERROR_CLASS, H_ERROR_MESSAGE, H_OFFSET, H_PARTITION

    raw = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap)
    await raw.start()
    try:
        await raw.send_and_wait(
            topics.dlq_topic,
            key=b"hand-made/1",
            value=b"x",
            headers=[
                (H_PARTITION, b"abc\xff"),
                (H_OFFSET, b"7"),
                (H_ERROR_CLASS, b"X"),
                (H_ERROR_MESSAGE, b"bad bytes"),
            ],
        )
        await raw.send_and_wait(topics.dlq_topic, key=b"hand-made/2", value=b"y")
    finally:
        await raw.stop()
    first, second = await read_dead_letters(topics)
    assert (first.source_partition, first.source_offset) == (-1, 7)
    assert first.error_message == (
        "bad bytes (header strata.source.partition is 'abc\ufffd', not a number)"
    )
    assert second.error_message == (
        "no strata.error headers: not dead-lettered by a worker"
    )


async def test_each_store_honours_only_its_own_dead_letters(
    topics: Settings, keystore: LocalKeystore, tmp_path: Path
) -> None:
    """A second store on the same topic whose keystore is behind dead-letters
    what it cannot open; the store that can still applies it, live and on a
    rebuild. Each store's letters are its own: two decisions on one position
    are two letters, and a replay leaves another store's letters alone."""
    from consumers.dlq import replay_dead_letters

    keystore.primary("acme")
    stale_settings = topics.model_copy(update={"data_dir": tmp_path / "stale"})
    shutil.copytree(
        StorePaths(topics.data_dir).keys, StorePaths(stale_settings.data_dir).keys
    )
    keystore.rotate("acme")  # only the first store's keystore has v2
    async with MemoryProducer(topics, keystore) as producer:
        await producer.write("acme", "doc", "sealed under v2")
    raw = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap)
    await raw.start()
    try:
        await raw.send_and_wait(topics.memory_topic, key=b"acme/junk", value=b"junk")
    finally:
        await raw.stop()

    stale = await Worker(
        stale_settings, group=f"{topics.topic_prefix}.stale", until_caught_up=True
    ).run()
    assert stale.dead_letters == 2
    live = await Worker(topics, until_caught_up=True).run()
    assert (live.events_applied, live.dead_letters) == (1, 1)
    reader = Reader(StorePaths(topics.data_dir).l2_db, keystore)
    assert reader.get("acme", "doc").payload == b"sealed under v2"
    reader.close()

    ours = (topics.data_dir / "store-id").read_text().strip()
    theirs = (stale_settings.data_dir / "store-id").read_text().strip()
    letters = await read_dead_letters(topics)
    assert sorted((d.source_key, d.store) for d in letters) == sorted(
        [(b"acme/doc", theirs), (b"acme/junk", theirs), (b"acme/junk", ours)]
    )
    assert all(d.dlq_key.endswith(f"/{d.store}".encode()) for d in letters)
    replay = await replay_dead_letters(topics, keystore, store=ours)
    assert (replay["count"], replay["other_stores"], replay["replayed"]) == (1, 2, 0)

    fresh = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    rebuilt = await rebuild(topics, fresh, show_progress=False)
    assert rebuilt["poison_skipped"] == 1
    assert rebuilt["projections"] == digests(StorePaths(topics.data_dir))


async def test_a_lost_store_id_is_restored_and_a_foreign_one_refused(
    topics: Settings,
) -> None:
    """The identity is kept with L2 too: a deleted file comes back as it was
    (a new one would disown the store's dead letters), and a file naming
    another store is refused."""
    from strata.errors import StoreError

    await Worker(topics, until_caught_up=True).run()
    id_file = topics.data_dir / "store-id"
    before = id_file.read_text()
    id_file.unlink()
    await Worker(topics, until_caught_up=True).run()
    assert id_file.read_text() == before
    id_file.write_text("0" * 32 + "\n")
    with pytest.raises(StoreError, match=f"was built by store {before.strip()}"):
        await Worker(topics, until_caught_up=True).run()


async def test_a_worker_with_no_tenant_keys_stops_instead_of_dead_lettering(
    topics: Settings, keystore: LocalKeystore, tmp_path: Path
) -> None:
    """A mistyped data dir has an empty keystore: every sealed event would
    read as poison. The worker stops at the first one and says why."""
    from strata.errors import ConfigError

    async with MemoryProducer(topics, keystore) as producer:
        await producer.write("acme", "doc", "the real store's")
    elsewhere = topics.model_copy(update={"data_dir": tmp_path / "typo"})
    with pytest.raises(ConfigError, match="not the data dir the writers use"):
        await Worker(elsewhere, until_caught_up=True).run()
    assert await read_dead_letters(topics) == []


async def test_a_rebuild_copies_the_store_id_and_makes_none_in_its_source(
    topics: Settings, tmp_path: Path
) -> None:
    """The copy takes its source's id, from L2 when the file was lost, and
    the source is read, never given an id of the rebuild's making."""
    await Worker(topics, until_caught_up=True).run()
    id_file = topics.data_dir / "store-id"
    recorded = id_file.read_text()
    id_file.unlink()
    fresh = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    await rebuild(topics, fresh, show_progress=False)
    assert (fresh.data_dir / "store-id").read_text() == recorded
    assert not id_file.exists()
