"""Record batches built per partition, handed to the client whole.

aiokafka's ``send`` costs a partitioner call, a size check and a future per
message, which on this workload is more than encrypting and encoding the
event. Its batch API (``create_batch`` and ``send_batch``) skips all three:
a :class:`Batcher` keeps one open batch per partition, appends each message
to it, and hands batches to the client in order, one partition at a time
each. A batch closes when it is full or when its partition's previous batch
has been taken, so a lone write goes out at once and a burst of writes goes
out in large batches. The producer's settings (idempotence, ``acks=all``, compression)
apply to these batches as to any other.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from projections.reader import WriteToken

log = structlog.get_logger(__name__)

#: Full batches waiting for the client before publishers are made to wait.
MAX_READY = 12


@dataclass(eq=False)
class _Batch:
    partition: int
    builder: Any
    waiters: list[asyncio.Future[WriteToken]] = field(default_factory=list)


class Batcher:
    """Appends messages to per-partition batches and sends them in order.

    Each partition with work has its own sender task, which hands the
    client one batch at a time: the client keeps one batch per partition in
    flight (idempotence), and meanwhile the next batch of that partition
    fills, while other partitions are not held up behind it.

    Args:
        producer: a started producer; the batcher does not own it.
        topic: where every message goes.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._open: dict[int, _Batch] = {}
        self._queued: dict[int, collections.deque[_Batch]] = collections.defaultdict(
            collections.deque
        )
        self._waiting = 0  # batches closed and not yet handed to the client
        self._senders: dict[int, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._loop = asyncio.get_running_loop()

    async def append(
        self, partition: int, key: bytes, value: bytes
    ) -> asyncio.Future[WriteToken]:
        """Add one message; the future resolves once the broker acknowledged it.

        Waits only when too many full batches are queued for the client.

        Raises:
            RuntimeError: the batcher was closed.
        """
        if self._closed:
            raise RuntimeError("the producer is stopping; nothing more is accepted")
        while not self._room.is_set():
            await self._room.wait()
        batch = self._open.get(partition)
        if batch is None:
            batch = self._open[partition] = _Batch(
                partition, self._producer.create_batch()
            )
        if batch.builder.append(key=key, value=value, timestamp=None) is None:
            # Full: an empty batch takes any one message, so this one is not.
            self._close(batch)
            batch = self._open[partition] = _Batch(
                partition, self._producer.create_batch()
            )
            batch.builder.append(key=key, value=value, timestamp=None)
        waiter: asyncio.Future[WriteToken] = self._loop.create_future()
        batch.waiters.append(waiter)
        if partition not in self._senders:
            self._senders[partition] = self._loop.create_task(
                self._send(partition), name=f"batcher:{self._topic}:{partition}"
            )
        return waiter

    def _close(self, batch: _Batch) -> None:
        del self._open[batch.partition]
        self._queued[batch.partition].append(batch)
        self._waiting += 1
        if self._waiting >= MAX_READY:
            self._room.clear()

    async def _send(self, partition: int) -> None:
        """Hand the partition's batches to the client in order, until none is left."""
        queue = self._queued[partition]
        try:
            while True:
                if not queue:
                    if partition not in self._open:
                        return
                    # The batch that filled while the last one was in flight.
                    self._close(self._open[partition])
                batch = queue.popleft()
                self._waiting -= 1
                if self._waiting < MAX_READY:
                    self._room.set()
                await self._submit(batch)
        finally:
            del self._senders[partition]

    async def _submit(self, batch: _Batch) -> None:
        # Closed, the batch is ready at once: it already waited for the
        # burst it belongs to, and lingering longer only adds latency.
        batch.builder.close()
        try:
            delivery = await self._producer.send_batch(
                batch.builder, self._topic, partition=batch.partition
            )
        except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
            log.warning(
                "producer.batch_refused",
                topic=self._topic,
                partition=batch.partition,
                messages=len(batch.waiters),
                error=f"{type(exc).__name__}: {exc}",
            )
            _fail(batch.waiters, exc)
            return
        delivery.add_done_callback(lambda done: _settle(batch, done))

    async def flush(self) -> None:
        """Wait until every appended message has been handed to the client."""
        while self._senders:
            await asyncio.gather(*self._senders.values())

    async def close(self) -> None:
        """Refuse new messages and hand over what is queued."""
        self._closed = True
        await self.flush()


def _fail(waiters: list[asyncio.Future[WriteToken]], exc: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(exc)


def _settle(batch: _Batch, delivery: asyncio.Future[Any]) -> None:
    if delivery.cancelled():
        for waiter in batch.waiters:
            waiter.cancel()
        return
    error = delivery.exception()
    if error is not None:
        _fail(batch.waiters, error)
        return
    base = delivery.result().offset
    for index, waiter in enumerate(batch.waiters):
        if not waiter.done():
            waiter.set_result(WriteToken(batch.partition, base + index))
