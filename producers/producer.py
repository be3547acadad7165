"""Publishing memory events: encrypted, idempotent, keyed by ``tenant/key``.

The payload is sealed before it leaves this process; only ciphertext,
metadata and the content hash reach Kafka. Every send waits for ``acks=all``
from an idempotent producer, and returns the (partition, offset) the event
landed at, a token a reader can wait for.
"""

from __future__ import annotations

import asyncio
import os
import time
from types import TracebackType
from typing import Self

import structlog
from aiokafka import AIOKafkaProducer

from producers.batching import Batcher
from projections.reader import WriteToken
from schemas.codec import Codec
from schemas.events import Event, MemoryDeleted, MemoryWritten
from strata.config import Settings
from strata.crypto import associated_data, seal_parts
from strata.errors import UsageError
from strata.kafka import (
    ABANDON_AFTER_S,
    BrokerWatch,
    bootstrap_of,
    bounded_close,
    existing_end_offsets,
    key_partition,
    message_limit,
    start_client,
)
from strata.keystore import Keyring
from strata.validation import check_agent, check_class, check_key, check_tenant

log = structlog.get_logger(__name__)


def now_ms() -> int:
    """The current UTC time in milliseconds."""
    return time.time_ns() // 1_000_000


#: (tenant, class, agent) triples remembered as valid, so a writer's
#: repeated names are checked once.
_CHECKED_NAMES = 4096


def new_event_id() -> str:
    """A fresh event id: 128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


def producer_options(settings: Settings) -> dict[str, object]:
    """Settings every Strata producer uses (idempotence forces ``acks=all``)."""
    return {
        "bootstrap_servers": bootstrap_of(settings),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 1024 * 1024,
        "max_request_size": message_limit(settings),
        "request_timeout_ms": 30_000,
    }


class MemoryProducer:
    """Publishes memory events for agents.

    Use as an async context manager::

        async with MemoryProducer(settings, keystore) as producer:
            token = await producer.write("acme", "agent-7/likes", "tea", cls="chat")
    """

    def __init__(
        self,
        settings: Settings,
        keystore: Keyring,
        *,
        codec: Codec | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.keystore = keystore
        self.codec = codec or Codec()
        self._start_timeout_s = start_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._partitions: int | None = None
        self._batcher: Batcher | None = None
        self._checked: set[tuple[str, str, str]] = set()
        self._watch: BrokerWatch | None = None

    async def start(self) -> None:
        """Connect to the broker.

        Raises:
            BrokerError: the broker cannot be reached.
        """
        topic = self.settings.memory_topic
        await existing_end_offsets(
            self.settings, topic, timeout_s=self._start_timeout_s
        )
        options = producer_options(self.settings)
        self._producer = AIOKafkaProducer(**options)
        await start_client(
            self._producer, str(options["bootstrap_servers"]), self._start_timeout_s
        )
        self._producer.client.cluster.add_listener(self._forget_partitions)
        await self._producer.partitions_for(topic)
        self._batcher = Batcher(self._producer, topic)

    def _forget_partitions(self, _cluster: object) -> None:
        self._partitions = None

    def _partition_of(self, message_key: bytes) -> int | None:
        """The key's partition by Kafka's default partitioner, or None if unknown yet.

        Computed here, from a cache of recent keys, because the client's
        pure-Python murmur2 would otherwise run on every send; the partition
        count is reread whenever the cluster metadata changes.
        """
        if self._partitions is None:
            assert self._producer is not None
            known = self._producer.client.cluster.partitions_for_topic(
                self.settings.memory_topic
            )
            if not known:
                return None
            self._partitions = len(known)
        return key_partition(message_key, self._partitions)

    async def stop(self) -> None:
        """Flush what is pending and disconnect."""
        try:
            if self._batcher is not None:
                await self._batcher.close()
        finally:
            self._batcher = None
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
            return
        await bounded_close(
            self.stop(),
            step="flush the producer",
            seconds=ABANDON_AFTER_S,
            consequence="messages not acknowledged so far may not be published",
        )

    def seal_write(
        self,
        tenant: str,
        key: str,
        payload: bytes | str,
        *,
        cls: str = "chat",
        agent: str = "cli",
        expected_version: int | None = None,
        metadata: dict[str, str] | None = None,
        event_id: str | None = None,
        time_ms: int | None = None,
    ) -> MemoryWritten:
        """Validate and encrypt a write into its event, without sending it.

        Raises:
            UsageError: a name or the payload size is not acceptable.
            ErasedError: the tenant was erased.
        """
        if (tenant, cls, agent) not in self._checked:
            check_tenant(tenant)
            check_class(cls)
            check_agent(agent)
            if len(self._checked) >= _CHECKED_NAMES:
                self._checked.clear()
            self._checked.add((tenant, cls, agent))
        check_key(key)
        data = payload.encode() if isinstance(payload, str) else payload
        if len(data) > self.settings.max_payload_bytes:
            raise UsageError(
                f"payload of {tenant}/{key} is {len(data)} bytes; the limit is "
                f"{self.settings.max_payload_bytes} (STRATA_MAX_PAYLOAD_BYTES)"
            )
        if expected_version is not None and expected_version < 0:
            raise UsageError(f"expected version {expected_version} is negative")
        event_id = event_id or new_event_id()
        key_id, version, nonce, ciphertext, content_hash = self._seal(
            tenant, key, event_id, data
        )
        # Positional: this runs once per write, and keywords cost twice as much.
        return MemoryWritten(
            event_id,
            tenant,
            key,
            cls,
            agent,
            time_ms if time_ms is not None else now_ms(),
            key_id,
            version,
            nonce,
            ciphertext,
            content_hash,
            expected_version,
            dict(metadata) if metadata else {},
        )

    def _seal(
        self, tenant: str, key: str, event_id: str, data: bytes
    ) -> tuple[str, int, bytes, bytes, bytes]:
        """Encrypt one payload under the tenant's primary key: (key id, key
        version, nonce, ciphertext, content hash).

        Raises:
            ErasedError: the tenant was erased.
            KeyUnavailableError: its key cannot be had or is used up.
        """
        data_key = self.keystore.primary(tenant)
        nonce, ciphertext, content_hash = seal_parts(
            data_key, data, associated_data(tenant, key, event_id), tenant
        )
        return data_key.key_id, data_key.version, nonce, ciphertext, content_hash

    async def write(
        self,
        tenant: str,
        key: str,
        payload: bytes | str,
        *,
        cls: str = "chat",
        agent: str = "cli",
        expected_version: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> WriteToken:
        """Encrypt and publish a write; return where it landed once acknowledged.

        Raises:
            UsageError: a name or the payload size is not acceptable.
            ErasedError: the tenant was erased.
            KafkaError: the broker refused the write.
            BrokerError: the broker stopped answering before acknowledging it.
        """
        event = self.seal_write(
            tenant,
            key,
            payload,
            cls=cls,
            agent=agent,
            expected_version=expected_version,
            metadata=metadata,
        )
        return await self._acknowledged(await self.publish(event))

    async def delete(
        self,
        tenant: str,
        key: str,
        *,
        agent: str = "cli",
        expected_version: int | None = None,
    ) -> WriteToken:
        """Publish a delete; return where it landed once acknowledged."""
        check_tenant(tenant)
        check_key(key)
        check_agent(agent)
        if expected_version is not None and expected_version < 0:
            raise UsageError(f"expected version {expected_version} is negative")
        event = MemoryDeleted(
            event_id=new_event_id(),
            tenant=tenant,
            key=key,
            agent=agent,
            time_ms=now_ms(),
            expected_version=expected_version,
        )
        return await self._acknowledged(await self.publish(event))

    async def _acknowledged(self, sent: asyncio.Future[WriteToken]) -> WriteToken:
        """Wait for one event's acknowledgement, giving up once the broker is gone."""
        if self._watch is None:
            self._watch = BrokerWatch(
                self.settings, "waiting for a write's acknowledgement"
            )
        self._watch.moved()
        return await self._watch.wait(sent)

    async def publish(self, event: Event) -> asyncio.Future[WriteToken]:
        """Queue one event; the returned future resolves to its token on ack.

        Awaiting this coroutine only waits for room in the send buffer, so a
        caller can keep many sends in flight. Events of one key are delivered
        in the order they were published.
        """
        if self._producer is None or self._batcher is None:
            raise RuntimeError("MemoryProducer.start() was not awaited")
        value = self.codec.encode(event)
        message_key = event.message_key
        partition = self._partition_of(message_key)
        if partition is None:
            known = await self._producer.partitions_for(self.settings.memory_topic)
            partition = key_partition(message_key, len(known))
        return await self._batcher.append(partition, message_key, value)
