"""The dead-letter topic: events a worker could not apply, kept unchanged.

Each dead letter is the original key and value, with the original headers
and these added: source topic, partition and offset, error class and
message, and the time it was dead-lettered (UTC milliseconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from strata.config import Settings
from strata.kafka import bootstrap_of, start_client

H_TOPIC = "strata.source.topic"
H_PARTITION = "strata.source.partition"
H_OFFSET = "strata.source.offset"
H_ERROR_CLASS = "strata.error.class"
H_ERROR_MESSAGE = "strata.error.message"
H_TIME = "strata.dlq.time_ms"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message on the dead-letter topic, as `strata dlq list` shows it."""

    dlq_offset: int
    source_topic: str
    source_partition: int
    source_offset: int
    error_class: str
    error_message: str
    time_ms: int
    key: bytes | None
    value: bytes | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the value is ciphertext-bearing, so only its size)."""
        return {
            "dlq_offset": self.dlq_offset,
            "source": {
                "topic": self.source_topic,
                "partition": self.source_partition,
                "offset": self.source_offset,
            },
            "error_class": self.error_class,
            "error_message": self.error_message,
            "time_ms": self.time_ms,
            "key": self.key.decode(errors="replace") if self.key is not None else None,
            "value_bytes": len(self.value) if self.value is not None else 0,
        }


def dead_letter_headers(
    topic: str, partition: int, offset: int, error: BaseException
) -> list[tuple[str, bytes]]:
    """The headers that say why and where a message was dead-lettered."""
    return [
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_ERROR_CLASS, type(error).__name__.encode()),
        (H_ERROR_MESSAGE, str(error)[:2000].encode()),
        (H_TIME, str(time.time_ns() // 1_000_000).encode()),
    ]


async def send_dead_letter(
    producer: AIOKafkaProducer,
    settings: Settings,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    error: BaseException,
) -> None:
    """Publish one dead letter and wait for the broker to acknowledge it."""
    extra = dead_letter_headers(topic, partition, offset, error)
    kept = [h for h in headers if not h[0].startswith("strata.")]
    await producer.send_and_wait(
        settings.dlq_topic, value=value, key=key, headers=kept + extra
    )


def _parse(
    offset: int, key: bytes | None, value: bytes | None, headers: Any
) -> DeadLetter:
    h = {name: raw.decode(errors="replace") for name, raw in headers}
    return DeadLetter(
        dlq_offset=offset,
        source_topic=h.get(H_TOPIC, ""),
        source_partition=int(h.get(H_PARTITION, "-1")),
        source_offset=int(h.get(H_OFFSET, "-1")),
        error_class=h.get(H_ERROR_CLASS, ""),
        error_message=h.get(H_ERROR_MESSAGE, ""),
        time_ms=int(h.get(H_TIME, "0")),
        key=key,
        value=value,
    )


async def read_dead_letters(
    settings: Settings, *, timeout_s: float = 30.0
) -> list[DeadLetter]:
    """Every dead letter currently on the topic, oldest first.

    A worker that died after dead-lettering but before its checkpoint sends
    the same message again on restart; duplicates (same source position) are
    shown once.
    """
    bootstrap = bootstrap_of(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await start_client(consumer, bootstrap, timeout_s)
    letters: dict[tuple[str, int, int], DeadLetter] = {}
    try:
        tp = TopicPartition(settings.dlq_topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for msg in batch.get(tp, []):
                letter = _parse(msg.offset, msg.key, msg.value, msg.headers)
                ident = (
                    letter.source_topic,
                    letter.source_partition,
                    letter.source_offset,
                )
                letters.setdefault(ident, letter)
    finally:
        await consumer.stop()
    return list(letters.values())
