"""Bounded replays: fixed end offsets, progress and rate, resume from checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import ConsumerRecord

from consumers.replay import BoundedReplay, ReplayProgress
from producers.producer import MemoryProducer
from strata.config import Settings
from strata.kafka import end_offsets
from strata.keystore import LocalKeystore


class Recorder:
    """A handler that keeps what it saw and a checkpoint per partition."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.checkpoints: dict[int, int] = {}
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(
        self, partition: int, records: Sequence[ConsumerRecord], next_offset: int
    ) -> None:
        self.seen += [(partition, r.offset) for r in records]
        self.checkpoints[partition] = next_offset
        self.started.set()
        await self.release.wait()


async def _publish(
    settings: Settings, keystore: LocalKeystore, count: int, tag: str
) -> None:
    async with MemoryProducer(settings, keystore) as producer:
        pending = [
            await producer.publish(producer.seal_write("acme", f"{tag}/{i}", f"v{i}"))
            for i in range(count)
        ]
        await asyncio.gather(*pending)


async def _ends(settings: Settings) -> dict[int, int]:
    return {
        tp.partition: off
        for tp, off in (await end_offsets(settings, [settings.memory_topic])).items()
    }


async def test_replay_stops_at_the_end_offsets_seen_at_start(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Writes that arrive during the replay are left to the live workers."""
    await _publish(topics, keystore, 120, "before")
    ends = await _ends(topics)
    progress: list[ReplayProgress] = []
    handler = Recorder()
    handler.release.clear()  # hold the replay inside its first batch
    replay = BoundedReplay(
        topics, max_batch=10, on_progress=progress.append, progress_interval_s=0.0
    )
    run = asyncio.create_task(replay.run({}, handler))
    await handler.started.wait()  # the end offsets are fixed by now
    await _publish(topics, keystore, 40, "during")
    handler.release.set()
    report = await run

    assert report.complete
    assert report.targets == ends
    assert report.positions == ends
    assert handler.checkpoints == {p: off for p, off in ends.items() if off}
    assert sorted(handler.seen) == sorted(
        (p, o) for p, end in ends.items() for o in range(end)
    )
    assert report.records == 120
    assert sum((await _ends(topics)).values()) == 160
    assert progress[-1].done == progress[-1].total == 120
    assert progress[-1].rate > 0
    assert [p.done for p in progress] == sorted(p.done for p in progress)


async def test_stopped_replay_resumes_from_checkpoints_without_repeats(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """A replay stopped early and run again from its checkpoints sees each
    offset exactly once; lower targets stop it early on purpose."""
    await _publish(topics, keystore, 90, "k")
    ends = await _ends(topics)
    handler = Recorder()

    first = BoundedReplay(topics, max_batch=5)

    async def stop_soon(
        partition: int, records: Sequence[ConsumerRecord], next_offset: int
    ) -> None:
        await handler(partition, records, next_offset)
        first.request_stop()

    stopped = await first.run({}, stop_soon)
    assert not stopped.complete
    assert 0 < len(handler.seen) < 90

    halfway = {p: off // 2 for p, off in ends.items()}
    partial = await BoundedReplay(topics).run(
        handler.checkpoints, handler, targets=halfway
    )
    assert partial.complete
    assert all(handler.checkpoints.get(p, 0) >= halfway[p] for p in ends)

    final = await BoundedReplay(topics).run(handler.checkpoints, handler)
    assert final.complete
    assert len(handler.seen) == len(set(handler.seen)) == 90
    assert handler.checkpoints == {p: off for p, off in ends.items() if off}
