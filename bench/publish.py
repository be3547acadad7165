"""Publish rate: raw aiokafka ``send`` against Strata's MemoryProducer, same settings.

Three publishers, each on a fresh topic of the workload's partitions, in an
order that rotates from run to run:

* ``aiokafka``: pre-sealed, pre-encoded values through a raw producer with
  Strata's producer options (idempotent, ``acks=all``, ``linger_ms=5``);
* ``strata``: :meth:`MemoryProducer.seal_write` then :meth:`publish` per event
  (validate, encrypt, hash, encode, send), the path an agent's write takes;
* ``plain``: the same checks and Avro events without encryption, sent through
  :meth:`MemoryProducer.publish`, so ``strata`` minus ``plain`` is the cost of
  sealing.

Plaintexts are generated before the clock starts; every publisher keeps at
most :data:`~bench.dataset.IN_FLIGHT` sends unacknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.context import Context
from bench.dataset import (
    IN_FLIGHT,
    Spec,
    keystore_of,
    raw_producer,
    sealed_messages,
    send_all,
    specs,
)
from bench.registry import Measurement, ratio, stage, target
from producers.producer import MemoryProducer, new_event_id, now_ms
from schemas.events import MemoryWritten
from strata.config import Settings
from strata.kafka import ensure_topics
from strata.validation import check_agent, check_class, check_key, check_tenant

_LABELS = {
    "aiokafka": "publish: raw aiokafka send (pre-encoded)",
    "strata": "publish: Strata MemoryProducer (seal+encode+send)",
    "plain": "publish: Strata, unencrypted Avro (encode+send)",
}


@stage("publish", "publish rate: raw aiokafka send vs MemoryProducer", order=10)
def publish(ctx: Context) -> list[Measurement]:
    """One run of each publisher, each on its own fresh topic."""
    writes = list(specs(ctx.workload, ctx.workload.events, seed=ctx.run + 1))
    order = ["aiokafka", "strata", "plain"]
    shift = ctx.run % len(order)
    order = order[shift:] + order[:shift]
    out = []
    for name in order:
        prefix = ctx.fresh_name(f"pub-{name}")
        settings = ctx.settings(prefix, ctx.fresh_data_dir(f"pub-{name}"))
        seconds = asyncio.run(_PUBLISHERS[name](settings, writes))
        out.append(
            Measurement(
                f"publish.{name}", len(writes) / seconds, "events/s", _LABELS[name]
            )
        )
    return out


async def _timed(
    settings: Settings, send: Callable[[MemoryProducer], Awaitable[Any]]
) -> float:
    await ensure_topics(settings)
    async with MemoryProducer(settings, keystore_of(settings)) as producer:
        began = time.perf_counter()
        await send(producer)
        # Leaving the context flushes nothing more: every send was acknowledged.
        return time.perf_counter() - began


async def _aiokafka(settings: Settings, writes: list[Spec]) -> float:
    await ensure_topics(settings)
    sealer = MemoryProducer(settings, keystore_of(settings))
    messages = list(sealed_messages(sealer, writes))
    producer = await raw_producer(settings)
    try:
        began = time.perf_counter()
        await send_all(producer, settings.memory_topic, messages)
        return time.perf_counter() - began
    finally:
        await producer.stop()


async def strata_publish(settings: Settings, writes: list[Spec]) -> float:
    """Seal and publish every write through a MemoryProducer; return the seconds."""

    async def send(producer: MemoryProducer) -> None:
        pending: list[asyncio.Future[Any]] = []
        for w in writes:
            event = producer.seal_write(
                w.tenant, w.key, w.payload, cls=w.cls, agent="bench"
            )
            pending.append(await producer.publish(event))
            if len(pending) >= IN_FLIGHT:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    # The tenants' keys exist before the clock starts, as they would in service.
    keystore = keystore_of(settings)
    for tenant in {w.tenant for w in writes}:
        keystore.primary(tenant)
    return await _timed(settings, send)


async def _plain(settings: Settings, writes: list[Spec]) -> float:
    nonce = bytes(12)
    digest = bytes(32)

    async def send(producer: MemoryProducer) -> None:
        pending: list[asyncio.Future[Any]] = []
        for w in writes:
            # The checks seal_write makes, so that only sealing differs.
            check_tenant(w.tenant)
            check_key(w.key)
            check_class(w.cls)
            check_agent("bench")
            event = MemoryWritten(
                event_id=new_event_id(),
                tenant=w.tenant,
                key=w.key,
                cls=w.cls,
                agent="bench",
                time_ms=now_ms(),
                key_id="plain",
                key_version=0,
                nonce=nonce,
                ciphertext=w.payload,
                content_hash=digest,
            )
            pending.append(await producer.publish(event))
            if len(pending) >= IN_FLIGHT:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    return await _timed(settings, send)


_PUBLISHERS: dict[str, Callable[[Settings, list[Spec]], Awaitable[float]]] = {
    "aiokafka": _aiokafka,
    "strata": strata_publish,
    "plain": _plain,
}

ratio(
    "publish.strata_vs_aiokafka",
    "publish.strata",
    "publish.aiokafka",
    "publish: Strata / raw aiokafka",
)
ratio(
    "publish.encryption_overhead",
    "publish.plain",
    "publish.strata",
    "publish: encryption overhead (plain/strata - 1)",
    minus_one=True,
)
target("publish.strata_vs_aiokafka", ">=", 0.8)
target("publish.encryption_overhead", "<", 0.15)
