"""What one event costs in each step of the worker, without a broker.

The same steps the worker runs for a batch of one partition (decode and
validate, L2, each follower projection, L1), driven directly on batches of
sealed events, each step timed on its own. The sum is what the steps cost
per event run one after another, before any Kafka work. The worker can do a
little better than its inverse: steps that run in a thread (the ledger's
appends and fsyncs) release the interpreter to the others. A diagnostic, not
a comparison: it calls the worker's internal steps, and says so when they
change shape.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from aiokafka.structs import ConsumerRecord, TopicPartition

from bench.context import Context
from bench.dataset import keystore_of, sealed_messages, specs
from bench.registry import Measurement, Skip, stage
from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.l2 import L2Projection

BATCH = 500
MAX_EVENTS = 20_000


@stage(
    "components",
    "per-event cost of each worker step (decode, L2, followers, L1), no broker",
    order=80,
)
def components(ctx: Context) -> list[Measurement]:
    """One pass of every step over up to 20,000 events in batches of 500."""
    count = min(ctx.workload.events, MAX_EVENTS)
    data_dir = ctx.fresh_data_dir("components")
    settings = ctx.settings(ctx.fresh_name("components"), data_dir)
    sealer = MemoryProducer(settings, keystore_of(settings))
    records = [
        ConsumerRecord("bench", 0, n, 0, 0, key, value, None, len(key), len(value), ())
        for n, (key, value) in enumerate(
            sealed_messages(sealer, specs(ctx.workload, count, seed=ctx.run + 7))
        )
    ]
    spent = asyncio.run(_steps(Worker(settings), records))
    workload = {"events": count}
    out = [
        Measurement(
            f"components.{step}",
            seconds * 1e6 / count,
            "us/event",
            f"worker step: {step}",
            workload,
        )
        for step, seconds in spent.items()
    ]
    total = sum(spent.values())
    out.append(
        Measurement(
            "components.sequential",
            count / total,
            "events/s",
            "worker steps in sequence, no Kafka",
            workload,
        )
    )
    return out


async def _steps(worker: Worker, records: list[ConsumerRecord]) -> dict[str, float]:
    spent: dict[str, float] = defaultdict(float)
    tp = TopicPartition("bench", 0)
    # No broker here: the one metadata question decoding asks is answered
    # by the records themselves (they all come from one partition).
    worker._consumer = _OnePartition()  # type: ignore[assignment]
    try:
        worker.l2 = L2Projection(
            worker.paths.l2_db, synchronous=worker.settings.sqlite_synchronous
        )
        try:
            for first in range(0, len(records), BATCH):
                batch = records[first : first + BATCH]
                next_offset = batch[-1].offset + 1
                began = time.perf_counter()
                envelopes = await worker._decode(tp, batch)
                spent["decode+validate"] += _lap(began)
                began = time.perf_counter()
                outcomes = worker.l2.apply(0, envelopes, next_offset)
                spent["l2"] += _lap(began)
                for follower in worker.followers:
                    began = time.perf_counter()
                    await follower.apply(0, envelopes, outcomes, next_offset)
                    spent[follower.name] += _lap(began)
                began = time.perf_counter()
                worker._update_l1(envelopes, outcomes)
                spent["l1"] += _lap(began)
        finally:
            worker.l2.close()
    except (AttributeError, TypeError) as exc:
        raise Skip(f"the worker's steps changed shape: {exc}") from exc
    return dict(spent)


class _OnePartition:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}


def _lap(began: float) -> float:
    return time.perf_counter() - began
