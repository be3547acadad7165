"""L1, the hot tier: a bounded in-memory cache of recent and read records.

Bounded by entries and by bytes, least recently used out first. It is filled
by projecting writes and by reads that fall through to L2; it is a cache, so
losing it loses nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from projections.l2 import StoredRecord


@dataclass
class L1Stats:
    """Counters an operator watches: hits, misses, evictions."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over lookups, 0.0 before the first lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class L1Cache:
    """An LRU map of (tenant, key) to the record's current version."""

    name = "l1"

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], StoredRecord] = OrderedDict()
        self._bytes = 0
        self.stats = L1Stats()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes held, as counted by :attr:`StoredRecord.size`."""
        return self._bytes

    def get(self, tenant: str, key: str) -> StoredRecord | None:
        """The cached record, marking it recently used; None on a miss."""
        record = self._items.get((tenant, key))
        if record is None:
            self.stats.misses += 1
            return None
        self._items.move_to_end((tenant, key))
        self.stats.hits += 1
        return record

    def put(self, record: StoredRecord) -> None:
        """Cache a record unless it is older than what is cached, then evict to fit."""
        ident = (record.tenant, record.key)
        old = self._items.get(ident)
        if old is not None:
            if old.version > record.version:
                return
            self._bytes -= old.size
        size = record.size
        if size > self.max_bytes or self.max_entries == 0:
            if old is not None:
                del self._items[ident]
            return
        self._items[ident] = record
        self._items.move_to_end(ident)
        self._bytes += size
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.size
            self.stats.evictions += 1

    def discard(self, tenant: str, key: str) -> None:
        """Forget one key."""
        record = self._items.pop((tenant, key), None)
        if record is not None:
            self._bytes -= record.size

    def discard_tenant(self, tenant: str) -> int:
        """Forget every key of a tenant; return how many were dropped."""
        doomed = [ident for ident in self._items if ident[0] == tenant]
        for ident in doomed:
            self.discard(*ident)
        return len(doomed)

    def clear(self) -> None:
        """Forget everything."""
        self._items.clear()
        self._bytes = 0
