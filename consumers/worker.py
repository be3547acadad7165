"""The projection worker: a consumer group member that applies the memory topic.

For each poll the worker decodes and validates every message (dead-lettering
what it cannot apply), applies the rest to L2 in one transaction for all the
partitions polled, then to the followers (ledger, L3) and to L1. Each durable projection moves its own checkpoint
atomically with its writes, so Kafka's committed offsets are only a
convenience: on every assignment the worker seeks to the lowest checkpoint of
its projections and each projection skips what it already holds.

A store that cannot be written blocks the batch: the worker retries with
capped, jittered backoff, does not commit, says so in its log and metrics,
and carries on when the fault clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
import tenacity
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from consumers.dlq import dead_lettered_positions, send_dead_letter
from consumers.validation import decode_and_validate
from projections.base import Envelope, FollowerProjection, Outcome
from projections.l1 import L1Cache
from projections.l2 import L2Projection, StoredRecord
from projections.ledger import LedgerProjection
from projections.registry import build_followers
from schemas.codec import Codec
from schemas.events import MemoryDeleted, MemoryWritten, TenantErased
from strata.config import Settings
from strata.errors import ApplyError, CodecError, StoreError, StrataError
from strata.kafka import (
    CLOSE_TIMEOUT_S,
    bootstrap_of,
    bounded_close,
    cluster_id,
    existing_end_offsets,
    start_client,
)
from strata.keystore import Keyring, open_keystore
from strata.metrics import WorkerMetrics
from strata.paths import StorePaths, store_id

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Kafka offsets are committed at most this often while running (and always
#: on revoke and stop). They are a convenience: the projections' checkpoints
#: say where to resume, so committing after every poll would only add a
#: round trip to each.
COMMIT_INTERVAL_S = 1.0
#: How often L2's write-ahead log is copied into its database in the background.
WAL_CHECKPOINT_INTERVAL_S = 1.0
#: Follower rounds start at most this often. Under load a round takes longer
#: than this anyway; at a trickle, waiting lets a round carry many polls
#: instead of paying every follower's syncs for each one. Reads wait on L2
#: alone, so this delays commits, never readability.
FOLLOWER_INTERVAL_S = 0.05
#: How often, at most, a worker looks for idle partitions whose last ledger
#: entries are due a signature (a quarter of the signing interval if shorter).
SIGN_IDLE_CHECK_S = 5.0


@dataclass(eq=False)
class _Batch:
    """One partition's share of a poll, as it moves through the projections."""

    tp: TopicPartition
    messages: Sequence[ConsumerRecord]
    envelopes: list[Envelope]
    next_offset: int
    #: When its poll began to be applied (``time.perf_counter``).
    started: float
    outcomes: list[Outcome | None] = field(default_factory=list)
    #: Entries each follower made.
    used: dict[str, int] = field(default_factory=dict)

    def extend(self, later: _Batch) -> None:
        """Append the next poll's records of the same partition."""
        self.messages = [*self.messages, *later.messages]
        self.envelopes += later.envelopes
        self.outcomes += later.outcomes
        self.next_offset = later.next_offset


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    events_seen: int = 0
    events_applied: int = 0
    dead_letters: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        elapsed = time.monotonic() - self.started
        return {
            "events_seen": self.events_seen,
            "events_applied": self.events_applied,
            "dead_letters": self.dead_letters,
            "batches": self.batches,
            "seconds": round(elapsed, 3),
        }


class Worker:
    """Projects the memory topic into L1, L2 and the ledger."""

    def __init__(
        self,
        settings: Settings,
        *,
        group: str | None = None,
        keystore: Keyring | None = None,
        l1: L1Cache | None = None,
        until_caught_up: bool = False,
        max_batch: int = 2000,
        metrics: WorkerMetrics | None = None,
        dead_letters: bool = True,
    ) -> None:
        self.settings = settings
        self.group = group or f"{settings.topic_prefix}.workers"
        self.paths = StorePaths(settings.data_dir)
        self.keystore = keystore or open_keystore(settings)
        self.l1 = (
            l1
            if l1 is not None
            else L1Cache(settings.l1_max_entries, settings.l1_max_bytes)
        )
        self.until_caught_up = until_caught_up
        self.max_batch = max_batch
        self.metrics = metrics or WorkerMetrics()
        self.report = WorkerReport()
        self.codec = Codec()
        self.blocked: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._uncommitted: set[TopicPartition] = set()
        self._following: asyncio.Future[None] | None = None
        #: Applied to L2, waiting for the followers: one batch per partition.
        self._queued: dict[TopicPartition, _Batch] = {}
        self._queued_events = 0
        self._round_at = 0.0
        #: Set while something waits for the queue to empty: no round waits.
        self._hurry = asyncio.Event()
        #: Set when a round takes the queue.
        self._taken = asyncio.Event()
        self._committed_at = time.monotonic()
        self._cluster = ""
        self._owned: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self.l2: L2Projection | None = None
        self.followers = build_followers(self.paths, settings)
        self.assigned = asyncio.Event()
        self.dead_letters_enabled = dead_letters
        #: (partition, offset) of every memory-topic message on the
        #: dead-letter topic, replayed or not: skipped whenever read again.
        self._dead_lettered: set[tuple[int, int]] = set()
        self._dead_letters_read_at_start = False
        #: This data dir's store identity, read at start.
        self._store = ""
        self._state_file = self.paths.workers / f"{os.getpid()}-{id(self):x}.json"
        self._state_written = 0.0

    def request_stop(self) -> None:
        """Ask the worker to finish its batch, commit and leave the group."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> WorkerReport:
        """Consume and project until stopped (or caught up, if asked).

        Raises:
            BrokerError: the broker cannot be reached at start.
            StoreError: a store cannot be opened at start, the keystore is
                damaged or lost, or the ledger signing key is lost.
            ConfigError: the data dir was built from another topic or cluster.
        """
        bootstrap = bootstrap_of(self.settings)
        topic = self.settings.memory_topic
        self.keystore.check()
        for follower in self.followers:
            if isinstance(follower, LedgerProjection):
                follower.check_signer()
        ends = await existing_end_offsets(self.settings, topic)
        targets = (
            {tp.partition: off for tp, off in ends.items()}
            if self.until_caught_up
            else {}
        )
        self.l2 = L2Projection(
            self.paths.l2_db, synchronous=self.settings.sqlite_synchronous
        )
        try:
            self._cluster = await cluster_id(self.settings)
            self.l2.bind_source(
                topic, self._cluster, {tp.partition: end for tp, end in ends.items()}
            )
            # Kept twice, in its file and with L2, so a lost file is restored
            # rather than replaced by a new identity that would disown the
            # store's dead-letter decisions.
            self._store = store_id(self.paths, adopt=self.l2.recorded_store())
            self.l2.bind_store(self._store)
            self._dead_lettered = await dead_lettered_positions(
                self.settings, self._store
            )
        except StrataError:
            self.l2.close()
            raise
        self._dead_letters_read_at_start = True
        self._dlq = AIOKafkaProducer(
            bootstrap_servers=bootstrap, enable_idempotence=True, acks="all"
        )
        await start_client(self._dlq, bootstrap, 30.0)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_interval_ms=600_000,
            session_timeout_ms=self.settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=1_000,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._consumer.subscribe([topic], listener=_Rebalance(self))
        loop = asyncio.get_running_loop()
        background = [
            loop.create_task(self._checkpoint_wal_forever(), name="worker:l2-wal"),
            loop.create_task(self._sign_idle_forever(), name="worker:sign-idle"),
        ]
        try:
            await start_client(self._consumer, bootstrap, 30.0)
            log.info(
                "worker.started", group=self.group, topic=topic, bootstrap=bootstrap
            )
            await self._loop(targets)
        finally:
            for task in background:
                task.cancel()
            ended = await asyncio.gather(*background, return_exceptions=True)
            for task, result in zip(background, ended, strict=True):
                if isinstance(result, Exception):
                    log.error(
                        "worker.background_task_failed",
                        task=task.get_name(),
                        error=str(result) or type(result).__name__,
                    )
            await self._shutdown()
        return self.report

    async def _shutdown(self) -> None:
        try:
            await self._drain_followers()
            # What the worker appended is signed before it goes, so a ledger
            # left alone has a signed head over every entry.
            await self._sign_owned("sign_now")
        finally:
            await self._close_clients()

    async def _close_clients(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # Revoke is not called on stop(): commit what is done first.
            await self._commit(consumer, set(self._owned))  # bounded itself
            await self._bounded("leave the group", consumer.stop())
        dlq, self._dlq = self._dlq, None
        if dlq is not None:
            await self._bounded("close the dead-letter producer", dlq.stop())
        if self.l2 is not None:
            self.l2.close()
        for follower in self.followers:
            close = getattr(follower, "close", None)
            if close is not None:
                close()
        self._remove_state()
        log.info("worker.stopped", **self.report.to_dict())

    @staticmethod
    async def _bounded(step: str, work: Coroutine[Any, Any, None]) -> None:
        await bounded_close(
            work,
            step=step,
            seconds=CLOSE_TIMEOUT_S,
            consequence="the next start resumes from the projection checkpoints",
        )

    async def _loop(self, targets: dict[int, int]) -> None:
        assert self._consumer is not None
        while not self.stopping:
            self._follow_l2_pointer()
            if targets:
                assert self.l2 is not None
                if all(self.l2.checkpoint(p) >= end for p, end in targets.items()):
                    await self._drain_followers()
                if self._caught_up(targets):
                    log.info("worker.caught_up", partitions=len(targets))
                    return
            self._raise_follower_failure()
            stop_wait = asyncio.ensure_future(self._stop.wait())
            fetch = asyncio.ensure_future(
                self._consumer.getmany(timeout_ms=500, max_records=self.max_batch)
            )
            self._write_state()
            done, _ = await asyncio.wait(
                {stop_wait, fetch}, return_when=asyncio.FIRST_COMPLETED
            )
            stop_wait.cancel()
            if fetch not in done:
                fetch.cancel()
                return
            batches = fetch.result()
            if not batches:
                continue
            async with self._lock:
                if self._follow_l2_pointer():
                    # This fetch began at the old version's positions.
                    await self._drain_followers()
                    continue
                await self._process(
                    [(tp, m) for tp, m in batches.items() if tp in self._owned and m]
                )
            self._uncommitted |= set(batches)
            if time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
                await self._commit(self._consumer, self._uncommitted & self._owned)

    async def _checkpoint_wal_forever(self) -> None:
        """Keep L2's write-ahead log short from a thread, so commits never
        stall on copying it into the database."""
        while True:
            await asyncio.sleep(WAL_CHECKPOINT_INTERVAL_S)
            l2 = self.l2
            if l2 is None:
                continue
            try:
                await asyncio.to_thread(l2.checkpoint_wal)
            except StoreError as exc:
                log.warning(
                    "worker.wal_checkpoint_failed",
                    error=str(exc),
                    consequence="the WAL grows until a checkpoint succeeds; "
                    "past its bound the writer checkpoints inside a commit",
                )

    async def _sign_idle_forever(self) -> None:
        """Sign the entries of partitions that stopped receiving events once
        they have waited the ledger's interval: appends alone sign only when
        a later event arrives."""
        interval_s = self.settings.ledger_checkpoint_interval_ms / 1000
        while True:
            await asyncio.sleep(min(interval_s / 4, SIGN_IDLE_CHECK_S))
            await self._sign_owned("sign_due")

    async def _sign_owned(self, method: str) -> None:
        """Call a follower's signing ``method`` (``sign_now`` or ``sign_due``)
        for every partition this worker owns, holding the batch lock so a
        partition being revoked is not written meanwhile."""
        async with self._lock:
            partitions = sorted(tp.partition for tp in self._owned)
            for follower in self.followers:
                sign = getattr(follower, method, None)
                if sign is None:
                    continue
                for partition in partitions:
                    try:
                        await asyncio.to_thread(sign, partition)
                    except StrataError as exc:
                        log.warning(
                            "worker.sign_failed",
                            projection=follower.name,
                            partition=partition,
                            error=str(exc),
                            consequence="its last entries stay unsigned until "
                            "a later append or attempt signs them",
                        )

    def _follow_l2_pointer(self) -> bool:
        """Switch to the L2 version ``l2/CURRENT`` names; True when it changed.

        A shadow migration's cutover replaces the pointer; the worker then
        writes the new version and seeks to its checkpoints.
        """
        current = self.paths.l2_db
        if self.l2 is None or current == self.l2.path:
            return False
        old = self.l2
        self.l2 = L2Projection(current, synchronous=self.settings.sqlite_synchronous)
        self.l2.bind_source(self.settings.memory_topic, self._cluster, None)
        old.close()
        assert self._consumer is not None
        for tp in self._owned:
            start = self._checkpoint(tp.partition)
            self._consumer.seek(tp, start)
            self._positions[tp] = start
        log.info("worker.l2_switched", path=str(current))
        return True

    def _caught_up(self, targets: dict[int, int]) -> bool:
        assert self.l2 is not None
        return all(self._checkpoint(p) >= end for p, end in targets.items())

    def _checkpoint(self, partition: int) -> int:
        assert self.l2 is not None
        return min(
            [self.l2.checkpoint(partition)]
            + [f.checkpoint(partition) for f in self.followers]
        )

    async def _commit(
        self, consumer: AIOKafkaConsumer, tps: set[TopicPartition]
    ) -> None:
        self._committed_at = time.monotonic()
        self._uncommitted -= tps
        offsets = {tp: self._positions[tp] for tp in tps if tp in self._positions}
        if not offsets:
            return
        try:
            # Bounded: aiokafka retries a commit until a coordinator answers,
            # and a revoke waits on it while holding the batch lock.
            await asyncio.wait_for(consumer.commit(offsets), CLOSE_TIMEOUT_S)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            # The projections' own checkpoints are the truth; a lost commit only
            # means the next owner seeks from those.
            log.warning(
                "worker.commit_failed",
                error=str(exc) or f"no answer within {CLOSE_TIMEOUT_S:g}s",
                consequence="next owner resumes from the projection checkpoints",
            )

    # -- one batch -----------------------------------------------------------

    async def _process(
        self, polled: Sequence[tuple[TopicPartition, Sequence[ConsumerRecord]]]
    ) -> None:
        """Apply one poll to L2, every partition in one transaction, and queue
        it for the followers.

        L2 goes first and alone because readers wait on its checkpoint: a
        write is readable after one sync, whatever the followers cost. The
        followers work through the queue in rounds, each partition of each
        follower concurrently, while the worker keeps polling and applying to
        L2; a round takes everything queued, so a follower's fixed cost per
        batch (its syncs) is paid once for all the polls that arrived during
        the round before. Positions move, and commits cover records, only
        once every follower has them; a revoke and a stop wait for the queue
        to empty. Memory stays bounded: once a poll's worth (``max_batch``)
        is queued, the worker waits for a round to take it before polling
        again.
        """
        if not polled:
            return
        started = time.perf_counter()
        batches: list[_Batch] = []
        for tp, messages in polled:
            envelopes = await self._decode(tp, messages)
            batches.append(
                _Batch(tp, messages, envelopes, messages[-1].offset + 1, started)
            )
        assert self.l2 is not None
        l2 = self.l2

        async def apply_l2() -> list[list[Outcome | None]]:
            return l2.apply_many(
                [(b.tp.partition, b.envelopes, b.next_offset) for b in batches]
            )

        began = time.perf_counter()
        outcomes = await self._retrying("l2", apply_l2)
        self.metrics.apply_latency.labels("l2").observe(time.perf_counter() - began)
        for batch, batch_outcomes in zip(batches, outcomes, strict=True):
            batch.outcomes = batch_outcomes
            queued = self._queued.get(batch.tp)
            if queued is None:
                self._queued[batch.tp] = batch
            else:
                queued.extend(batch)
            self._queued_events += len(batch.messages)
        if self._following is None or self._following.done():
            self._raise_follower_failure()
            self._following = asyncio.ensure_future(self._follow_queued())
        if self._queued_events >= self.max_batch:
            self._taken.clear()
            taken: asyncio.Future[Any] = asyncio.ensure_future(self._taken.wait())
            following: asyncio.Future[Any] = self._following
            await asyncio.wait({taken, following}, return_when=asyncio.FIRST_COMPLETED)
            taken.cancel()
            self._raise_follower_failure()

    async def _follow_queued(self) -> None:
        """Run the followers over the queue, a round at a time, until it is empty."""
        while self._queued:
            wait = self._round_at + FOLLOWER_INTERVAL_S - time.monotonic()
            if wait > 0 and self._queued_events < self.max_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), wait)
            self._round_at = time.monotonic()
            batches = list(self._queued.values())
            self._queued.clear()
            self._queued_events = 0
            self._taken.set()
            results = await asyncio.gather(
                *(
                    self._follow(follower, batch)
                    for follower in self.followers
                    for batch in batches
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            for batch in batches:
                self._finish(batch)

    async def _drain_followers(self, *, raise_failure: bool = True) -> None:
        """Wait for the followers to empty the queue and raise what stopped
        them, or, with ``raise_failure`` False, leave it for the loop to raise."""
        following = self._following
        if following is None:
            return
        self._hurry.set()
        try:
            await asyncio.wait({following})
        finally:
            self._hurry.clear()
        if following.cancelled() or following.exception() is None:
            self._following = None
        elif raise_failure:
            self._following = None
            following.result()

    def _raise_follower_failure(self) -> None:
        if self._following is not None and self._following.done():
            following, self._following = self._following, None
            following.result()

    async def _follow(self, follower: FollowerProjection, batch: _Batch) -> None:
        async def attempt() -> int:
            return await follower.apply(
                batch.tp.partition, batch.envelopes, batch.outcomes, batch.next_offset
            )

        began = time.perf_counter()
        batch.used[follower.name] = await self._retrying(follower.name, attempt)
        self.metrics.apply_latency.labels(follower.name).observe(
            time.perf_counter() - began
        )

    def _finish(self, batch: _Batch) -> None:
        tp, partition, outcomes = batch.tp, batch.tp.partition, batch.outcomes
        self._update_l1(batch.envelopes, outcomes)
        self._positions[tp] = batch.next_offset
        highwater = self._consumer.highwater(tp) if self._consumer else None
        if highwater is not None:
            self.metrics.lag.labels(str(partition)).set(
                max(0, highwater - batch.next_offset)
            )
        applied = sum(1 for o in outcomes if o is not None)
        self.report.events_seen += len(batch.messages)
        self.report.events_applied += applied
        self.report.batches += 1
        self.metrics.events_applied.labels("l2", str(partition)).inc(applied)
        for name, count in batch.used.items():
            self.metrics.events_applied.labels(name, str(partition)).inc(count)
        self.metrics.batch_latency.observe(time.perf_counter() - batch.started)
        log.debug(
            "worker.batch_applied",
            topic=tp.topic,
            partition=partition,
            first_offset=batch.messages[0].offset,
            next_offset=batch.next_offset,
            applied=applied,
        )

    async def _decode(
        self, tp: TopicPartition, messages: Sequence[ConsumerRecord]
    ) -> list[Envelope]:
        envelopes: list[Envelope] = []
        known_keys: dict[tuple[str, str, int], bool] = {}
        assert self._consumer is not None
        count = len(self._consumer.partitions_for_topic(tp.topic) or ())
        where = (tp.partition, count) if count else None
        dead = self._dead_lettered
        for msg in messages:
            if dead and (tp.partition, msg.offset) in dead:
                # Decided when it was first read, whatever it would be now.
                self._skip_dead_lettered(tp, msg.offset)
                continue
            try:
                event = decode_and_validate(
                    self.codec,
                    msg.value,
                    msg.key,
                    self.settings,
                    self.keystore,
                    known_keys,
                    where,
                )
            except (CodecError, ApplyError) as exc:
                await self._dead_letter(tp, msg, exc)
                continue
            value: bytes = msg.value
            envelopes.append(
                Envelope(
                    tp.partition,
                    msg.offset,
                    event,
                    hashlib.sha256(value).digest(),
                    len(value),
                )
            )
        return envelopes

    def _skip_dead_lettered(self, tp: TopicPartition, offset: int) -> None:
        self.report.dead_letters += 1
        log.info(
            "worker.dead_lettered_before",
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            consequence="skipped: it is on the dead-letter topic, replayed or not",
        )

    async def _dead_letter(
        self, tp: TopicPartition, msg: ConsumerRecord, error: StrataError
    ) -> None:
        assert self._dlq is not None
        self._dead_lettered.add((tp.partition, msg.offset))
        self.report.dead_letters += 1
        if not self.dead_letters_enabled:
            # A rebuild meets the poison the live worker already dead-lettered.
            log.info(
                "worker.poison_skipped",
                topic=tp.topic,
                partition=tp.partition,
                offset=msg.offset,
                error_class=type(error).__name__,
            )
            return
        await send_dead_letter(
            self._dlq,
            self.settings,
            topic=tp.topic,
            partition=tp.partition,
            offset=msg.offset,
            key=msg.key,
            value=msg.value,
            headers=list(msg.headers or ()),
            error=error,
            store=self._store,
        )
        self.metrics.dead_letters.labels(type(error).__name__).inc()
        log.warning(
            "worker.dead_lettered",
            topic=tp.topic,
            partition=tp.partition,
            offset=msg.offset,
            error_class=type(error).__name__,
            error=str(error),
        )

    def _update_l1(
        self, envelopes: Sequence[Envelope], outcomes: Sequence[Outcome | None]
    ) -> None:
        for env, outcome in zip(envelopes, outcomes, strict=True):
            event = env.event
            if outcome is None or outcome.action == "rejected":
                continue
            if isinstance(event, TenantErased):
                self.l1.discard_tenant(event.tenant)
            elif isinstance(event, MemoryDeleted) or outcome.action in {
                "reencrypted",
                "tiered",
            }:
                self.l1.discard(event.tenant, event.key)
            elif isinstance(event, MemoryWritten):
                # Positional: once per projected write, and keywords cost
                # twice as much.
                self.l1.put(
                    StoredRecord(
                        event.tenant,
                        event.key,
                        outcome.version,
                        False,
                        event.cls,
                        event.time_ms,
                        env.partition,
                        env.offset,
                        "l2",
                        event.event_id,
                        event.agent,
                        event.key_id,
                        event.key_version,
                        event.nonce,
                        event.ciphertext,
                        event.content_hash,
                        event.metadata,
                    )
                )

    async def _retrying(
        self, projection: str, attempt: Callable[[], Coroutine[Any, Any, T]]
    ) -> T:
        """Run a store write until it succeeds or the worker is asked to stop."""
        if projection not in self.blocked:
            # Most writes succeed at once; the retry machinery costs more than
            # a small batch, so it starts only after a first failure.
            try:
                return await attempt()
            except StoreError as exc:
                log.info(
                    "worker.store_write_failed",
                    projection=projection,
                    error=str(exc),
                    consequence="retrying with backoff",
                )

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self.blocked[projection] = str(error)
            self._write_state(force=True)
            self.metrics.blocked.labels(projection).set(1)
            self.metrics.store_retries.labels(projection).inc()
            self.metrics.blocked_seconds.labels(projection).inc(state.upcoming_sleep)
            log.warning(
                "worker.store_blocked",
                projection=projection,
                attempt=state.attempt_number,
                error=str(error),
                consequence="no commits until the store can be written again",
            )

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StoreError),
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=5.0),
            stop=lambda _state: self.stopping,
            before_sleep=before_sleep,
            reraise=True,
        )
        result: T = await retrying(attempt)
        if projection in self.blocked:
            del self.blocked[projection]
            self._write_state(force=True)
            self.metrics.blocked.labels(projection).set(0)
            log.info("worker.store_unblocked", projection=projection)
        return result

    # -- state for `strata status` ---------------------------------------------

    def state(self) -> dict[str, Any]:
        """What this worker is doing, as `strata status` shows it."""
        return {
            "pid": os.getpid(),
            "group": self.group,
            "partitions": sorted(tp.partition for tp in self._owned),
            "blocked": dict(self.blocked),
            "events_applied": self.report.events_applied,
            "dead_letters": self.report.dead_letters,
            "updated_ms": time.time_ns() // 1_000_000,
        }

    def _write_state(self, *, force: bool = False) -> None:
        """Refresh the state file, at most once a second unless forced.

        Failing to write it is reported and otherwise ignored: it is a view
        for operators, and a full disk must not stop projection on its account.
        """
        now = time.monotonic()
        if not force and now - self._state_written < 1.0:
            return
        self._state_written = now
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state()))
            os.replace(tmp, self._state_file)
        except OSError as exc:
            log.warning(
                "worker.state_unwritable",
                path=str(self._state_file),
                error=str(exc),
                consequence="`strata status` shows stale worker state",
            )

    def _remove_state(self) -> None:
        try:
            self._state_file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning(
                "worker.state_not_removed", path=str(self._state_file), error=str(exc)
            )

    # -- rebalances ----------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            # Inside a rebalance callback an error would only be logged: a
            # failure stays for the loop to raise. Positions move only when
            # the followers succeed, so the commit below covers nothing they
            # did not finish.
            await self._drain_followers(raise_failure=False)
            self._owned -= revoked
            if self._consumer is not None:
                await self._commit(self._consumer, revoked)
        log.info(
            "worker.partitions_revoked",
            partitions=sorted(tp.partition for tp in revoked),
        )

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.l2 is not None
        consumer = self._consumer
        if consumer is None:
            return  # stopped before the assignment came
        if self._dead_letters_read_at_start:
            # The first assignment follows the read at start.
            self._dead_letters_read_at_start = False
        elif assigned - self._owned:
            # Another worker may have dead-lettered in these partitions
            # since this one read the dead-letter topic.
            try:
                self._dead_lettered |= await dead_lettered_positions(
                    self.settings, self._store
                )
            except StrataError as exc:
                log.warning(
                    "worker.dead_letters_unread",
                    error=str(exc),
                    consequence="a message dead-lettered by another worker and "
                    "not yet checkpointed is validated again",
                )
            stopped = self._consumer is not consumer
            if stopped:
                return  # the worker stopped while the topic was read
        for tp in assigned:
            start = self._checkpoint(tp.partition)
            consumer.seek(tp, start)
            self._positions[tp] = start
            log.info(
                "worker.partition_assigned",
                topic=tp.topic,
                partition=tp.partition,
                offset=start,
            )
        self._owned |= assigned
        self.assigned.set()
        self._write_state(force=True)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._worker._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._worker._on_assigned(set(assigned))
