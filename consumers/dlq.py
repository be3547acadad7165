"""The dead-letter topic: events a worker could not apply, kept unchanged.

Each dead letter carries the original value byte for byte, with the original
headers and these added: source topic, partition, offset and message key,
error class and message, and the time it was dead-lettered (UTC ms).

The topic is compacted and keyed by source position and the store that
decided (``topic/partition/offset/store``, see :func:`strata.paths.store_id`):
sending the same poison twice (a worker that died before its checkpoint)
keeps one letter, one store's decision never erases another's, and `strata
dlq replay` resolves a letter by writing a tombstone for its key once the
event is back on the memory topic. Tombstones are kept (``delete.retention.ms``
is a thousand years), so the keys name every position each store ever
dead-lettered, replayed or not: its workers skip those positions whenever
they read them again, so a rebuild decides as the live worker did even once
the cause (a key the worker did not have yet) is gone, and a replayed event
applies once, where its copy lies.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition

from consumers.validation import decode_and_validate
from schemas.codec import Codec
from strata.config import Settings
from strata.errors import ApplyError, CodecError, UsageError
from strata.kafka import bootstrap_of, existing_end_offsets, start_client, start_reader
from strata.keystore import Keyring

log = structlog.get_logger(__name__)

H_TOPIC = "strata.source.topic"
H_PARTITION = "strata.source.partition"
H_OFFSET = "strata.source.offset"
H_KEY = "strata.source.key"
#: Present when the source message had no value at all (a tombstone): the
#: letter's own value is empty, since a null would delete it from the topic.
H_NULL_VALUE = "strata.source.null_value"
H_ERROR_CLASS = "strata.error.class"
H_ERROR_MESSAGE = "strata.error.message"
H_TIME = "strata.dlq.time_ms"
H_REPLAYED_FROM = "strata.replayed.from"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One unresolved message on the dead-letter topic."""

    #: Its key on the compacted dead-letter topic (see :func:`position_key`).
    dlq_key: bytes
    dlq_offset: int
    source_topic: str
    source_partition: int
    source_offset: int
    error_class: str
    error_message: str
    time_ms: int
    source_key: bytes | None
    #: The source message's value; None for a tombstone.
    value: bytes | None
    #: The store whose worker dead-lettered it; None for a key that names none.
    store: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the value carries ciphertext, so only its size)."""
        return {
            "dlq_offset": self.dlq_offset,
            "source": {
                "topic": self.source_topic,
                "partition": self.source_partition,
                "offset": self.source_offset,
                "key": self.source_key.decode(errors="backslashreplace")
                if self.source_key is not None
                else None,
            },
            "error_class": self.error_class,
            "error_message": self.error_message,
            "time_ms": self.time_ms,
            "value_bytes": len(self.value) if self.value is not None else None,
            "store": self.store,
        }


def position_key(topic: str, partition: int, offset: int, store: str) -> bytes:
    """The dead-letter key of a source position as one store decided it:
    compaction keeps one letter per position and store, so one store's
    decision never erases another's."""
    return f"{topic}/{partition}/{offset}/{store}".encode()


def parse_position_key(key: bytes, topic: str) -> tuple[int, int, str | None] | None:
    """(partition, offset, store) of a dead-letter key of ``topic``; the store
    is None for a key that names none. None if it is no such key.

    Topic names cannot hold ``/``, so the parts split unambiguously.
    """
    prefix = f"{topic}/".encode()
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].decode(errors="replace").split("/", 2)
    try:
        partition, offset = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None
    return partition, offset, parts[2] if len(parts) == 3 else None


def dead_letter_headers(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    error: BaseException,
    *,
    null_value: bool = False,
) -> list[tuple[str, bytes]]:
    """The headers that say why and where a message was dead-lettered."""
    headers = [
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_ERROR_CLASS, type(error).__name__.encode()),
        (H_ERROR_MESSAGE, str(error)[:2000].encode()),
        (H_TIME, str(time.time_ns() // 1_000_000).encode()),
    ]
    if key is not None:
        headers.append((H_KEY, key))
    if null_value:
        headers.append((H_NULL_VALUE, b"1"))
    return headers


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
    store: str,
) -> None:
    """Publish one dead letter and wait for the broker to acknowledge it."""
    extra = dead_letter_headers(
        topic, partition, offset, key, error, null_value=value is None
    )
    kept = [h for h in headers if not h[0].startswith("strata.")]
    await producer.send_and_wait(
        settings.dlq_topic,
        # A compacted topic drops null values: keep an empty one visible.
        value=value if value is not None else b"",
        key=position_key(topic, partition, offset, store),
        headers=kept + extra,
    )


def _store_of(key: bytes | None, topic: str) -> str | None:
    where = parse_position_key(key, topic) if key else None
    return where[2] if where else None


def _parse(msg: ConsumerRecord) -> DeadLetter:
    """A letter from its message; headers a worker did not write are named
    in its error message instead of failing every reader of the topic."""
    h: dict[str, bytes] = dict(msg.headers or ())
    unreadable: list[str] = []

    def text(name: str, default: str) -> str:
        raw = h.get(name)
        return raw.decode(errors="replace") if raw is not None else default

    def number(name: str, default: int) -> int:
        raw = text(name, str(default))
        try:
            return int(raw)
        except ValueError:
            unreadable.append(f"header {name} is {raw[:40]!r}, not a number")
            return default

    message = text(H_ERROR_MESSAGE, "")
    if H_ERROR_CLASS not in h:
        message = "no strata.error headers: not dead-lettered by a worker"
    letter = DeadLetter(
        dlq_key=msg.key,
        dlq_offset=msg.offset,
        source_topic=text(H_TOPIC, ""),
        source_partition=number(H_PARTITION, -1),
        source_offset=number(H_OFFSET, -1),
        error_class=text(H_ERROR_CLASS, ""),
        error_message=message,
        time_ms=number(H_TIME, 0),
        source_key=h.get(H_KEY),
        value=None if H_NULL_VALUE in h else msg.value,
        store=_store_of(msg.key, text(H_TOPIC, "")),
    )
    if unreadable:
        # Said with the letter, wherever it is shown, rather than logged.
        letter = replace(letter, error_message=f"{message} ({'; '.join(unreadable)})")
    return letter


async def _messages(
    settings: Settings, timeout_s: float
) -> AsyncIterator[ConsumerRecord]:
    """Every message of the dead-letter topic, from its start to its end now.

    Raises:
        UsageError: the dead-letter topic does not exist.
    """
    await existing_end_offsets(settings, settings.dlq_topic, timeout_s=timeout_s)
    consumer = await start_reader(settings, timeout_s)
    try:
        tp = TopicPartition(settings.dlq_topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for msg in batch.get(tp, []):
                yield msg
    finally:
        await consumer.stop()


async def dead_lettered_positions(
    settings: Settings, store: str, *, timeout_s: float = 30.0
) -> set[tuple[int, int]]:
    """(partition, offset) of every memory-topic message a worker of
    ``store`` ever dead-lettered, whether its letter is still there or was
    resolved by a replay; empty if there is no dead-letter topic yet.
    Letters that name no store count for every store.

    Raises:
        BrokerError: the broker cannot be reached.
    """
    positions: set[tuple[int, int]] = set()
    try:
        async for msg in _messages(settings, timeout_s):
            where = (
                parse_position_key(msg.key, settings.memory_topic) if msg.key else None
            )
            # Keys from before stores were named count for every store; another
            # store's decision does not bind this one, which decides anew.
            if where is not None and where[2] in (None, store):
                positions.add(where[:2])
    except UsageError:
        return set()
    return positions


async def read_dead_letters(
    settings: Settings, *, timeout_s: float = 30.0
) -> list[DeadLetter]:
    """Every unresolved dead letter, oldest first.

    A letter is resolved when a later tombstone for its key follows it; the
    same poison sent twice is shown once.

    Raises:
        UsageError: the dead-letter topic does not exist.
    """
    # Parsed once resolutions are known: a resolved letter is never read.
    letters: dict[bytes, ConsumerRecord] = {}
    async for msg in _messages(settings, timeout_s):
        if msg.key is None:
            continue
        if msg.value is None:
            letters.pop(msg.key, None)
        elif msg.key not in letters:
            letters[msg.key] = msg
    return sorted((_parse(m) for m in letters.values()), key=lambda d: d.dlq_offset)


async def replay_dead_letters(
    settings: Settings,
    keystore: Keyring,
    *,
    store: str | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Send back to the memory topic every dead letter of ``store`` (every
    letter if None) that now applies.

    A letter that still fails validation stays, and the report says why. A
    replayed letter is resolved with a tombstone once its event is
    acknowledged on the memory topic; the L2 projection applies an event id
    once, so a replay that is interrupted and run again doubles nothing.
    Another store's letters are left to it: this store may have applied
    those events already.
    """
    everyone = await read_dead_letters(settings, timeout_s=timeout_s)
    letters = [d for d in everyone if store is None or d.store in (None, store)]
    codec = Codec()
    bootstrap = bootstrap_of(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all"
    )
    await start_client(producer, bootstrap, timeout_s)
    replayed: list[dict[str, Any]] = []
    still: list[dict[str, Any]] = []
    try:
        for letter in letters:
            # The shape `dlq list --json` gives a letter, so the two compare.
            where = {
                "dlq_offset": letter.dlq_offset,
                "source": letter.to_dict()["source"],
            }
            try:
                decode_and_validate(
                    codec, letter.value, letter.source_key, settings, keystore
                )
            except (CodecError, ApplyError) as exc:
                still.append(
                    {
                        **where,
                        "error_class": type(exc).__name__,
                        "error_message": str(exc),
                    }
                )
                continue
            origin = f"{settings.dlq_topic}@{letter.dlq_offset}".encode()
            meta = await producer.send_and_wait(
                settings.memory_topic,
                value=letter.value,
                key=letter.source_key,
                headers=[(H_REPLAYED_FROM, origin)],
            )
            # The tombstone keeps the letter's store: compaction keeps only it.
            await producer.send_and_wait(
                settings.dlq_topic, key=letter.dlq_key, value=None
            )
            replayed.append(
                {**where, "new_partition": meta.partition, "new_offset": meta.offset}
            )
            log.info(
                "dlq.replayed",
                source_partition=letter.source_partition,
                source_offset=letter.source_offset,
                partition=meta.partition,
                offset=meta.offset,
            )
    finally:
        await producer.stop()
    return {
        "count": len(letters),
        "other_stores": len(everyone) - len(letters),
        "replayed": len(replayed),
        "still_failing": len(still),
        "messages": replayed,
        "errors": still,
    }
