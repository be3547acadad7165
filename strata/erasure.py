"""Tenant erasure: destroy the keys, then tell every partition.

The keys go first: once the tenant's data keys and its KMS key are
destroyed, every ciphertext of the tenant, in the topic, the stores and any
backup, is unreadable, whatever happens next. Then a TenantErased event is
published to every partition of the memory topic, and projections purge the
tenant's records when they apply it.

Why every partition. A tenant's keys hash to many partitions, and each
partition is an independent, ordered stream: a worker owns some partitions
and not others, keeps its own L1 cache, and a rebuild reads partitions in
whatever interleaving the fetches give. With a marker in each partition,
every partition's projection sees the erasure at a fixed point of its own
order (events before it are purged, events after it rejected) without
depending on what another partition's worker has done, so live and
replayed projections decide the same way.

The run is idempotent: erasing an erased tenant publishes the markers only
if they were not acknowledged before, and returns the first receipt.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from producers.producer import producer_options
from projections.l2 import L2Reader
from schemas.codec import Codec
from schemas.events import TenantErased
from strata.config import Settings
from strata.errors import UsageError
from strata.kafka import bootstrap_of, start_client
from strata.keystore import Erasure, Keyring
from strata.paths import StorePaths
from strata.validation import check_tenant

log = structlog.get_logger(__name__)


#: What an erasure does to L1, which has no count of its own.
L1_PURGE = (
    "each worker drops the tenant from its L1 when it applies the erasure "
    "marker; L1 holds a subset of L2's records"
)


@dataclass
class ErasureReceipt:
    """What an erasure destroyed and where it told the projections."""

    tenant: str
    erasure_id: str
    erased_ms: int
    key_id: str
    key_versions_destroyed: list[int]
    kms: str
    kms_key_deleted: bool
    markers: dict[int, int]
    records_purged: dict[str, int]
    payloads_purged: int
    confirmed: bool = False
    remaining: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        erased_at = datetime.datetime.fromtimestamp(self.erased_ms / 1000, datetime.UTC)
        return {
            "tenant": self.tenant,
            "erasure_id": self.erasure_id,
            "erased_ms": self.erased_ms,
            "erased_at": erased_at.isoformat(timespec="milliseconds"),
            "key_id": self.key_id,
            "key_versions_destroyed": self.key_versions_destroyed,
            "kms": self.kms,
            "kms_key_deleted": self.kms_key_deleted,
            "events": [
                {"partition": p, "offset": o} for p, o in sorted(self.markers.items())
            ],
            "records_purged": self.records_purged,
            "l1": L1_PURGE,
            "payloads_purged": self.payloads_purged,
            "purge_confirmed": self.confirmed,
            "remaining": self.remaining,
        }


async def erase_tenant(
    settings: Settings, keyring: Keyring, tenant: str, *, wait_s: float = 0.0
) -> ErasureReceipt:
    """Destroy a tenant's keys, publish its erasure to every partition, and report.

    Args:
        wait_s: wait up to this long for L2 to apply every marker, then
            confirm nothing of the tenant remains there.

    The receipt says ``kms_key_deleted=False`` when the KMS did not answer:
    the local keys are gone and the markers published all the same, and
    running the erasure again finishes the KMS key's deletion.

    Raises:
        UsageError: the tenant name is invalid or it never had keys.
        BrokerError: the markers could not be published; run it again.
    """
    check_tenant(tenant)
    if tenant not in keyring.tenants():
        raise UsageError(f"tenant {tenant!r} has no keys in {keyring.directory}")
    paths = StorePaths(settings.data_dir)
    erasure = keyring.erasure(tenant)
    if erasure is None or not erasure.kms_key_deleted:
        held = _l2_counts(paths, tenant) if erasure is None else None
        erasure = await asyncio.to_thread(keyring.shred, tenant, purged=held)
    if not erasure.markers:
        markers = await _publish_markers(settings, erasure)
        keyring.note_erasure_markers(tenant, markers)
        erasure = keyring.erasure(tenant) or erasure
    receipt = ErasureReceipt(
        tenant=tenant,
        erasure_id=erasure.erasure_id,
        erased_ms=erasure.erased_ms,
        key_id=erasure.key_id,
        key_versions_destroyed=erasure.versions,
        kms=keyring.kms.describe(),
        kms_key_deleted=erasure.kms_key_deleted,
        markers=erasure.markers,
        # L1 is each worker's memory (see L1_PURGE): no count of its own.
        records_purged={
            "l2": erasure.purged.get("l2", 0),
            "l3": erasure.purged.get("l3", 0),
        },
        payloads_purged=erasure.purged.get("payloads", 0),
    )
    # Without a wait this still confirms a purge L2 has already made (an
    # erasure run again, once the workers applied its markers).
    receipt.confirmed, receipt.remaining = await _confirm(
        paths, tenant, erasure.markers, wait_s
    )
    log.info(
        "erasure.receipt",
        tenant=tenant,
        erasure_id=receipt.erasure_id,
        versions=receipt.key_versions_destroyed,
        confirmed=receipt.confirmed,
    )
    return receipt


def _l2_counts(paths: StorePaths, tenant: str) -> dict[str, int]:
    l2 = L2Reader(paths.l2_db)
    try:
        return l2.tenant_counts(tenant)
    finally:
        l2.close()


async def _publish_markers(settings: Settings, erasure: Erasure) -> dict[int, int]:
    codec = Codec()
    producer = AIOKafkaProducer(**producer_options(settings))
    await start_client(producer, bootstrap_of(settings), 30.0)
    try:
        partitions = sorted(await producer.partitions_for(settings.memory_topic))
        sends = {}
        for partition in partitions:
            event = TenantErased(
                event_id=f"{erasure.erasure_id}-p{partition}",
                tenant=erasure.tenant,
                time_ms=erasure.erased_ms,
                key_versions=erasure.versions,
            )
            sends[partition] = await producer.send(
                settings.memory_topic,
                value=codec.encode(event),
                key=event.message_key,
                partition=partition,
            )
        markers = {p: (await fut).offset for p, fut in sends.items()}
    finally:
        await producer.stop()
    log.info("erasure.published", tenant=erasure.tenant, partitions=len(markers))
    return markers


async def _confirm(
    paths: StorePaths, tenant: str, markers: dict[int, int], wait_s: float
) -> tuple[bool, dict[str, int]]:
    """Wait for L2 to pass every marker; then what L2 still holds of the tenant."""
    deadline = time.monotonic() + wait_s
    l2 = L2Reader(paths.l2_db)
    try:
        while True:
            done = l2.checkpoints()
            if all(done.get(p, 0) > o for p, o in markers.items()):
                remaining = {k: v for k, v in l2.tenant_counts(tenant).items() if v}
                return not remaining and l2.is_erased(tenant), remaining
            if time.monotonic() >= deadline:
                if wait_s <= 0:
                    return False, {}
                log.warning(
                    "erasure.not_confirmed",
                    tenant=tenant,
                    waited_s=wait_s,
                    consequence="keys are destroyed; L2 purges when a worker applies the markers",
                )
                return False, {}
            await asyncio.sleep(0.2)
    finally:
        l2.close()
