"""Publish rate: raw aiokafka ``send`` against Strata's MemoryProducer, same settings.

Four publishers, each on a fresh topic of the workload's partitions, taking
turns: each sends a tenth of the writes, then the next one does, in an order
that rotates from turn to turn and run to run, so the machine's slow spells,
and what one publisher leaves the next to absorb, fall on all of them alike.
Producers start, and keys exist, before any clock starts.

* ``aiokafka``: pre-sealed, pre-encoded values through a raw producer with
  Strata's producer options (idempotent, ``acks=all``, ``linger_ms=5``);
* ``strata``: :meth:`MemoryProducer.seal_write` then :meth:`publish` per event
  (validate, encrypt, hash, encode, send), the path an agent's write takes;
* ``plain``: the same ``seal_write`` and ``publish`` by a producer whose one
  sealing step returns the payload as it is, so ``strata`` minus ``plain`` is
  the cost of sealing;
* ``ciphers``: ``plain`` plus only the AES-GCM and HMAC-SHA256 calls on each
  payload, the floor under any sealing built on these primitives.

Each publisher's figures are its rate and this process's CPU time per event
(the broker's is not in it).

Plaintexts are generated before the clock starts; every publisher keeps at
most :data:`~bench.dataset.IN_FLIGHT` sends unacknowledged and waits for all
of a turn's acknowledgements before the next publisher's turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
from producers.producer import MemoryProducer
from strata.config import Settings
from strata.kafka import ensure_topics
from strata.keystore import Keyring

#: How many turns each publisher takes.
TURNS = 10

_LABELS = {
    "aiokafka": "publish: raw aiokafka send (pre-encoded)",
    "strata": "publish: Strata MemoryProducer (seal+encode+send)",
    "plain": "publish: Strata, unencrypted Avro (encode+send)",
    "ciphers": "publish: unencrypted + the AES-GCM and HMAC calls alone",
}


@stage("publish", "publish rate: raw aiokafka send vs MemoryProducer", order=10)
def publish(ctx: Context) -> list[Measurement]:
    """The three publishers taking turns, a chunk each, on topics of their own."""
    writes = list(specs(ctx.workload, ctx.workload.events, seed=ctx.run + 1))
    order = list(_PUBLISHERS)
    shift = ctx.run % len(order)
    order = order[shift:] + order[:shift]
    settings = {
        name: ctx.settings(
            ctx.fresh_name(f"pub-{name}"), ctx.fresh_data_dir(f"pub-{name}")
        )
        for name in order
    }
    seconds, cpu = asyncio.run(_take_turns(order, settings, writes))
    rates = [
        Measurement(
            f"publish.{name}", len(writes) / seconds[name], "events/s", _LABELS[name]
        )
        for name in order
    ]
    return rates + [
        Measurement(
            f"publish.{name}_cpu",
            cpu[name] / len(writes) * 1e6,
            "us/event",
            f"{_LABELS[name]}: this process's CPU time",
        )
        for name in order
    ]


async def _take_turns(
    order: list[str], settings: dict[str, Settings], writes: list[Spec]
) -> tuple[dict[str, float], dict[str, float]]:
    """Each publisher sends the writes in :data:`TURNS` chunks, in turn with the
    others, so a slow spell of the machine falls on all of them alike;
    returns the seconds each spent sending (and waiting for acknowledgements),
    and the CPU seconds this process spent meanwhile (the broker's are not in
    them)."""
    spent = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    size = -(-len(writes) // TURNS)
    async with contextlib.AsyncExitStack() as stack:
        senders = {
            name: await stack.enter_async_context(
                _PUBLISHERS[name](settings[name], writes)
            )
            for name in order
        }
        for turn, first in enumerate(range(0, len(writes), size)):
            # Each turn starts with another publisher, so none always follows
            # the same one: a publisher leaves the broker and the heap busy
            # for a while after its last acknowledgement, and a fixed cycle
            # charged that to the same successor every turn.
            shift = turn % len(order)
            for name in order[shift:] + order[:shift]:
                began, began_cpu = time.perf_counter(), time.process_time()
                await senders[name](first, min(first + size, len(writes)))
                spent[name] += time.perf_counter() - began
                cpu[name] += time.process_time() - began_cpu
    return spent, cpu


#: Sends writes ``[first, end)`` and waits for their acknowledgements.
Send = Callable[[int, int], Awaitable[None]]


async def _gather_each(
    pending: list[asyncio.Future[Any]], future: asyncio.Future[Any]
) -> None:
    pending.append(future)
    if len(pending) >= IN_FLIGHT:
        await asyncio.gather(*pending)
        pending.clear()


@contextlib.asynccontextmanager
async def _aiokafka(settings: Settings, writes: list[Spec]) -> AsyncIterator[Send]:
    await ensure_topics(settings)
    sealer = MemoryProducer(settings, keystore_of(settings))
    messages = list(sealed_messages(sealer, writes))
    producer = await raw_producer(settings)

    async def send(first: int, end: int) -> None:
        await send_all(producer, settings.memory_topic, messages[first:end])

    try:
        yield send
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def _strata(settings: Settings, writes: list[Spec]) -> AsyncIterator[Send]:
    async with _through(MemoryProducer, settings, writes) as send:
        yield send


@contextlib.asynccontextmanager
async def _plain(settings: Settings, writes: list[Spec]) -> AsyncIterator[Send]:
    async with _through(_PlainProducer, settings, writes) as send:
        yield send


@contextlib.asynccontextmanager
async def _ciphers(settings: Settings, writes: list[Spec]) -> AsyncIterator[Send]:
    async with _through(_CipherCallsProducer, settings, writes) as send:
        yield send


@contextlib.asynccontextmanager
async def _through(
    kind: type[MemoryProducer], settings: Settings, writes: list[Spec]
) -> AsyncIterator[Send]:
    """Writes through :meth:`MemoryProducer.seal_write` and ``publish`` of a
    producer of ``kind``: the three kinds differ only in how they seal."""
    await ensure_topics(settings)
    keystore = keystore_of(settings)
    # The tenants' keys exist before the clock starts, as they would in service.
    for tenant in {w.tenant for w in writes}:
        keystore.primary(tenant)
    async with kind(settings, keystore) as producer:

        async def send(first: int, end: int) -> None:
            pending: list[asyncio.Future[Any]] = []
            for w in writes[first:end]:
                event = producer.seal_write(
                    w.tenant, w.key, w.payload, cls=w.cls, agent="bench"
                )
                await _gather_each(pending, await producer.publish(event))
            await asyncio.gather(*pending)

        yield send


async def strata_publish(settings: Settings, writes: list[Spec]) -> None:
    """Seal and publish every write through a MemoryProducer (the topic, the
    keys and the producer's start included)."""
    async with _strata(settings, writes) as send:
        await send(0, len(writes))


class _PlainProducer(MemoryProducer):
    """Everything a write does but sealing: the payload goes out as it is."""

    def _seal(
        self, tenant: str, key: str, event_id: str, data: bytes
    ) -> tuple[str, int, bytes, bytes, bytes]:
        return "plain", 0, _NO_NONCE, data, _NO_DIGEST


class _CipherCallsProducer(MemoryProducer):
    """The plain write plus the two primitive calls sealing makes on each
    payload (AES-256-GCM under one key with a fixed binding, and the
    HMAC-SHA256 content hash), each with a fresh random nonce, and nothing
    else: no key lookup, usage meter or per-record binding."""

    def __init__(self, settings: Settings, keystore: Keyring) -> None:
        super().__init__(settings, keystore)
        material = os.urandom(32)
        self._encrypt = AESGCM(material).encrypt
        padded = material.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        self._nonces: Iterator[bytes] = iter(())

    def _seal(
        self, tenant: str, key: str, event_id: str, data: bytes
    ) -> tuple[str, int, bytes, bytes, bytes]:
        nonce = next(self._nonces, None) or self._draw()
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        ciphertext = self._encrypt(nonce, data, _BINDING)
        return "plain", 0, nonce, ciphertext, outer.digest()

    def _draw(self) -> bytes:
        drawn = os.urandom(12 * 1024)
        self._nonces = iter([drawn[i : i + 12] for i in range(12, len(drawn), 12)])
        return drawn[:12]


_NO_NONCE = bytes(12)
_NO_DIGEST = bytes(32)
_BINDING = b"strata/v1" + bytes(60)


_PUBLISHERS: dict[
    str,
    Callable[[Settings, list[Spec]], contextlib.AbstractAsyncContextManager[Send]],
] = {
    "aiokafka": _aiokafka,
    "strata": _strata,
    "plain": _plain,
    "ciphers": _ciphers,
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
ratio(
    "publish.encryption_cpu_overhead",
    "publish.strata_cpu",
    "publish.plain_cpu",
    "publish: encryption overhead in the publisher's CPU time (strata/plain - 1)",
    minus_one=True,
)
ratio(
    "publish.cipher_calls_overhead",
    "publish.plain",
    "publish.ciphers",
    "publish: overhead of the two cipher calls alone (plain/ciphers - 1)",
    minus_one=True,
)
target("publish.strata_vs_aiokafka", ">=", 0.8)
target("publish.encryption_overhead", "<", 0.15)
