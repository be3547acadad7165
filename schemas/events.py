"""The events of the memory topic as typed values (treat them as read-only).

Each class matches the newest ``.avsc`` file of the same name; the codec reads
older versions into it by Avro schema resolution.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Record kinds a memory can be at; used in ledger entries and history rows.
ACTIONS = ("written", "deleted", "rejected", "reencrypted", "tiered", "erased")


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


@dataclass(slots=True)
class _Event:
    """Common behaviour of the memory events."""

    schema_name: ClassVar[str] = ""

    def to_record(self) -> dict[str, Any]:
        """The Avro record of this event (a shallow dict of its fields)."""
        return {name: getattr(self, name) for name in _field_names(type(self))}

    @property
    def message_key(self) -> bytes:
        """The Kafka message key: ``tenant/key``, so one key keeps one partition."""
        tenant: str = getattr(self, "tenant")  # noqa: B009 - declared by subclasses
        key: str = getattr(self, "key", "")
        return f"{tenant}/{key}".encode()


@dataclass(slots=True)
class MemoryWritten(_Event):
    """A memory was written; its payload travels as ciphertext only."""

    schema_name: ClassVar[str] = "MemoryWritten"

    event_id: str
    tenant: str
    key: str
    cls: str
    agent: str
    time_ms: int
    key_id: str
    key_version: int
    nonce: bytes
    ciphertext: bytes
    content_hash: bytes
    expected_version: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Added in MemoryWritten.v2; version 1 events read with these defaults.
    tags: list[str] = field(default_factory=list)
    source_ref: str | None = None


@dataclass(slots=True)
class MemoryDeleted(_Event):
    """A memory was deleted; its history stays."""

    schema_name: ClassVar[str] = "MemoryDeleted"

    event_id: str
    tenant: str
    key: str
    agent: str
    time_ms: int
    expected_version: int | None = None


@dataclass(slots=True)
class MemoryReencrypted(_Event):
    """A job re-encrypted one record version under a newer key version."""

    schema_name: ClassVar[str] = "MemoryReencrypted"

    event_id: str
    tenant: str
    key: str
    version: int
    source_event_id: str
    key_id: str
    key_version: int
    nonce: bytes
    ciphertext: bytes
    content_hash: bytes
    time_ms: int
    job_id: str


@dataclass(slots=True)
class MemoryTiered(_Event):
    """A record moved between storage tiers."""

    schema_name: ClassVar[str] = "MemoryTiered"

    event_id: str
    tenant: str
    key: str
    version: int
    from_tier: str
    to_tier: str
    reason: str
    time_ms: int


@dataclass(slots=True)
class TenantErased(_Event):
    """A tenant's keys were destroyed; its records are to be purged."""

    schema_name: ClassVar[str] = "TenantErased"

    event_id: str
    tenant: str
    time_ms: int
    key_versions: list[int] = field(default_factory=list)


Event = MemoryWritten | MemoryDeleted | MemoryReencrypted | MemoryTiered | TenantErased

EVENT_TYPES: dict[str, type[Event]] = {
    cls.schema_name: cls
    for cls in (
        MemoryWritten,
        MemoryDeleted,
        MemoryReencrypted,
        MemoryTiered,
        TenantErased,
    )
}
