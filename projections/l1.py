"""L1, the hot tier: a bounded in-memory cache of recent and read records.

Bounded by entries and by bytes, least recently used out first. It is filled
by projecting writes and by reads that fall through to L2 or L3; it is a
cache, so losing it loses nothing and a miss is only slower.

Bytes are counted by :func:`entry_bytes`: everything in a record that grows
with input (ciphertext, names, metadata) plus a fixed cost for the objects
around it, measured on CPython 3.11 and rounded up. Counting the ciphertext
alone would let records with large metadata or long keys slip past the bound.

The worker and the readers of one process share an instance; a lock keeps
the map and the byte count consistent when readers run in threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from projections.l2 import StoredRecord

#: Objects around one cached record: the record itself, its map key, the
#: ordered-dict node, and the headers of its bytes and str values.
_PER_ENTRY = 800
#: One metadata item: the dict slot and two str headers.
_PER_META_ITEM = 120


def entry_bytes(record: StoredRecord) -> int:
    """The bytes one cached record is counted for against the L1 bound."""
    # One joined string: most names are ASCII, where the length is the byte
    # count, and one check over all of them is cheaper than six.
    names = "".join(
        (
            record.tenant,
            record.key,
            record.cls,
            record.agent,
            record.event_id,
            record.key_id or "",
        )
    )
    size = _PER_ENTRY + _utf8_len(names) + len(record.ciphertext or b"")
    size += len(record.nonce or b"") + len(record.content_hash or b"")
    if record.metadata:
        size += sum(
            _utf8_len(k) + _utf8_len(v) + _PER_META_ITEM
            for k, v in record.metadata.items()
        )
    return size


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass
class L1Stats:
    """Counters an operator watches: hits, misses, evictions, refusals."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    #: Records larger than the whole byte bound, never cached.
    oversized: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over lookups, 0.0 before the first lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class L1Cache:
    """An LRU map of (tenant, key) to the record's current version.

    The pair is the map key, so a lookup never resolves to another tenant's
    record whatever characters the key holds.
    """

    name = "l1"

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("L1 bounds must not be negative")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = L1Stats()
        self._items: OrderedDict[tuple[str, str], tuple[StoredRecord, int]] = (
            OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes held, as counted by :func:`entry_bytes`."""
        return self._bytes

    def get(self, tenant: str, key: str) -> StoredRecord | None:
        """The cached record, marking it recently used; None on a miss."""
        ident = (tenant, key)
        with self._lock:
            item = self._items.get(ident)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(ident)
            self.stats.hits += 1
            return item[0]

    def peek(self, tenant: str, key: str) -> StoredRecord | None:
        """The cached record without counting a lookup or refreshing it."""
        item = self._items.get((tenant, key))
        return item[0] if item is not None else None

    def put(self, record: StoredRecord) -> bool:
        """Cache a live record, then evict least recently used ones to fit.

        A record older than the cached version of its key is ignored (a read
        that raced a newer write), and so is a deleted one. Returns whether
        the record is now cached.
        """
        if record.deleted:
            return False
        ident = (record.tenant, record.key)
        size = entry_bytes(record)
        with self._lock:
            old = self._items.get(ident)
            if old is not None and old[0].version > record.version:
                return False
            if old is not None:
                del self._items[ident]
                self._bytes -= old[1]
            if size > self.max_bytes or self.max_entries == 0:
                self.stats.oversized += 1
                return False
            self._items[ident] = (record, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self.stats.evictions += 1
            return True

    def discard(self, tenant: str, key: str) -> None:
        """Forget one key."""
        with self._lock:
            item = self._items.pop((tenant, key), None)
            if item is not None:
                self._bytes -= item[1]

    def discard_tenant(self, tenant: str) -> int:
        """Forget every key of a tenant; return how many were dropped."""
        with self._lock:
            doomed = [ident for ident in self._items if ident[0] == tenant]
            for ident in doomed:
                self._bytes -= self._items.pop(ident)[1]
            return len(doomed)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
