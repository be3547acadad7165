"""Kafka plumbing shared by producers, workers and commands.

Client settings are chosen deliberately rather than left to aiokafka's
defaults (auto commit on, ``latest`` reset, ``read_uncommitted``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from strata.broker import recorded_bootstrap
from strata.config import Settings
from strata.errors import BrokerError, ConfigError, UsageError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: A client step that waits on the broker (a commit, leaving a group, a
#: closing consumer) gives up after this long when the broker may be gone.
CLOSE_TIMEOUT_S = 5.0
#: Leaving on an error, a producer's unacknowledged messages get this long: an
#: idempotent aiokafka producer retries a batch for as long as the broker is
#: away, and the error that ended the work should not wait on it forever.
ABANDON_AFTER_S = 10.0


@functools.lru_cache(maxsize=1 << 16)
def key_partition(message_key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a key (murmur2, as Java's).

    Cached: a store's keys recur, and murmur2 in Python costs microseconds.
    """
    index: int = murmur2(message_key) & 0x7FFFFFFF
    return index % partitions


def topic_config(settings: Settings) -> dict[str, str]:
    """Unlimited retention (the memory topic is the source of truth), and room
    for the largest payload plus its event envelope."""
    return {
        "retention.ms": "-1",
        "retention.bytes": "-1",
        "max.message.bytes": str(message_limit(settings)),
    }


def message_limit(settings: Settings) -> int:
    """The largest message a Strata topic accepts: the payload limit plus headroom."""
    return settings.max_payload_bytes + 64 * 1024


def bootstrap_of(settings: Settings) -> str:
    """The broker address: the setting, else the one ``strata broker up`` recorded.

    Raises:
        ConfigError: neither is available.
    """
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    recorded = recorded_bootstrap(settings.data_dir)
    if recorded:
        return recorded
    raise ConfigError(
        "no Kafka broker: set STRATA_KAFKA_BOOTSTRAP or run `strata broker up` "
        f"(data dir {settings.data_dir})"
    )


def pinned(settings: Settings) -> Settings:
    """``settings`` with the broker address resolved now, for a job that must
    keep talking to the same broker even if its record goes away meanwhile.

    Raises:
        ConfigError: there is no broker to resolve.
    """
    return settings.model_copy(update={"kafka_bootstrap": bootstrap_of(settings)})


#: How long the dead-letter topic keeps a tombstone: a thousand years. Not
#: Long.MAX_VALUE: the log cleaner stamps each tombstone batch with "now +
#: delete.retention.ms", which would overflow and drop it at once.
DLQ_TOMBSTONE_RETENTION_MS = 1000 * 365 * 24 * 3600 * 1000


async def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create the memory, dead-letter and jobs topics if missing; return those created.

    Raises:
        BrokerError: the broker cannot be reached within ``timeout_s``.
    """
    bootstrap = bootstrap_of(settings)
    config = topic_config(settings)
    # Dead letters are keyed by source position; compaction keeps one per
    # position and lets a replay resolve a letter with a tombstone. The
    # tombstones stay: they are how workers know a position was dead-lettered.
    dlq_config = {
        **config,
        "cleanup.policy": "compact",
        "delete.retention.ms": str(DLQ_TOMBSTONE_RETENTION_MS),
    }
    wanted = {
        settings.memory_topic: (settings.partitions, config),
        settings.dlq_topic: (1, dlq_config),
        settings.jobs_topic: (1, config),
    }
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    await start_client(admin, bootstrap, timeout_s)
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        for name in missing:
            partitions, config = wanted[name]
            try:
                await admin.create_topics(
                    [NewTopic(name, partitions, 1, topic_configs=config)]
                )
                created.append(name)
                log.info("topics.created", topic=name, partitions=partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    await wait_for_topics(settings, list(wanted), timeout_s=timeout_s)
    return created


async def wait_for_topics(
    settings: Settings, topics: Iterable[str], *, timeout_s: float = 30.0
) -> None:
    """Wait until every topic's partitions have a leader (metadata has propagated)."""
    names = list(topics)
    deadline = time.monotonic() + timeout_s
    while True:
        offsets = await end_offsets(settings, names, timeout_s=timeout_s)
        if {tp.topic for tp in offsets} >= set(names):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"topics {names} have no leaders after {timeout_s:g}s")
        await asyncio.sleep(0.2)


async def start_client(client: object, bootstrap: str, timeout_s: float) -> None:
    """Start an aiokafka client, turning a dead broker into one clear error."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(client.start(), timeout=timeout_s)  # type: ignore[attr-defined]
    except (TimeoutError, KafkaConnectionError, KafkaError, OSError) as exc:
        waited = time.monotonic() - began
        with_close = getattr(client, "close", None) or getattr(client, "stop", None)
        if with_close is not None:
            try:
                await with_close()
            except Exception as close_exc:  # noqa: BLE001 - the start failure matters more
                log.debug("kafka.close_after_failed_start", error=str(close_exc))
        detail = str(exc) or type(exc).__name__
        if detail.startswith(f"{type(exc).__name__}: "):
            detail = detail[len(type(exc).__name__) + 2 :]
        if detail.startswith("Unable to bootstrap from"):
            # The client's list of resolved addresses says nothing the
            # bootstrap string does not, in a form meant for its developers.
            detail = "no address of it accepted a connection"
        after = f" after {waited:.1f}s" if waited >= 1.0 else ""
        raise BrokerError(
            f"Kafka broker at {bootstrap} unreachable{after}: "
            f"{detail if detail != 'TimeoutError' else 'no answer'}"
        ) from exc


async def start_reader(
    settings: Settings, timeout_s: float = 30.0, **options: Any
) -> AIOKafkaConsumer:
    """A started consumer outside any group that reads committed records
    from the earliest offset; the caller assigns its partitions and stops it.

    Raises:
        BrokerError: the broker cannot be reached within ``timeout_s``.
    """
    bootstrap = bootstrap_of(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **options,
    )
    await start_client(consumer, bootstrap, timeout_s)
    return consumer


async def end_offsets(
    settings: Settings, topics: Iterable[str], *, timeout_s: float = 30.0
) -> dict[TopicPartition, int]:
    """The end offset of every partition of the given topics."""
    consumer = await start_reader(
        settings, timeout_s, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        tps = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [
                TopicPartition(topic, p)
                for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
        if not tps:
            return {}
        result: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return result
    finally:
        await consumer.stop()


async def existing_end_offsets(
    settings: Settings, topic: str, *, timeout_s: float = 30.0
) -> dict[TopicPartition, int]:
    """:func:`end_offsets` of one topic that must exist.

    Raises:
        UsageError: the topic does not exist.
        BrokerError: the broker cannot be reached.
    """
    ends = await end_offsets(settings, [topic], timeout_s=timeout_s)
    if not ends:
        raise missing_topic(settings, topic)
    return ends


async def cluster_id(settings: Settings, *, timeout_s: float = 30.0) -> str:
    """The id of the Kafka cluster the settings point at.

    Offsets mean something only within one cluster: a store's checkpoints
    are checked against it (see :meth:`projections.l2.L2Projection.bind_source`).

    Raises:
        BrokerError: the broker cannot be reached.
    """
    bootstrap = bootstrap_of(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    await start_client(admin, bootstrap, timeout_s)
    try:
        described = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    except (TimeoutError, KafkaError) as exc:
        raise BrokerError(
            f"Kafka broker at {bootstrap} did not describe its cluster: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        await admin.close()
    return str(described.get("cluster_id") or "")


def missing_topic(settings: Settings, topic: str) -> UsageError:
    """The error for a topic the broker does not have."""
    return UsageError(
        f"topic {topic} does not exist on {bootstrap_of(settings)}: check "
        "STRATA_TOPIC_PREFIX, or run `strata topics ensure`"
    )


def broker_failure(
    settings: Settings, doing: str, exc: KafkaError, *, then: str = "rerun to resume"
) -> BrokerError:
    """The error a job raises when a Kafka client gave up while it was ``doing``."""
    return BrokerError(
        f"Kafka broker at {bootstrap_of(settings)} failed while {doing}: "
        f"{type(exc).__name__}: {exc}; {then}"
    )


class BrokerWatch:
    """Turns a wait that has stopped moving into a :class:`BrokerError`, once
    the broker no longer answers.

    aiokafka's clients retry for as long as a broker is away (an idempotent
    producer never gives a batch up), which suits a long-running worker but
    leaves a job waiting forever. A job calls :meth:`moved` whenever its
    work advances and :meth:`check` while it waits; after ``stall_s`` without
    progress, :meth:`check` asks the broker for the topic's end offsets and
    raises if it gets no answer within ``probe_s``.

    Args:
        settings: where the broker is (resolved now: see :func:`pinned`).
        doing: what the job was doing, for the error ("publishing the export").
        then: what the error tells the user to do.
    """

    def __init__(
        self,
        settings: Settings,
        doing: str,
        *,
        stall_s: float = 15.0,
        probe_s: float = 10.0,
        then: str = "rerun to resume",
    ) -> None:
        self.settings = pinned(settings)
        self.doing = doing
        self.then = then
        self.stall_s = stall_s
        self.probe_s = probe_s
        self._moved_at = time.monotonic()
        self._done = -1

    def moved(self) -> None:
        """The work advanced: the broker is evidently there."""
        self._moved_at = time.monotonic()

    async def progress(self, done: int) -> None:
        """Note how much work is done so far: :meth:`moved` if it grew since
        the last call, else :meth:`check`."""
        if done != self._done:
            self._done = done
            self.moved()
        else:
            await self.check()

    async def check(self) -> None:
        """Ask the broker whether it is there, if nothing moved for a while.

        Raises:
            BrokerError: it did not answer.
        """
        stalled = time.monotonic() - self._moved_at
        if stalled < self.stall_s:
            return
        try:
            await asyncio.wait_for(
                end_offsets(
                    self.settings, [self.settings.memory_topic], timeout_s=self.probe_s
                ),
                self.probe_s + 5.0,
            )
        except (BrokerError, TimeoutError) as exc:
            raise BrokerError(
                f"Kafka broker at {bootstrap_of(self.settings)} stopped answering "
                f"while {self.doing} (nothing moved for {stalled:.0f}s); {self.then}"
            ) from exc
        self.moved()  # it answered: give the work another while

    async def wait(self, work: Awaitable[T]) -> T:
        """Await ``work``, checking on the broker while it takes long.

        Raises:
            BrokerError: the broker stopped answering (``work`` is cancelled).
        """
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    self.moved()
                    return task.result()
                await self.check()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def bounded_close(
    work: Coroutine[Any, Any, None], *, step: str, seconds: float, consequence: str
) -> None:
    """Run one step of closing a client, giving up after ``seconds``.

    For leaving when the broker may be gone: an aiokafka client's ``stop``
    can wait for it indefinitely. A step that times out or fails is logged
    as a warning with its ``consequence``, never raised, so the error that
    made the caller leave is the one that reaches the user.
    """
    try:
        await asyncio.wait_for(work, seconds)
    except TimeoutError:
        log.warning(
            "kafka.close_timed_out",
            step=step,
            seconds=seconds,
            cause="the broker did not answer",
            consequence=consequence,
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # aiokafka's fetcher awaits the fetches it cancels while closing,
        # which surfaces as a cancellation nobody asked this task for.
        log.warning(
            "kafka.close_failed",
            step=step,
            cause="a request in flight was cancelled",
            consequence=consequence,
        )
    except Exception as exc:  # noqa: BLE001 - reported; the caller's own error matters more
        log.warning(
            "kafka.close_failed",
            step=step,
            error=f"{type(exc).__name__}: {exc}",
            consequence=consequence,
        )
