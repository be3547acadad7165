"""Backfill rate against the worker's projection rate, and read latency per tier.

``backfill``: a legacy export of ``--events`` records (one JSON Lines file,
``key``, ``cls``, ``payload``, ``meta.tenant_id``) imported by
:func:`producers.backfill.run_backfill` on a fresh topic prefix and data dir;
its ``records_per_s`` against the in-process worker projecting ``--events``
synthetic events in the same run (issue 6: ratio >= 0.5).

``reads``: a store of ``--events`` records, one event each (the issue's
1,000,000-record store unless ``--events`` scales it down; the label gives
the size),
about half moved to L3 by :class:`producers.tiering.TieringJob` with a clock
400 days ahead; then p50 and p99 of ``Reader.get`` served by L1 (a pre-filled
cache), L2 (no cache) and L3; and write-to-readable: a ``strata worker``
process running while another process (:mod:`bench.w2r_writer`) publishes a
steady 1,000 events/s with ``MemoryProducer.write``, one untimed second to
warm up then 20 s, each write timed until ``Reader.get_after`` returns.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.context import Context
from bench.dataset import CLASSES, publish_dataset, specs
from bench.projection import project
from bench.registry import Measurement, ratio, stage, target
from bench.workerproc import strata_command, worker_env
from consumers.worker import Worker
from producers.backfill import run_backfill
from producers.tiering import TieringJob, wall_clock_ms
from projections.l1 import L1Cache
from projections.reader import Reader
from strata.config import Settings
from strata.keystore import open_keystore
from strata.paths import StorePaths

READS = 2000
RATE = 1000.0
#: Timed seconds of write-to-readable: 20,000 writes, so that the p99 is
#: the 200th slowest, not moved by a single stall of a shared machine.
SECONDS = 20.0
WARMUP_SECONDS = 1.0
FUTURE_MS = 400 * 86_400_000


def _write_export(root: Path, count: int, size: int, tenants: int) -> None:
    root.mkdir(parents=True)
    with (root / "export.jsonl").open("w") as out:
        for i in range(count):
            record = {
                "key": f"legacy/{i:07d}",
                "cls": CLASSES[i % len(CLASSES)],
                "payload": f"{i:08d}" + "x" * max(0, size - 8),
                "meta": {"tenant_id": f"tenant-{i % tenants:03d}"},
            }
            out.write(json.dumps(record) + "\n")


@stage("backfill", "backfill rate of a legacy export vs worker projection", order=45)
def backfill(ctx: Context) -> list[Measurement]:
    """One backfill of ``--events`` records and one projection of as many events."""
    count = ctx.workload.events
    export = ctx.workdir / ctx.fresh_name("export")
    _write_export(export, count, ctx.workload.size, ctx.workload.tenants)
    settings = ctx.settings(ctx.fresh_name("backfill"), ctx.fresh_data_dir("bf"))
    report = asyncio.run(run_backfill(settings, export))
    result = report.to_dict()
    if not report.ok or result["migrated"] != count:
        raise RuntimeError(f"backfill did not import every record: {result}")
    applied, seconds = project(ctx, ctx.dataset(), synchronous="FULL")
    return [
        Measurement(
            "backfill.rate",
            float(result["records_per_s"]),
            "records/s",
            "backfill: run_backfill of a JSONL export (publish, project, verify)",
        ),
        Measurement(
            "backfill.worker",
            applied / seconds,
            "events/s",
            "projection: strata worker (FULL), same run",
        ),
    ]


ratio(
    "backfill.vs_worker",
    "backfill.rate",
    "backfill.worker",
    "backfill rate / worker projection rate",
)
target("backfill.vs_worker", ">=", 0.5)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _time_reads(reader: Reader, keys: list[tuple[str, str]], tier: str) -> list[float]:
    out = []
    for tenant, key in keys:
        began = time.perf_counter()
        memory = reader.get(tenant, key)
        out.append((time.perf_counter() - began) * 1e6)
        if memory.served_by != tier:
            raise RuntimeError(
                f"{tenant}/{key} served by {memory.served_by}, not {tier}"
            )
    return out


async def _write_to_readable(settings: Settings, group: str) -> list[float]:
    # The worker and the writer each run as their own process, as they do
    # in service: in this one they would share the interpreter, and the
    # writer would carry the heap of the store built above. The worker has
    # caught up with the store before it starts.
    errors = settings.data_dir / "w2r-worker.stderr"
    with errors.open("wb") as err:
        child = subprocess.Popen(
            [*strata_command(), "worker", "--group", group],
            env=worker_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.w2r_writer",
            str(RATE),
            str(WARMUP_SECONDS),
            str(SECONDS),
            env=worker_env(settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err_text = await writer.communicate()
    finally:
        child.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(child.wait)
    if writer.returncode != 0:
        raise RuntimeError(
            f"writer exited {writer.returncode}: "
            f"{err_text.decode(errors='replace').strip()[-500:]}"
        )
    if returncode != 0:
        raise RuntimeError(
            f"worker exited {returncode}: "
            f"{errors.read_text(errors='replace').strip()[-500:]}"
        )
    latencies: list[float] = json.loads(out)
    return latencies


@stage("reads", "read latency per tier and write-to-readable latency", order=90)
def reads(ctx: Context) -> list[Measurement]:
    """Build a store, tier half of it to L3, time reads per tier and read-your-write."""
    count = ctx.workload.events
    data_dir = ctx.fresh_data_dir("reads")
    group = ctx.fresh_name("reads-workers")
    records = sorted(
        {(s.tenant, s.key) for s in specs(ctx.workload, count, distinct=True)}
    )
    settings = ctx.settings(
        ctx.fresh_name("reads"), data_dir, tier_max_moves=len(records) // 2
    )
    asyncio.run(publish_dataset(settings, ctx.workload, count, distinct=True))
    keystore = open_keystore(settings)
    asyncio.run(Worker(settings, group=group, until_caught_up=True).run())
    job = TieringJob(settings, clock=lambda: wall_clock_ms() + FUTURE_MS)

    async def tier() -> int:
        report = await job.run()
        await Worker(settings, group=group, until_caught_up=True).run()
        await job.wait_applied(report)
        return report.demoted

    demoted = asyncio.run(tier())
    paths = StorePaths(data_dir)
    plain = Reader.from_paths(paths, keystore, l1=None, track_reads=False)
    by_tier: dict[str, list[tuple[str, str]]] = {"l2": [], "l3": []}
    for tenant, key in records:
        by_tier[plain.get(tenant, key).served_by].append((tenant, key))
    l2_keys, l3_keys = by_tier["l2"][:READS], by_tier["l3"][:READS]
    cached = Reader.from_paths(
        paths,
        keystore,
        l1=L1Cache(settings.l1_max_entries, settings.l1_max_bytes),
        track_reads=False,
    )
    for tenant, key in l2_keys:
        cached.get(tenant, key)
    timed = {
        "l1": _time_reads(cached, l2_keys, "l1"),
        "l2": _time_reads(plain, l2_keys, "l2"),
        "l3": _time_reads(plain, l3_keys, "l3"),
    }
    plain.close()
    cached.close()
    w2r = asyncio.run(_write_to_readable(settings, group))
    ctx.extras.setdefault("reads", []).append(
        {"records": len(records), "l3": len(by_tier["l3"]), "demoted": demoted}
    )
    store = f"store of {len(records)} records, {len(by_tier['l3'])} in L3"
    out = []
    for tier_name, values in timed.items():
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            out.append(
                Measurement(
                    f"reads.{tier_name}_{name}",
                    _pct(values, q),
                    "µs",
                    f"Reader.get {name} served by {tier_name.upper()} "
                    f"({len(values)} reads, {store})",
                    {"records": len(records)},
                )
            )
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        out.append(
            Measurement(
                f"reads.w2r_{name}",
                _pct(w2r, q),
                "ms",
                f"write-to-readable {name} at {RATE:g} events/s for {SECONDS:g}s "
                f"(mean {statistics.fmean(w2r):.1f} ms)",
            )
        )
    return out


target("reads.l1_p99", "<", 50)
target("reads.l2_p99", "<", 1000)
target("reads.l3_p99", "<", 10_000)
target("reads.w2r_p99", "<", 50)
