"""The baselines: raw consumers that read the dataset topic and do nothing else.

Every reader joins a fresh consumer group (the worker does too, so all pay
the same join), starts from the earliest offset, and stops once every
partition has reached the end offsets recorded when the topic was published.
The clock runs from the client's construction to the last record.

The aiokafka consumer uses the worker's own fetch settings and batch size,
so the projection ratio isolates what the worker does with the records. A
second aiokafka read decodes every value with the Strata codec and nothing
more: the floor under any projection of these events.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench.context import Context
from bench.dataset import Dataset
from bench.registry import Measurement, Skip, ratio, stage
from schemas.codec import Codec

#: The worker's ``getmany`` batch and fetch sizes (consumers/worker.py).
WORKER_MAX_RECORDS = 2000
WORKER_FETCH = {
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 8 * 1024 * 1024,
}


@stage(
    "consume",
    "raw aiokafka consumer reading the topic: doing nothing, and decoding only",
    order=20,
)
def consume(ctx: Context) -> list[Measurement]:
    """Two timed reads of the dataset topic with aiokafka, alternating which goes first.

    The second read also decodes every value with the Strata codec: the least
    any projection of these events has to do, so the gap between it and the
    worker is what the worker's own steps cost.
    """
    data = ctx.dataset()
    out: list[Measurement] = []
    for decode in (False, True) if ctx.run % 2 == 0 else (True, False):
        group = ctx.fresh_name("consume")
        count, seconds, first = asyncio.run(_aiokafka_read(data, group, decode))
        _check(count, data)
        if decode:
            out.append(
                Measurement(
                    "consume.aiokafka_decode",
                    count / seconds,
                    "events/s",
                    "consume: raw aiokafka + Strata codec decode",
                )
            )
            continue
        out += [
            Measurement(
                "consume.aiokafka",
                count / seconds,
                "events/s",
                "consume: raw aiokafka, no processing",
            ),
            Measurement(
                "consume.aiokafka_startup",
                first,
                "s",
                "consume: raw aiokafka, seconds to the first record",
            ),
        ]
    return out


async def _aiokafka_read(
    data: Dataset, group: str, decode: bool
) -> tuple[int, float, float]:
    codec = Codec()
    began = time.perf_counter()
    consumer = AIOKafkaConsumer(
        data.topic,
        bootstrap_servers=data.settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **WORKER_FETCH,
    )
    await consumer.start()
    try:
        remaining = {p: end for p, end in data.ends.items() if end > 0}
        count = 0
        first = 0.0
        while remaining:
            batches = await consumer.getmany(
                timeout_ms=500, max_records=WORKER_MAX_RECORDS
            )
            if batches and not first:
                first = time.perf_counter() - began
            for tp, records in batches.items():
                count += len(records)
                if decode:
                    for record in records:
                        codec.decode(record.value)
                if records and records[-1].offset + 1 >= remaining.get(tp.partition, 0):
                    remaining.pop(tp.partition, None)
        return count, time.perf_counter() - began, first
    finally:
        await consumer.stop()


@stage(
    "confluent",
    "raw confluent-kafka (librdkafka) consumer reading the topic, doing nothing",
    order=30,
)
def confluent(ctx: Context) -> list[Measurement]:
    """One timed read of the dataset topic with confluent-kafka."""
    try:
        import confluent_kafka
    except ImportError as exc:
        raise Skip(f"confluent-kafka is not installed ({exc})") from exc
    data = ctx.dataset()
    count, seconds, first = _confluent_read(confluent_kafka, data, ctx.fresh_name("ck"))
    _check(count, data)
    return [
        Measurement(
            "consume.confluent",
            count / seconds,
            "events/s",
            "consume: raw confluent-kafka, no processing",
        ),
        Measurement(
            "consume.confluent_startup",
            first,
            "s",
            "consume: raw confluent-kafka, seconds to the first record",
        ),
    ]


def _confluent_read(ck: Any, data: Dataset, group: str) -> tuple[int, float, float]:
    began = time.perf_counter()
    consumer = ck.Consumer(
        {
            "bootstrap.servers": data.settings.kafka_bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([data.topic])
    try:
        remaining = {p: end for p, end in data.ends.items() if end > 0}
        count = 0
        first = 0.0
        while remaining:
            # librdkafka waits for the whole batch or the timeout: never ask for
            # more than is left, or the last batch idles until the timeout.
            wanted = max(1, min(10_000, data.events - count))
            for msg in consumer.consume(num_messages=wanted, timeout=0.5):
                if msg.error():
                    continue
                if not first:
                    first = time.perf_counter() - began
                count += 1
                if msg.offset() + 1 >= remaining.get(msg.partition(), 1 << 62):
                    remaining.pop(msg.partition(), None)
        return count, time.perf_counter() - began, first
    finally:
        consumer.close()


def _check(count: int, data: Dataset) -> None:
    if count != data.events:
        raise RuntimeError(f"read {count} events of {data.events} on {data.topic}")


ratio(
    "consume.aiokafka_vs_confluent",
    "consume.aiokafka",
    "consume.confluent",
    "consume: raw aiokafka / raw confluent-kafka",
)
ratio(
    "consume.decode_vs_aiokafka",
    "consume.aiokafka_decode",
    "consume.aiokafka",
    "consume: (raw aiokafka + decode) / raw aiokafka",
)
