"""Bounded replays of the memory topic, and the lifecycle record of jobs.

A bounded replay reads partitions from given offsets up to the end offsets it
saw when it started (or up to lower targets), then stops: events that arrive
meanwhile are left to the live workers. It joins no consumer group, so it
never triggers a rebalance of the workers, and it commits nothing: the
caller's handler stores its own checkpoint with its writes, and the next run
starts from those checkpoints. That is what makes a replay resumable.

Jobs (backfills, migrations) record their lifecycle on the jobs topic with a
:class:`JobJournal`: started or resumed, progress, completed or failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from producers.producer import producer_options
from strata.config import Settings
from strata.errors import BrokerError
from strata.kafka import (
    CLOSE_TIMEOUT_S,
    BrokerWatch,
    bootstrap_of,
    bounded_close,
    end_offsets,
    pinned,
    start_client,
    start_reader,
)

log = structlog.get_logger(__name__)

#: A job leaving on an error waits at most this long to journal it.
JOURNAL_TIMEOUT_S = 5.0
#: Any other step of a job waits at most this long for the broker to take it.
RECORD_TIMEOUT_S = 30.0

#: Applies one partition's records, then stores ``next_offset`` as its checkpoint.
BatchHandler = Callable[[int, Sequence[ConsumerRecord], int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ReplayProgress:
    """How far a replay is: offsets done of offsets to do, and the rate."""

    done: int
    total: int
    records: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Records handled per second so far."""
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class ReplayReport:
    """What a replay read, per partition, and how fast."""

    starts: dict[int, int]
    targets: dict[int, int]
    positions: dict[int, int] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0
    complete: bool = False

    @property
    def rate(self) -> float:
        """Records handled per second."""
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "starts": self.starts,
            "targets": self.targets,
            "positions": self.positions,
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.rate, 1),
            "complete": self.complete,
        }


class BoundedReplay:
    """Reads one topic from given offsets up to fixed end offsets, then stops.

    Example::

        replay = BoundedReplay(settings, on_progress=print)
        report = await replay.run(projection.checkpoints(), apply_batch)

    Args:
        settings: where the broker and topic are.
        topic: the topic to read; the memory topic by default.
        max_batch: the most records handed to the handler at once.
        on_progress: called with a :class:`ReplayProgress` at most every
            ``progress_interval_s`` and once at the end.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        max_batch: int = 2000,
        on_progress: Callable[[ReplayProgress], None] | None = None,
        progress_interval_s: float = 0.5,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.memory_topic
        self.max_batch = max_batch
        self._on_progress = on_progress
        self._interval = progress_interval_s
        self._start_timeout_s = start_timeout_s
        self._stop = False
        self._last_progress = 0.0

    def request_stop(self) -> None:
        """Finish the batch in hand and return; the run reports itself incomplete."""
        self._stop = True

    async def run(
        self,
        starts: Mapping[int, int],
        handle: BatchHandler,
        *,
        targets: Mapping[int, int] | None = None,
    ) -> ReplayReport:
        """Replay from ``starts`` (partition to offset; absent means 0).

        Args:
            starts: where each partition begins, usually the caller's checkpoints.
            handle: applies one partition's records and stores ``next_offset``.
            targets: stop each partition here instead of at its end offset;
                partitions absent from it are not read. Targets beyond the
                end offsets seen at start are lowered to them.

        Raises:
            BrokerError: the broker cannot be reached, or the topic has no partitions.
        """
        began = time.monotonic()
        ends = await self._end_offsets()
        goal = {
            p: min(end, targets.get(p, 0)) if targets is not None else end
            for p, end in ends.items()
        }
        first = {p: max(0, starts.get(p, 0)) for p in goal}
        report = ReplayReport(starts=first, targets=goal, positions=dict(first))
        pending = {p for p in goal if first[p] < goal[p]}
        log.info(
            "replay.started",
            topic=self.topic,
            partitions=len(goal),
            offsets_to_read=sum(goal[p] - first[p] for p in pending),
        )
        if pending:
            await self._consume(pending, goal, report, handle, began)
        report.seconds = time.monotonic() - began
        report.complete = all(report.positions[p] >= goal[p] for p in goal)
        self._progress(report, began, force=True)
        log.info(
            "replay.finished",
            topic=self.topic,
            records=report.records,
            seconds=round(report.seconds, 3),
            complete=report.complete,
        )
        return report

    async def _end_offsets(self) -> dict[int, int]:
        offsets = await end_offsets(self.settings, [self.topic])
        ends = {
            tp.partition: off for tp, off in offsets.items() if tp.topic == self.topic
        }
        if not ends:
            raise BrokerError(
                f"topic {self.topic} has no partitions (run `strata topics ensure`)"
            )
        return ends

    async def _consume(
        self,
        pending: set[int],
        goal: dict[int, int],
        report: ReplayReport,
        handle: BatchHandler,
        began: float,
    ) -> None:
        consumer = await start_reader(
            self.settings,
            self._start_timeout_s,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        try:
            tps = {p: TopicPartition(self.topic, p) for p in pending}
            consumer.assign(list(tps.values()))
            for p, tp in tps.items():
                consumer.seek(tp, report.positions[p])
            watch = BrokerWatch(self.settings, f"replaying {self.topic}")
            while pending and not self._stop:
                batches = await consumer.getmany(
                    timeout_ms=500, max_records=self.max_batch
                )
                for tp, records in batches.items():
                    if tp.partition in pending:
                        await self._handle(tp.partition, records, goal, report, handle)
                for p in sorted(pending):
                    if await self._finished(consumer, tps[p], goal[p], report, handle):
                        pending.discard(p)
                        consumer.pause(tps[p])
                self._progress(report, began)
                await watch.progress(sum(report.positions.values()))
        finally:
            await bounded_close(
                consumer.stop(),
                step="close the replay's consumer",
                seconds=CLOSE_TIMEOUT_S,
                consequence="none: its caller records how far the replay got",
            )

    async def _handle(
        self,
        partition: int,
        records: Sequence[ConsumerRecord],
        goal: dict[int, int],
        report: ReplayReport,
        handle: BatchHandler,
    ) -> None:
        wanted = [r for r in records if r.offset < goal[partition]]
        if not wanted:
            return
        next_offset = wanted[-1].offset + 1
        await handle(partition, wanted, next_offset)
        report.positions[partition] = next_offset
        report.records += len(wanted)

    async def _finished(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        goal: int,
        report: ReplayReport,
        handle: BatchHandler,
    ) -> bool:
        done = report.positions[tp.partition]
        if done >= goal:
            return True
        # The consumer may have moved past offsets that hold no record for a
        # reader (transaction markers, compacted records): the partition is
        # done once its position reaches the goal, and the checkpoint moves
        # over the gap so "caught up" comparisons hold.
        position: int = await consumer.position(tp)
        if position < goal:
            return False
        await handle(tp.partition, [], goal)
        report.positions[tp.partition] = goal
        return True

    def _progress(
        self, report: ReplayReport, began: float, *, force: bool = False
    ) -> None:
        if self._on_progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < self._interval:
            return
        self._last_progress = now
        self._on_progress(
            ReplayProgress(
                done=sum(report.positions[p] - report.starts[p] for p in report.starts),
                total=sum(
                    max(0, report.targets[p] - report.starts[p]) for p in report.starts
                ),
                records=report.records,
                elapsed_s=now - began,
            )
        )


class JobJournal:
    """Publishes a job's lifecycle to the jobs topic, one JSON object per step.

    Each message is keyed by the job id and holds ``job_id``, ``kind``,
    ``state`` (``started``, ``resumed``, ``progress``, ``completed``,
    ``failed``), ``time_ms`` and counts. Never payloads.
    """

    def __init__(self, settings: Settings, *, job_id: str, kind: str) -> None:
        self.settings = settings
        self.job_id = job_id
        self.kind = kind
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Connect to the broker.

        Raises:
            BrokerError: the broker cannot be reached.
        """
        self.settings = pinned(self.settings)
        options = producer_options(self.settings)
        self._producer = AIOKafkaProducer(**options)
        await start_client(self._producer, str(options["bootstrap_servers"]), 30.0)

    async def stop(self) -> None:
        """Flush and disconnect."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Every step was acknowledged as it was recorded, or gave up: all a
        # stop may wait for is a step the broker never took.
        await bounded_close(
            self.stop(),
            step="flush the job journal",
            seconds=JOURNAL_TIMEOUT_S,
            consequence="the jobs topic may lack the job's last step",
        )

    async def record(self, state: str, **fields: Any) -> None:
        """Publish one lifecycle step and wait for the broker's acknowledgement.

        Raises:
            BrokerError: no acknowledgement within :data:`RECORD_TIMEOUT_S`.
        """
        if self._producer is None:
            raise RuntimeError("JobJournal.start() was not awaited")
        value = {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": state,
            "time_ms": time.time_ns() // 1_000_000,
            **fields,
        }
        sending = self._producer.send_and_wait(
            self.settings.jobs_topic,
            value=json.dumps(value, sort_keys=True, default=str).encode(),
            key=self.job_id.encode(),
        )
        try:
            await asyncio.wait_for(sending, RECORD_TIMEOUT_S)
        except TimeoutError:
            raise BrokerError(
                f"Kafka broker at {bootstrap_of(self.settings)} did not acknowledge "
                f"the {state!r} step of job {self.job_id} on {self.settings.jobs_topic} "
                f"within {RECORD_TIMEOUT_S:g}s; rerun to resume"
            ) from None
        log.info("job.recorded", job_id=self.job_id, kind=self.kind, state=state)

    async def record_failure(self, error: BaseException) -> None:
        """Record that the job failed with ``error``, which the caller raises.

        A journal that cannot be written then is reported, not raised: the
        job's own error is the one the caller needs.
        """
        try:
            await asyncio.wait_for(
                self.record(
                    "failed", error_class=type(error).__name__, error=str(error)
                ),
                JOURNAL_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - the job's own error matters more
            log.warning(
                "job.failure_not_recorded",
                job_id=self.job_id,
                kind=self.kind,
                error=f"{type(exc).__name__}: {exc}"
                if str(exc)
                else f"no acknowledgement within {JOURNAL_TIMEOUT_S:g}s",
                consequence="the jobs topic shows the job unfinished; a rerun resumes it",
            )
