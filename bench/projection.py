"""Projection and rebuild rates of Strata's worker on the dataset topic.

``worker``: :class:`consumers.worker.Worker` in this process with
``until_caught_up=True``, on a fresh data dir (holding only the producer's
keystore) and a fresh group, so it projects from offset 0 to the end into L2,
the ledger and L1 with its durable defaults (``synchronous=FULL``), and again
with ``STRATA_SQLITE_SYNCHRONOUS=NORMAL``.

``rebuild``: what an operator runs to rebuild from scratch, ``strata worker
--until-caught-up`` as a child process on a fresh data dir, timed from spawn
to exit (interpreter start and imports included).
"""

from __future__ import annotations

import asyncio
import time

from bench.context import Context
from bench.dataset import Dataset
from bench.registry import Measurement, ratio, stage, target
from bench.workerproc import run_worker
from consumers.worker import Worker

_VARIANTS = {
    "full": ("FULL", "projection: strata worker (durable, FULL)"),
    "normal": ("NORMAL", "projection: strata worker (sync NORMAL)"),
}


@stage(
    "worker", "strata worker projecting the topic in-process (FULL, NORMAL)", order=40
)
def worker(ctx: Context) -> list[Measurement]:
    """One projection of the dataset topic per variant, alternating which goes first."""
    data = ctx.dataset()
    names = list(_VARIANTS)
    if ctx.run % 2:
        names.reverse()
    out = []
    for name in names:
        synchronous, label = _VARIANTS[name]
        applied, seconds = project(ctx, data, synchronous=synchronous)
        out.append(Measurement(f"worker.{name}", applied / seconds, "events/s", label))
    return out


def project(ctx: Context, data: Dataset, *, synchronous: str) -> tuple[int, float]:
    """Project ``data`` with a fresh in-process worker; return (events, seconds)."""
    settings = ctx.settings(
        data.settings.topic_prefix,
        ctx.fresh_data_dir("worker", keys_from=data.settings.data_dir),
        sqlite_synchronous=synchronous,
    )
    group = ctx.fresh_name("workers")

    async def run() -> tuple[int, float]:
        began = time.perf_counter()
        report = await Worker(settings, group=group, until_caught_up=True).run()
        return report.events_applied, time.perf_counter() - began

    applied, seconds = asyncio.run(run())
    if applied != data.events:
        raise RuntimeError(f"worker applied {applied} of {data.events} events")
    return applied, seconds


@stage(
    "rebuild", "strata worker --until-caught-up as a process, fresh data dir", order=50
)
def rebuild(ctx: Context) -> list[Measurement]:
    """One rebuild of the dataset topic by a worker process."""
    data = ctx.dataset()
    settings = ctx.settings(
        data.settings.topic_prefix,
        ctx.fresh_data_dir("rebuild", keys_from=data.settings.data_dir),
    )
    child = run_worker(settings, group=ctx.fresh_name("rebuild"))
    return [
        Measurement(
            "rebuild.process",
            data.events / child.seconds,
            "events/s",
            "rebuild: strata worker process from offset 0",
        )
    ]


ratio(
    "worker.full_vs_aiokafka",
    "worker.full",
    "consume.aiokafka",
    "projection (FULL) / raw aiokafka consume",
)
ratio(
    "worker.full_vs_decode",
    "worker.full",
    "consume.aiokafka_decode",
    "projection (FULL) / (raw aiokafka consume + decode)",
)
ratio(
    "worker.normal_vs_aiokafka",
    "worker.normal",
    "consume.aiokafka",
    "projection (NORMAL) / raw aiokafka consume",
)
ratio(
    "worker.full_vs_confluent",
    "worker.full",
    "consume.confluent",
    "projection (FULL) / raw confluent-kafka consume",
)
ratio(
    "rebuild.process_vs_aiokafka",
    "rebuild.process",
    "consume.aiokafka",
    "rebuild process / raw aiokafka consume",
)
target("worker.full_vs_aiokafka", ">=", 0.7)
