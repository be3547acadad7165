"""Followers behind L2: reads never wait for them, commits always do."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.base import Envelope, Outcome
from projections.l2 import L2Reader
from strata.config import Settings
from strata.keystore import LocalKeystore
from strata.paths import StorePaths
from tests.helpers import committed_offsets

EVENTS = 300
WAVES = 3


class GatedFollower:
    """A follower projection that applies only while its gate is open, and
    records every offset it is offered past its checkpoint."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.applied: dict[int, list[int]] = {}
        self.calls = 0

    def checkpoint(self, partition: int) -> int:
        offsets = self.applied.get(partition)
        return offsets[-1] + 1 if offsets else 0

    async def apply(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> int:
        await self.gate.wait()
        self.calls += 1
        done = self.checkpoint(partition)
        fresh = [env.offset for env in envelopes if env.offset >= done]
        self.applied.setdefault(partition, []).extend(fresh)
        return len(fresh)

    def digest(self) -> str:
        return ""


async def test_l2_runs_ahead_of_a_stuck_follower_and_commits_wait_for_it(
    topics: Settings, keystore: LocalKeystore
) -> None:
    follower = GatedFollower()
    group = f"{topics.topic_prefix}.gated"
    worker = Worker(topics, group=group)
    worker.followers.append(follower)
    running = asyncio.create_task(worker.run())
    reader = L2Reader(StorePaths(topics.data_dir).l2_db)
    try:
        await asyncio.wait_for(worker.assigned.wait(), 60)
        # Three waves, each its own polls, while the follower is stuck.
        async with MemoryProducer(topics, keystore) as producer:
            for wave in range(WAVES):
                for i in range(wave * EVENTS // WAVES, (wave + 1) * EVENTS // WAVES):
                    await producer.write(f"tenant-{i % 3}", f"key-{i % 40}", b"x" * 64)
                async with asyncio.timeout(60):
                    while sum(reader.checkpoints().values()) < i + 1:
                        await asyncio.sleep(0.02)
        # Everything is readable from L2 while the follower has applied nothing.
        assert follower.applied == {}
        await asyncio.sleep(1.5)  # past the commit interval
        assert set((await committed_offsets(topics, group)).values()) <= {None, 0}

        follower.gate.set()
        async with asyncio.timeout(60):
            while sum(len(o) for o in follower.applied.values()) < EVENTS:
                await asyncio.sleep(0.02)
    finally:
        reader.close()
        follower.gate.set()
        worker.request_stop()
        report = await asyncio.wait_for(running, 60)

    assert report.events_applied == EVENTS
    polls = worker.metrics.registry.get_sample_value(
        "strata_apply_seconds_count", {"projection": "l2"}
    )
    assert polls is not None
    assert polls >= WAVES  # each wave was its own poll at least
    # Every offset once and in order. The polls queued while the follower was
    # stuck reach it merged, one batch per partition: a round for the poll it
    # was stuck on, and one for everything after.
    for offsets in follower.applied.values():
        assert offsets == list(range(len(offsets)))
    assert sum(len(o) for o in follower.applied.values()) == EVENTS
    assert follower.calls <= 2 * topics.partitions
    committed = await committed_offsets(topics, group)
    assert {p: c or 0 for p, c in committed.items()} == {
        p: len(follower.applied.get(p, [])) for p in range(topics.partitions)
    }
