"""L1: bounds by entries and bytes, LRU order, stale and oversized records."""

from __future__ import annotations

import random
import sys
from itertools import count

from projections.l1 import L1Cache, entry_bytes
from projections.l2 import StoredRecord

_ids = count()


def rec(
    tenant: str,
    key: str,
    size: int,
    *,
    version: int = 1,
    metadata: dict[str, str] | None = None,
    deleted: bool = False,
) -> StoredRecord:
    return StoredRecord(
        tenant=tenant,
        key=key,
        version=version,
        deleted=deleted,
        cls="chat",
        updated_ms=1,
        partition=0,
        offset=version,
        tier="l2",
        event_id=f"{next(_ids):032x}",
        agent="agent",
        key_id="k",
        key_version=1,
        nonce=bytes(12),
        ciphertext=bytes(size),
        content_hash=bytes(32),
        metadata=metadata or {},
    )


def test_byte_bound_holds_under_100k_writes_of_mixed_sizes() -> None:
    """100,000 writes of sizes from 0 to 64 KiB, rewrites and stale versions
    included: the counted bytes never pass the bound, the count matches what
    is held, and the memory really held stays within the bound."""
    max_bytes = 8 * 1024 * 1024
    cache = L1Cache(max_entries=50_000, max_bytes=max_bytes)
    rng = random.Random(11)
    sizes = [0, 1, 100, 1_000, 4_000, 16_000, 64_000]
    versions: dict[str, int] = {}
    peak_counted = 0
    for i in range(100_000):
        key = f"agent-{rng.randrange(5_000)}/memo"
        versions[key] = versions.get(key, 0) + 1
        version = versions[key] - (1 if i % 17 == 0 else 0)  # some stale puts
        meta = {"note": "x" * rng.randrange(200)} if i % 3 == 0 else None
        cache.put(
            rec(
                f"t{i % 4}",
                key,
                rng.choice(sizes) + rng.randrange(50),
                version=version,
                metadata=meta,
            )
        )
        peak_counted = max(peak_counted, cache.bytes)
        if i % 10_000 == 0:
            assert cache.bytes <= max_bytes
    assert peak_counted <= max_bytes
    assert cache.bytes == sum(entry_bytes(r) for r in _records(cache))
    held = _deep_bytes(cache)
    assert held <= cache.bytes, f"{held} bytes held, {cache.bytes} counted"
    assert cache.stats.evictions > 10_000
    assert len(cache) <= 50_000


def test_entry_bound_and_lru_order() -> None:
    """The least recently used record goes first; a get refreshes a record."""
    cache = L1Cache(max_entries=3, max_bytes=1 << 30)
    for key in "abc":
        cache.put(rec("t", key, 10))
    assert cache.get("t", "a") is not None
    cache.put(rec("t", "d", 10))
    assert [r.key for r in _records(cache)] == ["c", "a", "d"]
    assert cache.peek("t", "b") is None
    assert cache.stats.evictions == 1
    assert cache.stats.hits == 1


def test_stale_deleted_and_oversized_records_are_not_cached() -> None:
    """An older version never replaces a newer one; deleted and oversized
    records are refused, and an oversized rewrite drops the old version."""
    cache = L1Cache(max_entries=10, max_bytes=5_000)
    assert cache.put(rec("t", "k", 10, version=2))
    assert not cache.put(rec("t", "k", 10, version=1))
    assert cache.peek("t", "k").version == 2  # type: ignore[union-attr]
    assert not cache.put(rec("t", "d", 10, deleted=True))
    assert not cache.put(rec("t", "k", 10_000, version=3))
    assert cache.peek("t", "k") is None
    assert cache.bytes == 0
    assert cache.stats.oversized == 1


def test_metadata_and_names_count_against_the_bound() -> None:
    """A record's metadata and key count, not just its ciphertext."""
    small = entry_bytes(rec("t", "k", 0))
    heavy = entry_bytes(rec("t", "k" * 1000, 0, metadata={"m": "v" * 10_000}))
    assert heavy - small >= 11_000


def test_tenants_are_separate_and_discard_tenant_forgets_one() -> None:
    """The same key under two tenants is two records; erasure drops one tenant."""
    cache = L1Cache(max_entries=10, max_bytes=1 << 20)
    cache.put(rec("acme", "k", 1))
    cache.put(rec("acme-", "k", 2))
    cache.put(rec("acme", "j", 3))
    assert cache.get("acme-", "k").ciphertext == bytes(2)  # type: ignore[union-attr]
    assert cache.discard_tenant("acme") == 2
    assert cache.get("acme", "k") is None
    assert len(cache) == 1
    assert cache.bytes == entry_bytes(rec("acme-", "k", 2))
    assert cache.stats.hit_rate == 0.5
    cache.clear()
    assert (len(cache), cache.bytes) == (0, 0)


def test_zero_bounds_cache_nothing() -> None:
    """A cache configured to zero entries or bytes stays empty."""
    for cache in (L1Cache(0, 1 << 20), L1Cache(10, 0)):
        assert not cache.put(rec("t", "k", 1))
        assert len(cache) == 0


def _records(cache: L1Cache) -> list[StoredRecord]:
    return [r for r, _ in cache._items.values()]


def _deep_bytes(cache: L1Cache) -> int:
    """Memory the cache's entries hold: every distinct object reachable from
    them, plus the ordered dict's per-entry node (about 100 bytes)."""
    seen: set[int] = set()
    total = sys.getsizeof(cache._items)

    def add(obj: object) -> None:
        nonlocal total
        if id(obj) in seen:
            return
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            for k, v in obj.items():
                add(k)
                add(v)
        elif isinstance(obj, tuple):
            for item in obj:
                add(item)

    for ident, (record, size) in cache._items.items():
        total += 100
        add(ident)
        add(size)
        for name in StoredRecord.__slots__:
            add(getattr(record, name))
        add(record)
    return total
