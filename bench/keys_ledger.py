"""Key rotation rate (issue 4) and ledger verify rate and cost (issue 5).

``rotation``: per run, a fresh prefix and data dir get ``--events`` sealed
events (published before any clock starts) and a worker projects them; then
:class:`consumers.rotation.RotationJob` rotates every tenant and re-encrypts
what L2 holds (timed: records re-encrypted per second), and a worker applies
the MemoryReencrypted events it published (timed: events per second, group
join included).

``ledger``: a worker projects the run's dataset topic on a fresh data dir,
and another without its ledger follower, twice each (ABBA); the ledger's
share of projection throughput is 1 - the rate with it / the rate without,
and its share of CPU likewise from the worker's CPU seconds. Then the
ledger it wrote is verified with :func:`projections.ledger_verify.verify_ledger`,
one process and two.
"""

from __future__ import annotations

import asyncio
import time

from bench.context import Context
from bench.dataset import publish_dataset
from bench.registry import Measurement, stage, target
from consumers.rotation import RotationJob
from consumers.worker import Worker
from projections.ledger_verify import verify_ledger
from strata.config import Settings
from strata.keystore import open_keystore
from strata.paths import StorePaths
from strata.signing import load_public_key


@stage("rotation", "key rotation: records re-encrypted/s, and applying them", order=86)
def rotation(ctx: Context) -> list[Measurement]:
    """One rotation of every tenant over a fresh topic of ``--events`` events."""
    count = ctx.workload.events
    settings = ctx.settings(ctx.fresh_name("rotation"), ctx.fresh_data_dir("rotation"))
    group = ctx.fresh_name("rotation-workers")

    async def run() -> tuple[int, float, int, float]:
        await publish_dataset(settings, ctx.workload, count)
        first = await Worker(settings, group=group, until_caught_up=True).run()
        if first.events_applied != count:
            raise RuntimeError(f"worker applied {first.events_applied} of {count}")
        job = RotationJob(settings, open_keystore(settings), batch_size=2000)
        began = time.perf_counter()
        report = await job.run()
        rotate_s = time.perf_counter() - began
        began = time.perf_counter()
        second = await Worker(settings, group=group, until_caught_up=True).run()
        apply_s = time.perf_counter() - began
        return report.counts.reencrypted, rotate_s, second.events_applied, apply_s

    reencrypted, rotate_s, applied, apply_s = asyncio.run(run())
    if reencrypted == 0:
        raise RuntimeError("the rotation re-encrypted nothing")
    print(
        f"  rotation: {reencrypted} re-encrypted in {rotate_s:.2f}s; "
        f"worker applied {applied} in {apply_s:.2f}s",
        flush=True,
    )
    return [
        Measurement(
            "rotation.reencrypt",
            reencrypted / rotate_s,
            "records/s",
            "rotation: RotationJob records re-encrypted",
        ),
        Measurement(
            "rotation.apply",
            applied / apply_s,
            "events/s",
            "rotation: worker applying MemoryReencrypted (join included)",
        ),
    ]


@stage("ledger", "ledger: verify entries/s (1 and 2 jobs), share of worker", order=87)
def ledger(ctx: Context) -> list[Measurement]:
    """Project the dataset with and without the ledger, then verify the ledger."""
    data = ctx.dataset()

    def project_once(name: str, *, with_ledger: bool) -> tuple[Settings, float, float]:
        """Project the dataset once; return the settings, wall and CPU seconds."""
        settings = ctx.settings(
            data.settings.topic_prefix,
            ctx.fresh_data_dir(name, keys_from=data.settings.data_dir),
        )

        async def run() -> tuple[int, float, float]:
            worker = Worker(settings, group=ctx.fresh_name(name), until_caught_up=True)
            if not with_ledger:
                worker.followers = [f for f in worker.followers if f.name != "ledger"]
            began, cpu = time.perf_counter(), time.process_time()
            report = await worker.run()
            return (
                report.events_applied,
                time.perf_counter() - began,
                time.process_time() - cpu,
            )

        applied, seconds, cpu_s = asyncio.run(run())
        if applied != data.events:
            raise RuntimeError(f"worker applied {applied} of {data.events} events")
        return settings, seconds, cpu_s

    # Two projections of each kind per run, in the order ABBA (BAAB in odd
    # runs): a drift of the shared machine's speed within the run then falls
    # on both kinds alike, and neither always finds the cache the warmer.
    first, second = (True, False) if ctx.run % 2 == 0 else (False, True)
    wall = {True: 0.0, False: 0.0}
    cpu = {True: 0.0, False: 0.0}
    settings = None
    for with_ledger in (first, second, second, first):
        used, seconds, cpu_s = project_once(
            "ledger" if with_ledger else "no-ledger", with_ledger=with_ledger
        )
        wall[with_ledger] += seconds
        cpu[with_ledger] += cpu_s
        if with_ledger:
            settings = used
    assert settings is not None
    rates = {k: 2 * data.events / v for k, v in wall.items()}
    paths = StorePaths(settings.data_dir)
    key = load_public_key(paths.keys)
    out = [
        Measurement(
            "ledger.share",
            1 - rates[True] / rates[False],
            "ratio",
            "ledger cost: 1 - worker rate with the ledger / without it",
        ),
        Measurement(
            "ledger.cpu_share",
            1 - cpu[False] / cpu[True],
            "ratio",
            "ledger cost: its share of the worker's CPU seconds",
        ),
    ]
    for jobs in (1, 2):
        began = time.perf_counter()
        report = verify_ledger(paths.ledger, key, jobs=jobs)
        seconds = time.perf_counter() - began
        if not report.ok or report.entries != data.events:
            raise RuntimeError(
                f"ledger verify (jobs={jobs}): ok={report.ok}, "
                f"{report.entries} of {data.events} entries"
            )
        out.append(
            Measurement(
                f"ledger.verify_j{jobs}",
                report.entries / seconds,
                "entries/s",
                f"ledger verify, jobs={jobs}",
            )
        )
    print(
        f"  ledger: worker {rates[True]:,.0f} events/s with it, "
        f"{rates[False]:,.0f} without; {data.events} entries verified",
        flush=True,
    )
    return out


target("rotation.reencrypt", ">=", 20_000)
target("ledger.verify_j1", ">=", 200_000)
target("ledger.verify_j2", ">=", 200_000)
target("ledger.share", "<", 0.10)
