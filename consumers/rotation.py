"""Key rotation as a replayable job, its verification, and key retirement.

A rotation gives each tenant it covers a new key version, makes it primary
for new writes, then replays the memory topic up to the end offsets seen
after that switch. For every write whose payload L2 still holds under an
older version, it publishes a MemoryReencrypted event carrying the same
plaintext sealed under the new version, bound to the same tenant, key and
event id. Workers apply those events like any other, so a rebuild from
offset 0 reaches the same state.

What is "still held" is L2's decision, read at the write's log position: a
rejected write, a purged tenant or a payload already re-encrypted is
skipped. L2 also holds the current ciphertext, which after an earlier
rotation is no longer the one in the original event.

Exactly once without Kafka transactions. Each re-encryption's event id is
derived from the job id and the source event id; L2 applies an event id
once and a key version only forwards, so a repeat changes nothing. The job
records its progress on the jobs topic after each batch is acknowledged:
per partition, the next source offset and the offset after its own last
event. A resumed job starts from there and first reads its own events past
that mark, so the batch in flight when it was killed is not published
twice. (Transactions would also do, but aiokafka's support has gaps, and
their commit markers occupy offsets that a worker comparing checkpoints
with end offsets never reaches.)

A key version is retired only after :func:`verify_coverage` has cleared it
and a fresh check at retirement still finds nothing that needs it. Until
then, rolling back is switching the primary back: nothing is lost.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from consumers.replay import BoundedReplay, JobJournal, ReplayProgress
from producers.batching import Batcher
from producers.producer import now_ms, producer_options
from projections.l2 import L2Reader, StoredPayload
from projections.l3 import L3Reader
from projections.reader import WriteToken
from schemas.codec import Codec
from schemas.events import MemoryReencrypted, MemoryWritten
from strata.config import Settings
from strata.crypto import DataKey, reseal
from strata.errors import (
    CodecError,
    DecryptionError,
    ErasedError,
    StoreError,
    UsageError,
)
from strata.kafka import (
    ABANDON_AFTER_S,
    BrokerWatch,
    bootstrap_of,
    bounded_close,
    broker_failure,
    end_offsets,
    pinned,
    start_client,
    start_reader,
)
from strata.keystore import ACTIVE, Keyring
from strata.locks import exclusive
from strata.paths import StorePaths
from strata.validation import check_tenant

log = structlog.get_logger(__name__)

KIND = "key-rotation"


#: Batches re-encrypted ahead of the last one whose progress is recorded.
_BATCHES_IN_FLIGHT = 4


def reencryption_id(job_id: str, source_event_id: str) -> str:
    """The event id of a job's re-encryption of one event: the same on every run."""
    digest = hashlib.sha256(f"strata/reencrypt/{job_id}/{source_event_id}".encode())
    return digest.hexdigest()[:32]


# -- the job's record on the jobs topic -------------------------------------------


@dataclass
class JobRecord:
    """A rotation job as its lifecycle events on the jobs topic describe it."""

    job_id: str
    versions: dict[str, int]
    targets: dict[int, int]
    state: str = "started"
    next_offsets: dict[int, int] = field(default_factory=dict)
    out_offsets: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    time_ms: int = 0

    @property
    def finished(self) -> bool:
        """Whether the job completed (a failed job can be resumed)."""
        return self.state == "completed"


async def read_rotation_jobs(
    settings: Settings, *, timeout_s: float = 30.0
) -> dict[str, JobRecord]:
    """Every rotation job on the jobs topic, by id, in the order they started."""
    jobs: dict[str, JobRecord] = {}
    ends = await end_offsets(settings, [settings.jobs_topic], timeout_s=timeout_s)
    if not any(ends.values()):
        return jobs
    consumer = await start_reader(settings, timeout_s)
    try:
        tps = sorted(ends, key=lambda tp: tp.partition)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise StoreError(
                    f"jobs topic {settings.jobs_topic} not read within {timeout_s:g}s"
                )
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for msg in records:
                    _apply_job_message(jobs, msg)
    finally:
        await consumer.stop()
    return jobs


def _apply_job_message(jobs: dict[str, JobRecord], msg: ConsumerRecord) -> None:
    try:
        doc = json.loads(msg.value)
    except (TypeError, ValueError):
        return
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        return
    job_id, state = str(doc.get("job_id")), doc.get("state")
    if state == "started":
        jobs[job_id] = JobRecord(
            job_id=job_id,
            versions={str(t): int(v) for t, v in doc["versions"].items()},
            targets={int(p): int(o) for p, o in doc["targets"].items()},
            time_ms=int(doc.get("time_ms", 0)),
        )
        return
    job = jobs.get(job_id)
    if job is None:
        return
    job.state = str(state)
    if "positions" in doc:
        for p, pos in doc.get("positions", {}).items():
            job.next_offsets[int(p)] = int(pos["next"])
            job.out_offsets[int(p)] = int(pos["out"])
    if "counts" in doc:
        job.counts = {str(k): int(v) for k, v in doc["counts"].items()}


# -- the job ----------------------------------------------------------------------


@dataclass
class RotationCounts:
    """What a rotation did with the writes it read."""

    reencrypted: int = 0
    current: int = 0
    not_live: int = 0
    already_published: int = 0
    erased: int = 0
    undecryptable: int = 0
    undecodable: int = 0

    def add(self, other: dict[str, int]) -> None:
        """Add counts recorded by an earlier run of the same job."""
        for name, value in other.items():
            if hasattr(self, name):
                setattr(self, name, getattr(self, name) + value)


@dataclass
class RotationReport:
    """The outcome of one run of a rotation job."""

    job_id: str
    resumed: bool
    versions: dict[str, int]
    targets: dict[int, int]
    counts: RotationCounts
    records_read: int = 0
    seconds: float = 0.0
    previous_counts: dict[str, int] = field(default_factory=dict)
    not_covered: list[str] = field(default_factory=list)

    def total(self) -> dict[str, int]:
        """Counts over every run of the job so far."""
        total = RotationCounts(**asdict(self.counts))
        total.add(self.previous_counts)
        return asdict(total)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "job_id": self.job_id,
            "resumed": self.resumed,
            "tenants": self.versions,
            "targets": {str(p): o for p, o in sorted(self.targets.items())},
            "this_run": asdict(self.counts),
            "counts": self.total(),
            "records_read": self.records_read,
            "seconds": round(self.seconds, 3),
            "not_covered": self.not_covered,
        }


class RotationJob:
    """Rotates tenants' keys and re-encrypts what L2 holds under older versions.

    Args:
        settings: broker, topics and data dir.
        keyring: the tenants' keys.
        tenants: the tenants to rotate; None for every tenant not erased.
        reencrypt_only: create no version; re-encrypt to the current primary
            (for writes that arrived under an old version after a rotation).
        batch_size: records per batch; progress is recorded after each.
        l2_wait_s: how long to wait for L2 to project up to the job's end offsets.
        on_progress: called with (offsets done, offsets to do).

    Raises (from :meth:`run`):
        UsageError: an unknown tenant, another rotation running on this data
            dir, or L2 not caught up in time.
        ErasedError: a tenant asked for was erased.
        KeyUnavailableError: a key cannot be created or unwrapped.
        BrokerError: the broker cannot be reached.
    """

    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        *,
        tenants: Sequence[str] | None = None,
        reencrypt_only: bool = False,
        batch_size: int = 500,
        l2_wait_s: float = 60.0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.tenants = list(tenants) if tenants is not None else None
        self.reencrypt_only = reencrypt_only
        self.batch_size = batch_size
        self.l2_wait_s = l2_wait_s
        self.on_progress = on_progress
        self.paths = StorePaths(settings.data_dir)
        self.codec = Codec()
        self._keys: dict[tuple[str, int], tuple[DataKey, float]] = {}
        self._skip_tenants: set[str] = set()
        self._published: set[str] = set()

    async def run(self) -> RotationReport:
        """Start a new rotation, or resume the unfinished one for these tenants."""
        began = time.monotonic()
        self.settings = pinned(self.settings)
        with exclusive(self.paths.jobs / "rotation.lock", "rotation"):
            wanted = self._wanted_tenants()
            jobs = await read_rotation_jobs(self.settings)
            job = _unfinished_for(jobs, wanted)
            resumed = job is not None
            if job is None:
                # L2 must have caught up before anything changes: a rotation
                # refused for want of a worker leaves every primary as it was.
                ends = await end_offsets(self.settings, [self.settings.memory_topic])
                await self._wait_for_l2({tp.partition: o for tp, o in ends.items()})
                job = await self._plan(wanted, jobs)
            report = RotationReport(
                job_id=job.job_id,
                resumed=resumed,
                versions=job.versions,
                targets=job.targets,
                counts=RotationCounts(),
                previous_counts=job.counts,
                not_covered=sorted(set(wanted) - set(job.versions)),
            )
            if report.not_covered:
                log.warning(
                    "rotation.resuming_other_job",
                    job_id=job.job_id,
                    not_covered=report.not_covered,
                    consequence="these tenants are not rotated; run the rotation again",
                )
            async with JobJournal(
                self.settings, job_id=job.job_id, kind=KIND
            ) as journal:
                try:
                    await self._run(job, journal, report, resumed)
                except KafkaError as exc:
                    error = broker_failure(self.settings, "rotating keys", exc)
                    await journal.record_failure(error)
                    raise error from exc
                except Exception as exc:
                    await journal.record_failure(exc)
                    raise
        report.seconds = time.monotonic() - began
        log.info("rotation.completed", job_id=job.job_id, **asdict(report.counts))
        return report

    # -- planning ----------------------------------------------------------------

    def _wanted_tenants(self) -> list[str]:
        known = self.keyring.tenants()
        if self.tenants is None:
            live = [t for t in known if not self.keyring.is_erased(t)]
            if not live:
                raise UsageError(f"no tenant has keys in {self.keyring.directory}")
            return live
        for tenant in self.tenants:
            check_tenant(tenant)
            if tenant not in known:
                raise UsageError(
                    f"tenant {tenant!r} has no keys in {self.keyring.directory}"
                )
            if self.keyring.is_erased(tenant):
                raise ErasedError(
                    f"tenant {tenant!r} was erased; it has no keys to rotate"
                )
        return sorted(set(self.tenants))

    async def _plan(self, tenants: list[str], jobs: dict[str, JobRecord]) -> JobRecord:
        job_id = "rot-" + uuid.uuid4().hex[:20]
        versions: dict[str, int] = {}
        for tenant in tenants:
            infos = self.keyring.versions(tenant)
            primary = next(i for i in infos if i.primary)
            orphan = primary.job_id is not None and primary.job_id not in jobs
            if self.reencrypt_only or orphan:
                # An orphan version was made by a run that stopped before
                # recording its start: adopt it rather than make another.
                versions[tenant] = primary.version
            else:
                versions[tenant] = max(i.version for i in infos) + 1
                await asyncio.to_thread(
                    self.keyring.ensure_version, tenant, versions[tenant], job_id=job_id
                )
        # Only now, with every new version primary, is the end of the log
        # the point after which writes use the new keys.
        ends = await end_offsets(self.settings, [self.settings.memory_topic])
        targets = {tp.partition: off for tp, off in ends.items()}
        return JobRecord(job_id=job_id, versions=versions, targets=targets, state="new")

    # -- running -----------------------------------------------------------------

    async def _run(
        self, job: JobRecord, journal: JobJournal, report: RotationReport, resumed: bool
    ) -> None:
        if job.state == "new":
            await journal.record(
                "started",
                versions=job.versions,
                targets={str(p): o for p, o in job.targets.items()},
                reencrypt_only=self.reencrypt_only,
            )
            log.info(
                "rotation.started",
                job_id=job.job_id,
                tenants=len(job.versions),
                partitions=len(job.targets),
            )
        else:
            await journal.record("resumed", positions=_positions(job))
            log.info("rotation.resumed", job_id=job.job_id, state=job.state)
        await self._wait_for_l2(job.targets)
        for p, target in job.targets.items():
            job.next_offsets.setdefault(p, 0)
            job.out_offsets.setdefault(p, target)
        pending = {p: t for p, t in job.targets.items() if job.next_offsets[p] < t}
        if resumed and pending:
            await self._collect_published(job, pending)

        client = AIOKafkaProducer(**producer_options(self.settings))
        await start_client(client, bootstrap_of(self.settings), 30.0)
        producer = Batcher(client, self.settings.memory_topic)
        watch = BrokerWatch(self.settings, "publishing re-encrypted records")
        finished = False
        l2 = L2Reader(self.paths.l2_db)
        # Batches are re-encrypted and queued while earlier ones wait for their
        # acknowledgements; each batch's progress is recorded, in order, only
        # once everything it published was acknowledged.
        committing: collections.deque[asyncio.Task[None]] = collections.deque()
        try:

            async def commit(
                previous: asyncio.Task[None] | None,
                partition: int,
                sends: list[asyncio.Future[WriteToken]],
                counts: RotationCounts,
                next_offset: int,
                records: int,
            ) -> None:
                if previous is not None:
                    await previous
                if sends:
                    acks = await watch.wait(asyncio.gather(*sends))
                    job.out_offsets[partition] = max(a.offset for a in acks) + 1
                    counts.reencrypted = len(sends)
                report.counts.add(asdict(counts))
                job.next_offsets[partition] = next_offset
                await journal.record(
                    "progress", positions=_positions(job), counts=report.total()
                )
                log.debug(
                    "rotation.batch_committed",
                    job_id=job.job_id,
                    partition=partition,
                    next_offset=next_offset,
                    records=records,
                )

            async def handle(
                partition: int, records: Sequence[ConsumerRecord], next_offset: int
            ) -> None:
                while committing and committing[0].done():
                    committing.popleft().result()  # raises what failed
                if len(committing) >= _BATCHES_IN_FLIGHT:
                    await committing.popleft()
                counts = RotationCounts()
                sends = await self._batch(job, producer, l2, counts, partition, records)
                previous = committing[-1] if committing else None
                committing.append(
                    asyncio.ensure_future(
                        commit(
                            previous,
                            partition,
                            sends,
                            counts,
                            next_offset,
                            len(records),
                        )
                    )
                )

            replay = BoundedReplay(
                self.settings, max_batch=self.batch_size, on_progress=self._progress
            )
            starts = {p: job.next_offsets[p] for p in pending}
            result = await replay.run(starts, handle, targets=pending)
            while committing:
                await committing.popleft()
            finished = True
        finally:
            # A failed run records no more progress than was acknowledged.
            for task in committing:
                task.cancel()
            await asyncio.gather(*committing, return_exceptions=True)
            l2.close()
            closing = _close_producer(producer, client)
            if finished:
                await closing
            else:
                await bounded_close(
                    closing,
                    step="flush the rotation's producer",
                    seconds=ABANDON_AFTER_S,
                    consequence="a rerun publishes again what was not acknowledged",
                )
        if not result.complete:
            raise StoreError(f"rotation {job.job_id} stopped before its end offsets")
        report.records_read = result.records
        await journal.record("completed", counts=report.total())

    async def _batch(
        self,
        job: JobRecord,
        producer: Batcher,
        l2: L2Reader,
        counts: RotationCounts,
        partition: int,
        records: Sequence[ConsumerRecord],
    ) -> list[asyncio.Future[WriteToken]]:
        """Re-encrypt a batch and queue what it publishes; return the sends."""
        sends = []
        stored = (
            l2.payloads_between(partition, records[0].offset, records[-1].offset)
            if records
            else {}
        )
        for msg in records:
            event = await self._reencrypt(job, stored.get(msg.offset), counts, msg)
            if event is not None:
                sends.append(
                    await producer.append(
                        partition, event.message_key, self.codec.encode(event)
                    )
                )
        return sends

    async def _reencrypt(
        self,
        job: JobRecord,
        stored: StoredPayload | None,
        counts: RotationCounts,
        msg: ConsumerRecord,
    ) -> MemoryReencrypted | None:
        """The re-encryption of one message, or None when it needs none.

        ``stored`` is what L2 holds for the message's position, if anything:
        L2 wrote it from this very message (a data dir is bound to its topic),
        so the message is decoded only when L2 holds nothing, to count why.
        """
        if stored is None:
            try:
                event = self.codec.decode(msg.value) if msg.value is not None else None
            except CodecError:
                counts.undecodable += 1
                return None
            if isinstance(event, MemoryWritten) and event.tenant in job.versions:
                counts.not_live += 1
            return None
        tenant = stored.tenant
        if tenant not in job.versions:
            return None
        target = job.versions[tenant]
        if stored.key_version is not None and stored.key_version >= target:
            counts.current += 1
            return None
        if stored.event_id in self._published:
            counts.already_published += 1
            return None
        if tenant in self._skip_tenants:
            counts.erased += 1
            return None
        try:
            old = await self._key(tenant, stored.key_version or 0)
            new = await self._key(tenant, target)
        except ErasedError:
            log.warning(
                "rotation.tenant_erased",
                job_id=job.job_id,
                tenant=tenant,
                consequence="its records are skipped; erasure purges them",
            )
            self._skip_tenants.add(tenant)
            counts.erased += 1
            return None
        return self._reseal(job.job_id, stored, old, new, counts)

    def _reseal(
        self,
        job_id: str,
        stored: StoredPayload,
        old: DataKey,
        new: DataKey,
        counts: RotationCounts,
    ) -> MemoryReencrypted | None:
        try:
            sealed = reseal(
                old,
                new,
                stored.nonce,
                stored.ciphertext,
                tenant=stored.tenant,
                key=stored.key,
                event_id=stored.event_id,
            )
        except DecryptionError as exc:
            log.warning(
                "rotation.undecryptable",
                tenant=stored.tenant,
                partition=stored.partition,
                offset=stored.offset,
                error=str(exc),
                consequence="left under its old key; `strata keys verify` lists it",
            )
            counts.undecryptable += 1
            return None
        return MemoryReencrypted(  # positional: once per record
            reencryption_id(job_id, stored.event_id),
            stored.tenant,
            stored.key,
            stored.version,
            stored.event_id,
            sealed.key_id,
            sealed.key_version,
            sealed.nonce,
            sealed.ciphertext,
            sealed.content_hash,
            now_ms(),
            job_id,
        )

    async def _key(self, tenant: str, version: int) -> DataKey:
        """A data key, unwrapped off the event loop (the KMS may be remote)."""
        cached = self._keys.get((tenant, version))
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        key = await asyncio.to_thread(self.keyring.data_key, tenant, version)
        self._keys[(tenant, version)] = (
            key,
            time.monotonic() + self.keyring.cache_ttl_s,
        )
        return key

    async def _wait_for_l2(self, targets: dict[int, int]) -> None:
        deadline = time.monotonic() + self.l2_wait_s
        l2 = L2Reader(self.paths.l2_db)
        try:
            while True:
                done = l2.checkpoints()
                behind = {p: t for p, t in targets.items() if done.get(p, 0) < t}
                if not behind:
                    return
                if time.monotonic() > deadline:
                    p, t = min(behind.items())
                    raise UsageError(
                        f"L2 has projected partition {p} to offset {done.get(p, 0)} of "
                        f"{t} after {self.l2_wait_s:g}s; run `strata worker` so the "
                        "rotation sees every record, then run it again"
                    )
                await asyncio.sleep(0.2)
        finally:
            l2.close()

    async def _collect_published(self, job: JobRecord, pending: dict[int, int]) -> None:
        """Read this job's own events past its last recorded mark."""

        async def collect(
            partition: int, records: Sequence[ConsumerRecord], next_offset: int
        ) -> None:
            for msg in records:
                try:
                    event = self.codec.decode(msg.value) if msg.value else None
                except CodecError:
                    continue
                if isinstance(event, MemoryReencrypted) and event.job_id == job.job_id:
                    self._published.add(event.source_event_id)

        starts = {p: job.out_offsets[p] for p in pending}
        await BoundedReplay(self.settings, max_batch=self.batch_size).run(
            starts, collect, targets=dict.fromkeys(pending, 2**62)
        )
        log.info(
            "rotation.published_since_mark",
            job_id=job.job_id,
            events=len(self._published),
        )

    def _progress(self, progress: ReplayProgress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress.done, progress.total)


def _positions(job: JobRecord) -> dict[str, dict[str, int]]:
    return {
        str(p): {"next": job.next_offsets.get(p, 0), "out": job.out_offsets.get(p, t)}
        for p, t in sorted(job.targets.items())
    }


def _unfinished_for(jobs: dict[str, JobRecord], tenants: list[str]) -> JobRecord | None:
    for job in jobs.values():
        if not job.finished and set(job.versions) & set(tenants):
            return job
    return None


async def _close_producer(producer: Batcher, client: AIOKafkaProducer) -> None:
    try:
        await producer.close()
    finally:
        await client.stop()


# -- verification and retirement --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing that stops a key version from being retired."""

    tenant: str
    problem: str
    key_version: int | None = None
    tier: str = "l2"
    key: str | None = None
    version: int | None = None
    event_id: str | None = None
    position: str | None = None


@dataclass
class CoverageReport:
    """Which key versions live records need, and what prevents retirement."""

    tenants: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    findings_total: int = 0
    behind: list[dict[str, Any]] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every store is caught up and nothing needs a non-primary version."""
        return not self.findings_total and not self.behind

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "tiers": self.tiers,
            "tenants": self.tenants,
            "behind": self.behind,
            "findings_total": self.findings_total,
            "findings": [
                {k: v for k, v in asdict(f).items() if v is not None}
                for f in self.findings
            ],
        }


async def verify_coverage(
    settings: Settings,
    keyring: Keyring,
    *,
    tenant: str | None = None,
    limit: int = 100,
    record: bool = True,
    wait_s: float = 10.0,
) -> CoverageReport:
    """Prove which key versions the stores still need.

    A version other than the primary is cleared when L2 (and L3, when it
    exists) have projected the memory topic up to its end offsets at the
    start of the check and hold no payload sealed under it; with ``record``,
    clearances are noted in the keystore, which :func:`retire_versions`
    requires.

    Args:
        tenant: only this tenant; every tenant by default.
        limit: list at most this many records in the findings (all are counted).
        wait_s: how long to wait for the stores to reach those end offsets
            (workers keep projecting while a live system is checked).

    Raises:
        UsageError: ``tenant`` has no keys.
        BrokerError: the broker cannot be reached for end offsets.
    """
    paths = StorePaths(settings.data_dir)
    if tenant is not None:
        check_tenant(tenant)
    if tenant is not None and tenant not in keyring.tenants():
        raise UsageError(f"tenant {tenant!r} has no keys in {keyring.directory}")
    offsets = await end_offsets(settings, [settings.memory_topic])
    ends = {tp.partition: end for tp, end in offsets.items()}
    report = CoverageReport(tiers=["l2"])
    l2 = L2Reader(paths.l2_db)
    l3 = L3Reader(paths.l3) if (paths.l3 / "index.db").exists() else None
    try:
        if l3 is not None:
            report.tiers.append("l3")
        deadline = time.monotonic() + wait_s
        while True:
            report.behind = _behind(ends, l2, l3)
            if not report.behind or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        counts = l2.key_version_counts()
        tenants = [tenant] if tenant is not None else keyring.tenants()
        for name in tenants:
            _cover_tenant(report, keyring, l2, l3, counts, name, limit, record)
    finally:
        l2.close()
        if l3 is not None:
            l3.close()
    log.info(
        "keys.verified",
        ok=report.ok,
        findings=report.findings_total,
        behind=len(report.behind),
    )
    return report


def _behind(
    ends: dict[int, int], l2: L2Reader, l3: L3Reader | None
) -> list[dict[str, Any]]:
    stores = [("l2", l2.checkpoints())]
    if l3 is not None:
        stores.append(("l3", l3.checkpoints()))
    return [
        {"tier": tier, "partition": p, "checkpoint": done.get(p, 0), "end_offset": end}
        for tier, done in stores
        for p, end in sorted(ends.items())
        if done.get(p, 0) < end
    ]


def _cover_tenant(
    report: CoverageReport,
    keyring: Keyring,
    l2: L2Reader,
    l3: L3Reader | None,
    counts: dict[tuple[str, int], int],
    tenant: str,
    limit: int,
    record: bool,
) -> None:
    infos = keyring.versions(tenant)
    in_l2 = {v: n for (t, v), n in counts.items() if t == tenant}
    in_l3 = l3.key_versions(tenant) if l3 is not None else set()
    if keyring.is_erased(tenant):
        held = sum(in_l2.values())
        if held or in_l3:
            report.findings_total += held or 1
            report.findings.append(
                Finding(
                    tenant,
                    f"erased, yet {held} payloads remain (a worker has not purged them)",
                )
            )
        report.tenants.append({"tenant": tenant, "erased": True, "payloads": held})
        return
    primary = next(i.version for i in infos if i.primary)
    known = {i.version: i for i in infos}
    summary: list[dict[str, Any]] = []
    for version in sorted(set(known) | set(in_l2) | in_l3):
        info = known.get(version)
        needed = in_l2.get(version, 0)
        state = info.state if info else "unknown"
        cleared = False
        if version != primary and (needed or version in in_l3):
            why = (
                f"sealed under v{version}, which is {state}; unreadable"
                if state != ACTIVE
                else f"still sealed under v{version}; the primary is v{primary}"
            )
            _add_findings(
                report, l2, tenant, version, needed, version in in_l3, why, limit
            )
        elif version != primary and state == ACTIVE and not report.behind:
            cleared = True
            if record:
                keyring.record_clearance(tenant, version)
        summary.append(
            {
                "version": version,
                "state": state,
                "primary": version == primary,
                "payloads": needed,
                "in_l3": version in in_l3,
                "cleared": cleared,
            }
        )
    report.tenants.append({"tenant": tenant, "primary": primary, "versions": summary})


def _add_findings(
    report: CoverageReport,
    l2: L2Reader,
    tenant: str,
    version: int,
    needed: int,
    in_l3: bool,
    why: str,
    limit: int,
) -> None:
    report.findings_total += needed + (1 if in_l3 else 0)
    room = max(0, limit - len(report.findings))
    for stored in l2.payloads(tenant, key_versions=[version], limit=room):
        report.findings.append(
            Finding(
                tenant=tenant,
                problem=why,
                key_version=version,
                key=stored.key,
                version=stored.version,
                event_id=stored.event_id,
                position=f"{stored.partition}:{stored.offset}",
            )
        )
    if in_l3 and len(report.findings) < limit:
        report.findings.append(Finding(tenant, why, key_version=version, tier="l3"))


@dataclass
class RetireReport:
    """Versions retired, and those refused with the reason."""

    retired: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": not self.refused,
            "retired": self.retired,
            "refused": self.refused,
        }


async def retire_versions(
    settings: Settings,
    keyring: Keyring,
    *,
    tenant: str | None = None,
    version: int | None = None,
    wait_s: float = 10.0,
) -> RetireReport:
    """Retire non-primary key versions that verification cleared.

    Each candidate must carry a clearance from :func:`verify_coverage` and
    pass a fresh check now (stores caught up, nothing sealed under it), so a
    write that arrived since the clearance keeps its key.

    Args:
        tenant: only this tenant's versions; every tenant's by default.
        version: only this version (needs ``tenant``).
        wait_s: how long the fresh check waits for the stores to catch up.

    Raises:
        UsageError: ``version`` without ``tenant``, or no such version.
    """
    if version is not None and tenant is None:
        raise UsageError("--version needs --tenant")
    if tenant is not None and keyring.is_erased(tenant):
        raise ErasedError(
            f"tenant {tenant!r} was erased; its keys are already destroyed"
        )
    fresh = await verify_coverage(
        settings, keyring, tenant=tenant, record=False, wait_s=wait_s
    )
    needed = {
        (t["tenant"], v["version"])
        for t in fresh.tenants
        for v in t.get("versions", [])
        if v["payloads"] or v["in_l3"]
    }
    report = RetireReport()
    for name in [tenant] if tenant is not None else keyring.tenants():
        if keyring.is_erased(name):
            continue
        infos = keyring.versions(name)
        if version is not None and version not in {i.version for i in infos}:
            raise UsageError(f"tenant {name!r} has no key version {version}")
        for info in infos:
            if info.state != ACTIVE or (
                version is not None and info.version != version
            ):
                continue
            entry = {"tenant": name, "version": info.version}
            if info.primary:
                if version is not None:
                    report.refused.append({**entry, "reason": "it is the primary"})
                continue
            reason = None
            if info.cleared_ms is None:
                reason = "not cleared: run `strata keys verify` first"
            elif fresh.behind:
                reason = "stores are behind the memory topic; run a worker"
            elif (name, info.version) in needed:
                reason = "records still need it; run `strata keys rotate` first"
            if reason is not None:
                report.refused.append({**entry, "reason": reason})
                continue
            await asyncio.to_thread(keyring.retire, name, info.version)
            report.retired.append(entry)
    return report


__all__ = [
    "KIND",
    "CoverageReport",
    "Finding",
    "JobRecord",
    "RetireReport",
    "RotationJob",
    "RotationReport",
    "read_rotation_jobs",
    "reencryption_id",
    "retire_versions",
    "verify_coverage",
]
