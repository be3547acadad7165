"""The read API: L1, then L2, then L3; plaintext only after decryption here.

Reads are scoped by tenant at every step: each tier looks a record up by the
pair (tenant, key), and whatever a tier returns is checked to be that
tenant's record before it is decrypted (under a key bound to tenant and key,
which would refuse it anyway).

L2 knows every live record and the tier that serves it. A record in L3 is
read from the archive; when L3 cannot answer (it follows L2 and may not have
applied the move yet, or a frame fails its checksum) L2's copy of the same
version answers instead, so a read never fails for a tier move.

Each read is noted in the read statistics (:class:`~projections.l3.ReadStats`)
that the tiering job ages and promotes by; noting never fails a read.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from projections.l1 import L1Cache
from projections.l2 import HistoryRow, L2Reader, StoredRecord
from projections.l3 import L3Reader, ReadStats, read_stats_path
from strata.crypto import open_sealed
from strata.errors import (
    ErasedError,
    NotFoundError,
    NotProjectedError,
    StoreError,
    StrataError,
)
from strata.keystore import Keyring
from strata.metrics import ReadMetrics
from strata.paths import StorePaths

log = structlog.get_logger(__name__)

#: How often a reader waiting for its writes looks at L2's checkpoints.
WATCH_INTERVAL_S = 0.002


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class WriteToken:
    """Where a write landed: read it back once this offset is projected."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> WriteToken:
        """Parse ``PARTITION:OFFSET``.

        Raises:
            ValueError: the text is not two non-negative integers.
        """
        partition, _, offset = text.partition(":")
        token = cls(int(partition), int(offset))
        if token.partition < 0 or token.offset < 0:
            raise ValueError("negative partition or offset")
        return token


@dataclass(frozen=True, slots=True)
class Memory:
    """A record as a reader sees it, payload decrypted."""

    tenant: str
    key: str
    version: int
    cls: str
    agent: str
    payload: bytes
    metadata: dict[str, str]
    updated_ms: int
    tier: str
    partition: int
    offset: int
    #: The tier whose copy answered: ``l1``, ``l2`` or ``l3``.
    served_by: str = "l2"

    def __repr__(self) -> str:
        return (
            f"Memory(tenant={self.tenant!r}, key={self.key!r}, version={self.version}, "
            f"cls={self.cls!r}, payload=<{len(self.payload)} bytes>)"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; the payload as text when it is UTF-8."""
        try:
            payload: Any = self.payload.decode()
        except UnicodeDecodeError:
            payload = {"base64": base64.b64encode(self.payload).decode()}
        return {
            "tenant": self.tenant,
            "key": self.key,
            "version": self.version,
            "cls": self.cls,
            "agent": self.agent,
            "payload": payload,
            "metadata": self.metadata,
            "updated_ms": self.updated_ms,
            "tier": self.tier,
            "served_by": self.served_by,
            "token": f"{self.partition}:{self.offset}",
        }


class Reader:
    """Reads memories through the tiers and decrypts them.

    Args:
        l2_path: the live L2 database.
        keystore: the data keys.
        l1: a cache shared with a worker of this process, if any.
        l3_dir: the L3 folder; by default the one of ``l2_path``'s data dir.
        metrics: where read latency per tier is observed, if anywhere.
        track_reads: note reads for the aging policy.
        clock: UTC milliseconds, for read statistics.
    """

    def __init__(
        self,
        l2_path: Path | Callable[[], Path],
        keystore: Keyring,
        *,
        l1: L1Cache | None = None,
        l3_dir: Path | None = None,
        metrics: ReadMetrics | None = None,
        track_reads: bool = True,
        clock: Callable[[], int] = _wall_ms,
    ) -> None:
        self.l2 = L2Reader(l2_path)
        # Every L2 version lives in the same folder; L3 and read stats sit beside it.
        first = self.l2.path
        self.l3 = L3Reader(l3_dir or StorePaths(first.parent.parent).l3)
        self.l1 = l1
        self.keystore = keystore
        self.metrics = metrics
        self.stats = ReadStats(read_stats_path(first)) if track_reads else None
        self._clock = clock
        self._waiters: list[tuple[WriteToken, asyncio.Future[None]]] = []
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_paths(cls, paths: StorePaths, keystore: Keyring, **options: Any) -> Reader:
        """A reader of a data dir's live L2 (following cutovers) and its L3."""
        return cls(lambda: paths.l2_db, keystore, l3_dir=paths.l3, **options)

    def close(self) -> None:
        """Release the database connections."""
        self.l2.close()
        self.l3.close()
        if self.stats is not None:
            self.stats.close()

    async def wait_for(self, token: WriteToken, *, timeout_s: float = 30.0) -> None:
        """Wait until L2 has projected the token's offset.

        L2 alone decides: a record it places in L3 is read from L2's copy
        until L3 has caught up. However many callers wait, one task looks at
        L2's checkpoints, every :data:`WATCH_INTERVAL_S`.

        Raises:
            NotProjectedError: it was not projected within ``timeout_s``.
            StoreError: L2 cannot be read.
        """
        if self.l2.checkpoint(token.partition) > token.offset:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((token, waiter))
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch(), name="reader:watch-l2")
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise NotProjectedError(
                f"offset {token.offset} of partition {token.partition} was not "
                f"projected within {timeout_s:g}s (is a worker running?)"
            ) from None

    async def _watch(self) -> None:
        """Wake the waiters whose offsets L2 has projected, until none is left."""
        while self._waiters:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                checkpoints = self.l2.checkpoints()
            except Exception as exc:  # noqa: BLE001 - handed to every waiter
                waiting, self._waiters = self._waiters, []
                for _, waiter in waiting:
                    if not waiter.done():
                        waiter.set_exception(exc)
                return
            still = []
            for token, waiter in self._waiters:
                if waiter.done():
                    continue  # timed out or cancelled
                if checkpoints.get(token.partition, 0) > token.offset:
                    waiter.set_result(None)
                else:
                    still.append((token, waiter))
            self._waiters = still

    async def get_after(
        self, tenant: str, key: str, token: WriteToken, *, timeout_s: float = 30.0
    ) -> Memory:
        """Read your write: wait for the token, then read a state at least as new.

        Raises:
            NotProjectedError: the token was not projected within ``timeout_s``.
            ErasedError, NotFoundError, DecryptionError: as :meth:`get`.
        """
        await self.wait_for(token, timeout_s=timeout_s)
        return self.get(tenant, key, after=token)

    def record(
        self, tenant: str, key: str, *, after: WriteToken | None = None
    ) -> StoredRecord:
        """The current stored (encrypted) record of a key.

        ``after``: an L1 copy older than this token is not used.

        Raises:
            ErasedError: the tenant was erased.
            NotFoundError: no live record.
        """
        return self._find(tenant, key, after)[0]

    def get(
        self,
        tenant: str,
        key: str,
        *,
        as_of: int | None = None,
        after: WriteToken | None = None,
    ) -> Memory:
        """Read and decrypt a key's current value, or its value at an offset.

        Raises:
            ErasedError: the tenant was erased.
            NotFoundError: no such key (or not yet written at ``as_of``).
            NotProjectedError: the key's partition is not projected up to
                ``as_of`` yet.
            DecryptionError: the stored ciphertext does not authenticate.
        """
        started = time.perf_counter()
        try:
            if as_of is None:
                record, served = self._find(tenant, key, after)
            else:
                record, served = self._find_as_of(tenant, key, as_of), "l2"
        except NotFoundError:
            if self.metrics is not None:
                self.metrics.not_found.inc()
            raise
        memory = self.decrypt(record, served_by=served)
        if self.metrics is not None:
            self.metrics.latency.labels(served).observe(time.perf_counter() - started)
        if self.stats is not None and as_of is None:
            self.stats.note(tenant, key, tier=record.tier, at_ms=self._clock())
        return memory

    def _find(
        self, tenant: str, key: str, after: WriteToken | None
    ) -> tuple[StoredRecord, str]:
        if self.l1 is not None:
            cached = self.l1.get(tenant, key)
            if cached is not None and not _older(cached, after):
                return _owned(cached, tenant, key), "l1"
        found = self.l2.get(tenant, key)
        if found is None or found.deleted:
            self._raise_missing(tenant, key, deleted=found is not None)
        assert found is not None
        served = "l2"
        if found.tier == "l3":
            archived = self._from_l3(found)
            if archived is not None:
                found, served = archived, "l3"
        _owned(found, tenant, key)
        if self.l1 is not None:
            self.l1.put(found)
        return found, served

    def _from_l3(self, found: StoredRecord) -> StoredRecord | None:
        """L3's copy of the version L2 says is archived, or None to use L2's."""
        try:
            archived = self.l3.get(found.tenant, found.key)
        except StoreError as exc:
            log.warning(
                "reader.l3_unreadable",
                tenant=found.tenant,
                key=found.key,
                error=str(exc),
                consequence="served from L2's copy; run `strata tier verify`",
            )
            self._fell_back("unreadable")
            return None
        if archived is None or archived.version != found.version:
            # L3 follows L2 and has not applied the move yet.
            self._fell_back("not_archived")
            return None
        if archived.event_id != found.event_id:
            log.warning(
                "reader.l3_mismatch",
                tenant=found.tenant,
                key=found.key,
                version=found.version,
                consequence="served from L2's copy; run `strata tier verify`",
            )
            self._fell_back("mismatch")
            return None
        return archived

    def _fell_back(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.l3_fallbacks.labels(reason).inc()

    def _find_as_of(self, tenant: str, key: str, as_of: int) -> StoredRecord:
        found = self.l2.get_as_of(tenant, key, as_of)
        rows = self.l2.history(tenant, key) if found is None else []
        partition = found.partition if found else rows[0].partition if rows else None
        # What the key held then is not known until its partition is
        # projected past the offset: say so, rather than give the latest value
        # or "not found". A key never projected has no known partition, so
        # only an offset no partition has reached is known to be unprojected.
        if partition is None:
            projected = max(self.l2.checkpoints().values(), default=0)
            unknown = f"offset {as_of} is not projected yet in any partition"
        else:
            projected = self.l2.checkpoint(partition)
            unknown = f"offset {as_of} of partition {partition} is not projected yet"
        if projected <= as_of:
            raise NotProjectedError(
                f"{tenant}/{key}: {unknown} (projected below {projected}; is a "
                "worker running?)"
            )
        if found is None or found.deleted:
            self._raise_missing(tenant, key, deleted=found is not None, as_of=as_of)
        assert found is not None
        return _owned(found, tenant, key)

    def decrypt(self, record: StoredRecord, *, served_by: str | None = None) -> Memory:
        """Decrypt a stored record under the key version it names."""
        assert record.nonce is not None
        assert record.ciphertext is not None
        assert record.key_version is not None
        data_key = self.keystore.data_key(record.tenant, record.key_version)
        payload = open_sealed(
            data_key,
            record.nonce,
            record.ciphertext,
            tenant=record.tenant,
            key=record.key,
            event_id=record.event_id,
        )
        return Memory(
            tenant=record.tenant,
            key=record.key,
            version=record.version,
            cls=record.cls,
            agent=record.agent,
            payload=payload,
            metadata=record.metadata,
            updated_ms=record.updated_ms,
            tier=record.tier,
            partition=record.partition,
            offset=record.offset,
            served_by=served_by or record.tier,
        )

    def history(self, tenant: str, key: str) -> list[HistoryRow]:
        """Every event that touched a key, rejected ones included.

        Raises:
            ErasedError: the tenant was erased.
            NotFoundError: no event ever touched the key.
        """
        rows = self.l2.history(tenant, key)
        if not rows:
            self._raise_missing(tenant, key, deleted=False)
        return rows

    def list(
        self, tenant: str, *, prefix: str | None = None, cls: str | None = None
    ) -> list[tuple[str, int, str, int]]:
        """Live keys of a tenant as (key, version, class, updated_ms)."""
        if self.l2.is_erased(tenant):
            raise ErasedError(f"tenant {tenant!r} was erased")
        return self.l2.list(tenant, prefix=prefix, cls=cls)

    def _raise_missing(
        self, tenant: str, key: str, *, deleted: bool, as_of: int | None = None
    ) -> None:
        if self.l2.is_erased(tenant) or self.keystore.is_erased(tenant):
            raise ErasedError(f"tenant {tenant!r} was erased; its memories are gone")
        where = f" at offset {as_of}" if as_of is not None else ""
        state = "was deleted" if deleted else "not found"
        raise NotFoundError(f"{tenant}/{key}: {state}{where}")


def _older(record: StoredRecord, token: WriteToken | None) -> bool:
    """Whether a cached record predates a token of its own partition."""
    return (
        token is not None
        and record.partition == token.partition
        and record.offset < token.offset
    )


def _owned(record: StoredRecord, tenant: str, key: str) -> StoredRecord:
    if record.tenant != tenant or record.key != key:
        raise StrataError(
            f"store returned {record.tenant!r}/{record.key!r} for {tenant!r}/{key!r}"
        )
    return record


def history_to_dict(row: HistoryRow) -> dict[str, Any]:
    """A JSON-ready form of one history row."""
    return dataclasses.asdict(row)
