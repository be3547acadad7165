"""Synthetic memory events, sealed exactly as Strata seals them, and a fast publisher.

Events are built by :meth:`MemoryProducer.seal_write` (validation, AES-GCM,
content hash) and encoded by the Strata codec, so every consumer reads what a
real producer writes. Publishing goes through a raw aiokafka producer with
Strata's producer settings; it is a fixture, not a figure.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer

from producers.producer import MemoryProducer, producer_options
from strata.config import Settings
from strata.kafka import end_offsets, ensure_topics, start_client
from strata.keystore import LocalKeystore
from strata.paths import StorePaths

if TYPE_CHECKING:
    from bench.context import Workload

CLASSES = ("chat", "ops", "research", "legal", "finance", "pii")
#: Unacknowledged sends at most; every publisher in the harness uses the same.
IN_FLIGHT = 5000


@dataclass(frozen=True)
class Dataset:
    """A published topic of sealed events and where it ends."""

    settings: Settings
    events: int
    ends: dict[int, int]

    @property
    def topic(self) -> str:
        """The memory topic holding the events."""
        return self.settings.memory_topic


@dataclass(frozen=True)
class Spec:
    """One write to make: who, what, and the plaintext."""

    tenant: str
    key: str
    cls: str
    payload: bytes


def keystore_of(settings: Settings) -> LocalKeystore:
    """The local keystore of a data dir, as Strata's commands open it."""
    return LocalKeystore(StorePaths(settings.data_dir).keys, settings.master_key_path)


def specs(
    workload: Workload, count: int, *, seed: int = 1, distinct: bool = False
) -> Iterator[Spec]:
    """``count`` writes spread over the workload's tenants and keys; repeatable.

    With ``distinct`` every write is to a key of its own, so ``count`` writes
    make ``count`` records.
    """
    rng = random.Random(seed)
    for i in range(count):
        yield Spec(
            tenant=f"tenant-{i % workload.tenants:03d}",
            key=(
                f"bench/{i // workload.tenants:07d}"
                if distinct
                else f"bench/{rng.randrange(workload.keys):06d}"
            ),
            cls=CLASSES[i % len(CLASSES)],
            payload=rng.randbytes(workload.size),
        )


def sealed_messages(
    producer: MemoryProducer, writes: Iterable[Spec]
) -> Iterator[tuple[bytes, bytes]]:
    """(message key, message value) of each write, sealed and encoded by Strata."""
    for w in writes:
        event = producer.seal_write(
            w.tenant, w.key, w.payload, cls=w.cls, agent="bench"
        )
        yield event.message_key, producer.codec.encode(event)


async def send_all(
    producer: AIOKafkaProducer,
    topic: str,
    messages: Iterable[tuple[bytes, bytes]],
    *,
    in_flight: int = IN_FLIGHT,
) -> int:
    """Send every message and wait for every acknowledgement; return the count."""
    pending: list[asyncio.Future[Any]] = []
    sent = 0
    for key, value in messages:
        pending.append(await producer.send(topic, value=value, key=key))
        sent += 1
        if len(pending) >= in_flight:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return sent


async def raw_producer(settings: Settings) -> AIOKafkaProducer:
    """A started aiokafka producer with exactly Strata's producer settings."""
    options = producer_options(settings)
    producer = AIOKafkaProducer(**options)
    await start_client(producer, str(options["bootstrap_servers"]), 30.0)
    return producer


async def publish_dataset(
    settings: Settings, workload: Workload, count: int, *, distinct: bool = False
) -> Dataset:
    """Create the topics of ``settings`` and publish ``count`` sealed events to
    them (``distinct``: each to a key of its own, see :func:`specs`).

    Raises:
        RuntimeError: the topic's end offsets do not add up to ``count``.
    """
    await ensure_topics(settings)
    sealer = MemoryProducer(settings, keystore_of(settings))
    producer = await raw_producer(settings)
    try:
        messages = sealed_messages(sealer, specs(workload, count, distinct=distinct))
        await send_all(producer, settings.memory_topic, messages)
    finally:
        await producer.stop()
    ends = await end_offsets(settings, [settings.memory_topic])
    by_partition = {tp.partition: offset for tp, offset in ends.items()}
    # Idempotent sends without transactions: no markers, so ends add up exactly.
    if sum(by_partition.values()) != count:
        raise RuntimeError(
            f"{settings.memory_topic} holds {sum(by_partition.values())} events, "
            f"expected {count}"
        )
    return Dataset(settings, count, by_partition)
