"""L3 without a broker: frames, exactly-once appends, sealing, compaction, erasure.

Events are applied the way the worker applies them (L2 first, then L3 with
L2's outcomes) to stores in a temporary data dir. Payloads here are opaque
bytes standing in for ciphertext: L3 never decrypts.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

from projections.base import Envelope
from projections.l2 import L2Projection, L2Reader
from projections.l3 import (
    L3Options,
    L3Projection,
    L3Reader,
    decode_record,
    encode_record,
    iter_frames,
    l3_digest,
    open_frame,
    seal_frame,
    verify_l3,
)
from schemas.events import (
    Event,
    MemoryDeleted,
    MemoryReencrypted,
    MemoryTiered,
    MemoryWritten,
    TenantErased,
)
from strata.errors import StoreError
from strata.paths import StorePaths


def written(
    tenant: str, key: str, payload: bytes, *, cls: str = "chat"
) -> MemoryWritten:
    return MemoryWritten(
        event_id=uuid.uuid4().hex,
        tenant=tenant,
        key=key,
        cls=cls,
        agent="a",
        time_ms=1_000,
        key_id=f"{tenant}-k",
        key_version=1,
        nonce=os.urandom(12),
        ciphertext=payload,
        content_hash=hashlib.sha256(payload).digest(),
        metadata={"lang": "en"},
    )


def tiered(
    tenant: str, key: str, version: int, frm: str = "l2", to: str = "l3"
) -> MemoryTiered:
    return MemoryTiered(
        event_id=uuid.uuid4().hex,
        tenant=tenant,
        key=key,
        version=version,
        from_tier=frm,
        to_tier=to,
        reason="test",
        time_ms=2_000,
    )


class Stores:
    """An L2 and an L3 in one data dir, fed like the worker feeds them."""

    def __init__(self, root: Path, options: L3Options | None = None) -> None:
        self.paths = StorePaths(root)
        self.l2 = L2Projection(self.paths.l2_db, synchronous="OFF")
        self.l3 = L3Projection(self.paths, options or L3Options(synchronous="OFF"))
        self.reader = L3Reader(self.paths.l3)

    async def apply(
        self, partition: int, batch: Sequence[tuple[int, Any]], *, l3: bool = True
    ) -> int:
        envelopes = [Envelope(partition, off, ev, b"h", 1) for off, ev in batch]
        next_offset = batch[-1][0] + 1
        outcomes = self.l2.apply(partition, envelopes, next_offset)
        if not l3:
            return 0
        return await self.l3.apply(partition, envelopes, outcomes, next_offset)

    def close(self) -> None:
        self.l2.close()
        self.l3.close()
        self.reader.close()


class Log:
    """Events per partition with their offsets."""

    def __init__(self) -> None:
        self.events: dict[int, list[tuple[int, Event]]] = {}

    def add(self, partition: int, event: Event) -> int:
        events = self.events.setdefault(partition, [])
        events.append((len(events), event))
        return len(events) - 1

    async def feed(
        self, stores: Stores, *, batch: int, order: list[int] | None = None
    ) -> None:
        for partition in order or sorted(self.events):
            events = self.events[partition]
            for start in range(0, len(events), batch):
                await stores.apply(partition, events[start : start + batch])


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    s = Stores(tmp_path / "data")
    yield s
    s.close()


def test_frame_round_trip_is_byte_identical() -> None:
    """A record encoded, compressed, framed and read back equals the original."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    record = decode_record(encode_record(_stored("t", "k/é/😀", b"\x00\xff" * 500)))
    frame = seal_frame(encode_record(record), compressor)
    back = decode_record(open_frame(frame, "test"))
    assert back == record
    assert back.ciphertext == b"\x00\xff" * 500
    assert len(frame) < 500, "repetitive bytes should compress"


def test_damaged_frame_is_refused() -> None:
    """One flipped bit anywhere in a frame is caught before it is decoded."""
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    frame = bytearray(
        seal_frame(encode_record(_stored("t", "k", os.urandom(64))), compressor)
    )
    for index in (0, 5, 20, len(frame) - 1):
        damaged = bytearray(frame)
        damaged[index] ^= 0x01
        with pytest.raises(StoreError):
            open_frame(bytes(damaged), "test")


async def test_moved_record_is_archived_byte_identical(stores: Stores) -> None:
    """L3 holds exactly L2's version of a moved record, found through the index."""
    log = Log()
    payloads = {f"k{i}": os.urandom(100 + i * 37) for i in range(6)}
    for key, payload in payloads.items():
        log.add(0, written("acme", key, payload))
    for key in ("k1", "k3", "k5"):
        log.add(0, tiered("acme", key, 1))
    await log.feed(stores, batch=4)

    l2 = L2Reader(stores.paths.l2_db)
    assert l2.counts() == {"l2": 3, "l3": 3}
    for key in ("k1", "k3", "k5"):
        archived = stores.reader.get("acme", key)
        assert archived is not None
        assert archived.ciphertext == payloads[key]
        assert archived.tier == "l3"
        original = l2.version_payload("acme", key, 1)
        assert original is not None
        fields = ("event_id", "nonce", "content_hash", "key_version", "metadata", "cls")
        assert all(getattr(archived, f) == getattr(original, f) for f in fields)
    assert stores.reader.get("acme", "k0") is None
    assert stores.reader.get("other", "k1") is None
    assert verify_l3(stores.paths.l3).ok
    l2.close()


async def test_replayed_batch_changes_nothing(stores: Stores) -> None:
    """A batch offered again (a crash before the worker's commit) applies once."""
    batch = [(0, written("acme", "a", b"x" * 50)), (1, tiered("acme", "a", 1))]
    assert await stores.apply(0, batch) == 1
    sizes = _segment_sizes(stores.paths)
    digest = l3_digest(stores.paths.l3)
    assert await stores.apply(0, batch) == 0
    assert _segment_sizes(stores.paths) == sizes
    assert l3_digest(stores.paths.l3) == digest


async def test_uncommitted_tail_is_cut_before_the_next_append(stores: Stores) -> None:
    """Bytes a dead worker appended past the committed size are discarded."""
    await stores.apply(
        0, [(0, written("acme", "a", b"a")), (1, tiered("acme", "a", 1))]
    )
    (segment,) = (stores.paths.l3 / "segments").iterdir()
    committed = segment.stat().st_size
    with segment.open("ab") as out:
        out.write(b"half a frame from a batch that never committed")
    await stores.apply(
        0, [(2, written("acme", "b", b"b")), (3, tiered("acme", "b", 1))]
    )
    positions = [pos for pos, _ in iter_frames(segment)]
    assert positions == [0, committed]
    assert stores.reader.get("acme", "b") is not None
    assert verify_l3(stores.paths.l3).ok


async def test_orphan_segment_from_a_dead_compaction_is_removed(tmp_path: Path) -> None:
    """A segment file the index does not name is removed by the next writer."""
    first = Stores(tmp_path / "data")
    await first.apply(0, [(0, written("acme", "a", b"a")), (1, tiered("acme", "a", 1))])
    first.close()
    orphan = tmp_path / "data" / "l3" / "segments" / "p00000-00000099.seg"
    orphan.write_bytes(b"left behind")
    assert verify_l3(tmp_path / "data" / "l3").orphans == [orphan.name]
    second = Stores(tmp_path / "data")
    await second.apply(0, [(2, written("acme", "b", b"b"))])
    assert not orphan.exists()
    second.close()


async def test_segments_seal_at_their_limit_and_verify(tmp_path: Path) -> None:
    """Full segments are sealed read-only with a checksum that catches tampering."""
    stores = Stores(
        tmp_path / "data", L3Options(segment_max_bytes=4096, synchronous="OFF")
    )
    log = Log()
    for i in range(12):
        log.add(0, written("acme", f"k{i}", os.urandom(1500)))
        log.add(0, tiered("acme", f"k{i}", 1))
    await log.feed(stores, batch=5)
    stats = stores.reader.stats()
    assert stats.records == 12
    assert stats.sealed >= 3
    assert stats.segments - stats.sealed <= 1  # at most one open segment
    sealed = sorted((tmp_path / "data" / "l3" / "segments").iterdir())[0]
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o444
    assert verify_l3(stores.paths.l3).ok

    sealed.chmod(0o644)
    data = bytearray(sealed.read_bytes())
    data[60] ^= 0xFF
    sealed.write_bytes(bytes(data))
    report = verify_l3(stores.paths.l3)
    assert not report.ok
    assert any(sealed.name in finding for finding in report.findings)
    with pytest.raises(StoreError, match="checksum"):
        stores.reader.get("acme", "k0")
    stores.close()


async def test_compaction_reclaims_mostly_dead_segments(tmp_path: Path) -> None:
    """Promoting most records kills their frames; compaction rewrites the
    segments, keeps every live record readable and the digest unchanged."""
    options = L3Options(
        segment_max_bytes=4096, compact_dead_ratio=0.5, synchronous="OFF"
    )
    stores = Stores(tmp_path / "a", options)
    log = Log()
    payloads = {f"k{i}": os.urandom(1000) for i in range(20)}
    for key, payload in payloads.items():
        log.add(0, written("acme", key, payload))
        log.add(0, tiered("acme", key, 1))
    for i in range(20):
        if i % 5:
            log.add(0, tiered("acme", f"k{i}", 1, frm="l3", to="l2"))
    before = None
    for start in range(0, len(log.events[0]), 7):
        await stores.apply(0, log.events[0][start : start + 7])
        if start == 35:
            before = stores.reader.stats()
    after = stores.reader.stats()
    assert before is not None
    assert after.records == 4
    assert after.bytes < before.bytes / 2
    assert after.dead_bytes < after.bytes / 2 + 4096
    for i in range(0, 20, 5):
        archived = stores.reader.get("acme", f"k{i}")
        assert archived is not None
        assert archived.ciphertext == payloads[f"k{i}"]
    assert verify_l3(stores.paths.l3).ok

    # The same log without compaction (one big segment) holds the same records.
    plain = Stores(tmp_path / "b")
    await log.feed(plain, batch=1000)
    assert l3_digest(stores.paths.l3) == l3_digest(plain.paths.l3)
    stores.close()
    plain.close()


async def test_digest_ignores_batching_and_partition_order(tmp_path: Path) -> None:
    """Two data dirs fed the same log in different batches and partition orders
    reach equal L2 and L3 digests (rebuild equals live)."""
    rng = random.Random(3)
    log = Log()
    versions: dict[tuple[int, str], int] = {}
    tiers: dict[tuple[int, str], str] = {}
    for _ in range(300):
        partition = rng.randrange(3)
        key = f"k{rng.randrange(12)}"
        ident = (partition, key)
        roll = rng.random()
        if roll < 0.5 or ident not in versions:
            log.add(
                partition,
                written(f"t{partition}", key, os.urandom(rng.randrange(10, 400))),
            )
            versions[ident] = versions.get(ident, 0) + 1
            tiers[ident] = "l2"
        elif roll < 0.8:
            to = "l3" if tiers[ident] == "l2" else "l2"
            log.add(
                partition,
                tiered(f"t{partition}", key, versions[ident], tiers[ident], to),
            )
            tiers[ident] = to
        else:
            log.add(partition, tiered(f"t{partition}", key, versions[ident] - 1))
    small = Stores(
        tmp_path / "small", L3Options(segment_max_bytes=4096, synchronous="OFF")
    )
    large = Stores(tmp_path / "large")
    await log.feed(small, batch=3, order=[2, 0, 1])
    await log.feed(large, batch=500)
    assert small.reader.stats().records == sum(1 for t in tiers.values() if t == "l3")
    assert l3_digest(small.paths.l3) == l3_digest(large.paths.l3)
    assert L2Reader(small.paths.l2_db).digest() == L2Reader(large.paths.l2_db).digest()
    small.close()
    large.close()


async def test_l3_rebuilt_alone_reads_payloads_from_l2(tmp_path: Path) -> None:
    """Dropping L3 and replaying the log into it alone (L2 already at the end)
    restores the same archive: L2 kept every moved payload."""
    stores = Stores(tmp_path / "data")
    log = Log()
    for i in range(8):
        log.add(1, written("acme", f"k{i}", os.urandom(200)))
        log.add(1, tiered("acme", f"k{i}", 1))
    log.add(1, written("acme", "k0", b"rewritten"))
    log.add(1, tiered("acme", "k1", 1, frm="l3", to="l2"))
    await log.feed(stores, batch=4)
    live = l3_digest(stores.paths.l3)
    stores.close()

    shutil.rmtree(stores.paths.l3)
    rebuilt = Stores(tmp_path / "data")
    events = log.events[1]
    envelopes = [Envelope(1, off, ev, b"h", 1) for off, ev in events]
    outcomes = rebuilt.l2.apply(1, envelopes, len(events))  # below L2's checkpoint
    assert await rebuilt.l3.apply(1, envelopes, outcomes, len(events)) == 10
    assert l3_digest(rebuilt.paths.l3) == live
    assert rebuilt.reader.stats().records == 6
    rebuilt.close()


async def test_killed_between_l2_and_l3_loses_nothing(stores: Stores) -> None:
    """L2 committed a move, L3 did not: the batch offered again is archived."""
    batch = [(0, written("acme", "a", b"payload")), (1, tiered("acme", "a", 1))]
    await stores.apply(0, batch, l3=False)
    assert stores.reader.get("acme", "a") is None
    assert stores.l3.checkpoint(0) == 0
    await stores.apply(0, batch)
    archived = stores.reader.get("acme", "a")
    assert archived is not None
    assert archived.ciphertext == b"payload"


async def test_rewrite_delete_and_promotion_release_the_archived_copy(
    stores: Stores,
) -> None:
    """A new write, a delete or a promotion makes the archived frame dead."""
    log = Log()
    for key in ("w", "d", "p"):
        log.add(0, written("acme", key, b"v1"))
        log.add(0, tiered("acme", key, 1))
    log.add(0, written("acme", "w", b"v2"))
    log.add(0, MemoryDeleted(uuid.uuid4().hex, "acme", "d", "a", 3_000))
    log.add(0, tiered("acme", "p", 1, frm="l3", to="l2"))
    await log.feed(stores, batch=2)
    assert stores.reader.stats().records == 0
    assert L2Reader(stores.paths.l2_db).counts() == {"l2": 2}


async def test_reencryption_replaces_the_archived_copy(stores: Stores) -> None:
    """A re-encrypted version is re-archived, so L3 never pins an old key."""
    first = written("acme", "a", b"old ciphertext")
    await stores.apply(0, [(0, first), (1, tiered("acme", "a", 1))])
    again = MemoryReencrypted(
        event_id=uuid.uuid4().hex,
        tenant="acme",
        key="a",
        version=1,
        source_event_id=first.event_id,
        key_id="acme-k",
        key_version=2,
        nonce=os.urandom(12),
        ciphertext=b"new ciphertext",
        content_hash=first.content_hash,
        time_ms=5_000,
        job_id="rotate-1",
    )
    assert await stores.apply(0, [(2, again)]) == 1
    archived = stores.reader.get("acme", "a")
    assert archived is not None
    assert (archived.ciphertext, archived.key_version) == (b"new ciphertext", 2)
    assert stores.reader.key_versions("acme") == {2}


async def test_stale_or_impossible_moves_are_rejected(stores: Stores) -> None:
    """L2 refuses moves of another version, from the wrong tier, to a tier that
    is not durable, or of a deleted key; L3 does not act on them."""
    log = Log()
    log.add(0, written("acme", "a", b"1"))
    log.add(0, written("acme", "a", b"2"))
    log.add(0, tiered("acme", "a", 1))  # stale version
    log.add(0, tiered("acme", "a", 2, frm="l3", to="l2"))  # not in l3
    log.add(0, tiered("acme", "a", 2, to="l1"))  # l1 is a cache
    log.add(0, tiered("acme", "a", 2))
    log.add(0, tiered("acme", "a", 2))  # a second job run's repeat
    log.add(0, MemoryDeleted(uuid.uuid4().hex, "acme", "a", "a", 3_000))
    log.add(0, tiered("acme", "a", 3))  # deleted
    await log.feed(stores, batch=100)
    actions = [
        (r.action, r.reason) for r in L2Reader(stores.paths.l2_db).history("acme", "a")
    ]
    assert [a for a, _ in actions] == [
        "written", "written", "rejected", "rejected", "rejected",
        "tiered", "rejected", "deleted", "rejected",
    ]  # fmt: skip
    assert "record is in l3" in actions[6][1]
    assert stores.reader.stats().records == 0


async def test_erasure_drops_and_purges_the_tenant(tmp_path: Path) -> None:
    """After an erasure, no segment holds a frame of the tenant (live or dead),
    and the other tenant's archive is intact."""
    stores = Stores(
        tmp_path / "data", L3Options(segment_max_bytes=4096, synchronous="OFF")
    )
    log = Log()
    for i in range(6):
        for tenant in ("gone", "kept"):
            log.add(i % 2, written(tenant, f"k{i}", os.urandom(700)))
            log.add(i % 2, tiered(tenant, f"k{i}", 1))
    log.add(0, tiered("gone", "k0", 1, frm="l3", to="l2"))  # a dead frame of "gone"
    log.add(0, TenantErased(uuid.uuid4().hex, "gone", 9_000))
    await log.feed(stores, batch=5, order=[1, 0])
    await stores.l3.compact(1)  # the other partition's segments are compacted too

    tenants = set()
    for segment in (tmp_path / "data" / "l3" / "segments").iterdir():
        for pos, frame in iter_frames(segment):
            tenants.add(
                decode_record(open_frame(frame, f"{segment.name}@{pos}")).tenant
            )
    assert tenants == {"kept"}
    assert stores.reader.stats().records == 6
    assert stores.reader.get("gone", "k1") is None
    assert verify_l3(stores.paths.l3).ok
    stores.close()


def _stored(tenant: str, key: str, payload: bytes):  # type: ignore[no-untyped-def]
    from projections.l2 import StoredRecord

    return StoredRecord(
        tenant=tenant,
        key=key,
        version=3,
        deleted=False,
        cls="chat",
        updated_ms=123,
        partition=2,
        offset=77,
        tier="l2",
        event_id="e1",
        agent="agent",
        key_id="kid",
        key_version=4,
        nonce=os.urandom(12),
        ciphertext=payload,
        content_hash=os.urandom(32),
        metadata={"a": "b", "ключ": "значение"},
    )


def _segment_sizes(paths: StorePaths) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (paths.l3 / "segments").iterdir()}


async def test_segment_names_are_never_reused(tmp_path: Path) -> None:
    """After compaction deletes the newest segment, the next one gets a new
    name, so a reader holding an old location cannot land in another file."""
    stores = Stores(
        tmp_path / "data", L3Options(segment_max_bytes=4096, synchronous="OFF")
    )
    segments = tmp_path / "data" / "l3" / "segments"
    await stores.apply(
        0, [(0, written("acme", "a", os.urandom(5000))), (1, tiered("acme", "a", 1))]
    )
    assert [p.name for p in segments.iterdir()] == ["p00000-00000001.seg"]
    await stores.apply(0, [(2, tiered("acme", "a", 1, frm="l3", to="l2"))])
    assert list(segments.iterdir()) == [], "a sealed, fully dead segment is removed"
    await stores.apply(
        0, [(3, written("acme", "b", b"b")), (4, tiered("acme", "b", 1))]
    )
    assert [p.name for p in segments.iterdir()] == ["p00000-00000002.seg"]
    stores.close()


async def test_death_between_fsync_and_index_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames written and fsynced, then the worker dies before the index
    transaction: a new worker's replay ends where an uninterrupted one does."""
    options = L3Options(segment_max_bytes=4096, synchronous="OFF")
    log = Log()
    for i in range(6):
        log.add(0, written("acme", f"k{i}", os.urandom(1500)))
    first, second = log.events[0][:], []
    for i in range(6):
        second.append((6 + i, tiered("acme", f"k{i}", 1)))

    clean = Stores(tmp_path / "clean", options)
    await clean.apply(0, first)
    await clean.apply(0, second)

    crashed = Stores(tmp_path / "crashed", options)
    await crashed.apply(0, first)

    def die(*_: object) -> int:
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(L3Projection, "_record", die)
        with pytest.raises(SystemExit):
            await crashed.apply(0, second)
    segments = tmp_path / "crashed" / "l3" / "segments"
    assert sum(p.stat().st_size for p in segments.iterdir()) > 6 * 1500 * 0.9
    assert crashed.l3.checkpoint(0) == 6
    crashed.close()

    restarted = Stores(tmp_path / "crashed", options)
    envelopes = [Envelope(0, off, ev, b"h", 1) for off, ev in second]
    outcomes = restarted.l2.apply(0, envelopes, 12)  # L2 had committed
    assert await restarted.l3.apply(0, envelopes, outcomes, 12) == 6
    assert l3_digest(restarted.paths.l3) == l3_digest(clean.paths.l3)
    assert _segment_sizes(restarted.paths) == _segment_sizes(clean.paths)
    assert verify_l3(restarted.paths.l3).ok
    restarted.close()
    clean.close()
