"""The producer's per-partition batches: tokens name the right offsets, order holds."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer

from producers.producer import MemoryProducer
from projections.reader import WriteToken
from schemas.codec import Codec
from strata.config import Settings
from strata.kafka import bootstrap_of, end_offsets
from strata.keystore import LocalKeystore

pytestmark = pytest.mark.broker


async def _read_all(settings: Settings) -> dict[WriteToken, bytes]:
    """Every message of the memory topic by (partition, offset)."""
    ends = await end_offsets(settings, [settings.memory_topic])
    wanted = sum(ends.values())
    consumer = AIOKafkaConsumer(
        settings.memory_topic,
        bootstrap_servers=bootstrap_of(settings),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: dict[WriteToken, bytes] = {}
    try:
        async with asyncio.timeout(60):
            while len(found) < wanted:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, messages in batches.items():
                    for m in messages:
                        assert m.value is not None
                        found[WriteToken(tp.partition, m.offset)] = m.value
    finally:
        await consumer.stop()
    return found


async def test_a_burst_spanning_many_batches_lands_where_its_tokens_say(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """6,000 events of 2 KiB (several full batches per partition): each token
    names the message holding its event, and each key's events are in order."""
    codec = Codec()
    sent: dict[str, asyncio.Future[WriteToken]] = {}
    per_key: dict[str, list[str]] = defaultdict(list)
    async with MemoryProducer(topics, keystore) as producer:
        for i in range(6000):
            key = f"agent/{i % 40}"
            event = producer.seal_write("acme", key, bytes(2048), agent="test")
            sent[event.event_id] = await producer.publish(event)
            per_key[key].append(event.event_id)
        tokens = {eid: await token for eid, token in sent.items()}
    assert len(set(tokens.values())) == len(tokens)
    stored = await _read_all(topics)
    assert len(stored) == len(tokens)
    for event_id, token in tokens.items():
        assert codec.decode(stored[token]).event_id == event_id
    for key, event_ids in per_key.items():
        positions = [tokens[e] for e in event_ids]
        assert len({p.partition for p in positions}) == 1, key
        offsets = [p.offset for p in positions]
        assert offsets == sorted(offsets), key


async def test_stop_delivers_what_was_published_and_then_refuses(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Tokens not yet awaited at stop still resolve; a publish after stop fails."""
    producer = MemoryProducer(topics, keystore)
    await producer.start()
    pending = [
        await producer.publish(producer.seal_write("acme", f"k{i}", b"x", agent="test"))
        for i in range(500)
    ]
    assert not any(token.done() for token in pending)
    await producer.stop()
    assert all(token.done() and token.exception() is None for token in pending)
    with pytest.raises(RuntimeError, match="start"):
        await producer.publish(producer.seal_write("acme", "late", b"x", agent="test"))
    assert sum((await end_offsets(topics, [topics.memory_topic])).values()) == 500
