"""Synthetic load for benchmarks and soak tests: seeded, so runs are repeatable."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from aiokafka.errors import KafkaError

from producers.producer import MemoryProducer
from strata.config import Settings
from strata.kafka import BrokerWatch, broker_failure, ensure_topics, pinned
from strata.keystore import open_keystore

_CLASSES = ("chat", "ops", "research", "legal", "finance", "pii")


async def publish_synthetic(
    settings: Settings,
    *,
    events: int,
    tenants: int = 3,
    size: int = 1024,
    seed: int = 1,
    keys: int = 1000,
    in_flight: int = 5000,
) -> dict[str, Any]:
    """Publish ``events`` writes of ``size`` random bytes over tenants and keys.

    Returns counts, seconds and the rate. At most ``in_flight`` sends are
    unacknowledged at once, which bounds memory.
    """
    settings = pinned(settings)
    await ensure_topics(settings)
    rng = random.Random(seed)  # noqa: S311 - repeatable synthetic data
    keystore = open_keystore(settings)
    began = time.perf_counter()
    acknowledged = 0
    watch = BrokerWatch(
        settings, "publishing synthetic writes", then="nothing resumes a load"
    )
    try:
        async with MemoryProducer(settings, keystore) as producer:
            pending: list[asyncio.Future[Any]] = []
            for i in range(events):
                tenant = f"tenant-{i % tenants:03d}"
                key = f"load/{rng.randrange(keys):06d}"
                event = producer.seal_write(
                    tenant,
                    key,
                    rng.randbytes(size),
                    cls=_CLASSES[i % len(_CLASSES)],
                    agent="load",
                )
                pending.append(await producer.publish(event))
                if len(pending) >= in_flight:
                    await watch.wait(asyncio.gather(*pending))
                    acknowledged += len(pending)
                    pending.clear()
            await watch.wait(asyncio.gather(*pending))
    except KafkaError as exc:
        doing = f"publishing synthetic writes ({acknowledged} of {events} acknowledged)"
        raise broker_failure(
            settings, doing, exc, then="nothing resumes a load"
        ) from exc
    seconds = time.perf_counter() - began
    return {
        "events": events,
        "tenants": tenants,
        "size": size,
        "seconds": round(seconds, 3),
        "events_per_s": events / seconds if seconds else 0.0,
    }
