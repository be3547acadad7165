"""Avro schemas of Strata's events and the codec that reads and writes them."""

from schemas.codec import Codec, SchemaRegistry, SchemaVersion
from schemas.events import (
    EVENT_TYPES,
    Event,
    MemoryDeleted,
    MemoryReencrypted,
    MemoryTiered,
    MemoryWritten,
    TenantErased,
)

__all__ = [
    "EVENT_TYPES",
    "Codec",
    "Event",
    "MemoryDeleted",
    "MemoryReencrypted",
    "MemoryTiered",
    "MemoryWritten",
    "SchemaRegistry",
    "SchemaVersion",
    "TenantErased",
]
