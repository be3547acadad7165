"""Record batches built per partition, handed to the client whole.

aiokafka's ``send`` costs a partitioner call, a size check and a future per
message, which on this workload is more than encrypting and encoding the
event. Its batch API (``create_batch`` and ``send_batch``) skips all three:
a :class:`Batcher` keeps one open batch per partition, appends each message
to it, and a single sender task submits batches in the order they closed.
A batch closes when it is full or when the event loop next runs the sender,
so a lone write goes out at once and a burst of writes goes out in large
batches. The producer's settings (idempotence, ``acks=all``, compression)
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

#: Closed batches waiting for the sender before publishers are made to wait.
MAX_READY = 12


@dataclass(eq=False)
class _Batch:
    partition: int
    builder: Any
    waiters: list[asyncio.Future[WriteToken]] = field(default_factory=list)


class Batcher:
    """Appends messages to per-partition batches and sends them in order.

    Args:
        producer: a started producer; the batcher does not own it.
        topic: where every message goes.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._open: dict[int, _Batch] = {}
        self._ready: collections.deque[_Batch] = collections.deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._sender = asyncio.get_running_loop().create_task(
            self._send_forever(), name=f"batcher:{topic}"
        )

    async def append(
        self, partition: int, key: bytes, value: bytes
    ) -> asyncio.Future[WriteToken]:
        """Add one message; the future resolves once the broker acknowledged it.

        Waits only when too many closed batches are queued for the sender.

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
        waiter: asyncio.Future[WriteToken] = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        self._idle.clear()
        self._wakeup.set()
        return waiter

    def _close(self, batch: _Batch) -> None:
        del self._open[batch.partition]
        self._ready.append(batch)
        if len(self._ready) >= MAX_READY:
            self._room.clear()

    async def _send_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._ready or self._open:
                if not self._ready:
                    for batch in list(self._open.values()):
                        self._close(batch)
                batch = self._ready.popleft()
                if len(self._ready) < MAX_READY:
                    self._room.set()
                await self._submit(batch)
            self._idle.set()

    async def _submit(self, batch: _Batch) -> None:
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
        while not self._idle.is_set():
            idle = asyncio.ensure_future(self._idle.wait())
            try:
                await asyncio.wait(
                    [idle, self._sender], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                idle.cancel()
            if self._sender.done():
                self._sender.result()  # raises what stopped it
                raise RuntimeError("the batch sender stopped")

    async def close(self) -> None:
        """Hand over what is queued, then stop the sender task."""
        self._closed = True
        try:
            await self.flush()
        finally:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)


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
