"""L3, the cold tier: compressed append-only archive segments with an index.

Layout of ``<data dir>/l3``::

    index.db                        SQLite: checkpoints, segments, entries,
                                    tenants per segment, erased tenants
    segments/pPPPPP-SSSSSSSS.seg    frames of partition P, in append order
    locks/pPPPPP.lock               one writer per partition across processes

A frame holds one archived record version::

    b"SL3F" | body length (u32, big-endian) | SHA-256 of the body | body

The body is a zstandard frame, with its own content checksum, of
``header length (u32) | header | ciphertext``. The header is JSON with sorted
keys (tenant, key, version, class, agent, write time, log position, event id,
key id and version, nonce, content hash, metadata); the ciphertext is kept as
the producer sealed it, so a record read from L3 decrypts to exactly the bytes
that were written. Ciphertext does not compress; headers do. The index maps
(tenant, key) to (segment, position, length), so one record is read with one
positioned read, without scanning.

Each partition appends to one open segment. Once that reaches
``l3_segment_max_bytes`` it is sealed: its SHA-256 goes into the index, the
file is made read-only and never changes again. A sealed segment whose bytes
are mostly dead (records promoted, rewritten, deleted, erased) is compacted:
its live frames are copied into the open segment, the index is repointed in
one transaction, and only then is the old file removed.

Exactly once: a batch's frames are appended and fsynced first, then one
SQLite transaction records the entries, the segment sizes and the partition's
checkpoint. The index is the truth and files may only hold more than it says:
bytes past a segment's recorded size (a worker died before its transaction)
are cut off before the next append, and segment files the index does not name
(a compaction died after its transaction) are removed.

Moving a record out of L2. L3 applies a batch after L2 has committed it and
copies the moved version from L2's history; L2 keeps its copy. So:

- a worker killed between L2's commit and L3's offers the batch again, and L3
  finds the payload where it was;
- L3 dropped and rebuilt alone re-reads every moved payload from L2, and L2
  rebuilt alone never needed L3;
- a promotion back to L2 changes the tier only, so it cannot lose a byte.

Reads of a record in L3 are served from L3, and L2's copy answers when L3
cannot (not applied yet, a frame that fails its checksum). Dropping L2's copy
would need a payload source outliving both stores for an L3 rebuilt alone:
the memory topic. Followers are built from a data dir alone and cannot read
the topic, so L2 keeps the ciphertext until they can.

Read statistics (:class:`ReadStats`). Reads happen in other processes, so when
a record was last read and how often an archived record is read live in
``l2/reads.db`` beside L2, written by readers and read by the tiering job.
They are advisory: not a projection and in no digest. The job's decisions
become MemoryTiered events, and those are what replays and rebuilds see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import structlog
import zstandard

from projections.base import Envelope, Outcome
from projections.l2 import L2Reader, StoredRecord
from projections.sqlite import open_database
from schemas.events import MemoryReencrypted, MemoryTiered, TenantErased
from strata.config import Settings
from strata.errors import StoreError
from strata.locks import file_lock
from strata.paths import StorePaths

log = structlog.get_logger(__name__)

MAGIC = b"SL3F"
_HEAD = struct.Struct(">4sI32s")
_U32 = struct.Struct(">I")

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    name       TEXT PRIMARY KEY,
    partition  INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    live_bytes INTEGER NOT NULL DEFAULT 0,
    sealed     INTEGER NOT NULL DEFAULT 0,
    sha256     TEXT,
    purge      INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS segments_seq ON segments (partition, seq);
CREATE TABLE IF NOT EXISTS sequences (
    partition INTEGER PRIMARY KEY,
    last_seq  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    tenant      TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     INTEGER NOT NULL,
    segment     TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    length      INTEGER NOT NULL,
    body_sha256 BLOB NOT NULL,
    key_version INTEGER,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_segment ON entries (segment);
CREATE TABLE IF NOT EXISTS tenants_in (
    segment TEXT NOT NULL,
    tenant  TEXT NOT NULL,
    PRIMARY KEY (segment, tenant)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tenants_in_tenant ON tenants_in (tenant);
CREATE TABLE IF NOT EXISTS erased (
    tenant TEXT PRIMARY KEY
);
"""


# -- frames --------------------------------------------------------------------


def encode_record(record: StoredRecord) -> bytes:
    """The uncompressed body of a frame: header length, JSON header, ciphertext.

    Raises:
        ValueError: the record carries no payload.
    """
    if record.ciphertext is None or record.nonce is None:
        raise ValueError(f"{record.tenant}/{record.key} v{record.version}: no payload")
    header = {
        "tenant": record.tenant,
        "key": record.key,
        "version": record.version,
        "cls": record.cls,
        "agent": record.agent,
        "updated_ms": record.updated_ms,
        "partition": record.partition,
        "offset": record.offset,
        "event_id": record.event_id,
        "key_id": record.key_id,
        "key_version": record.key_version,
        "nonce": record.nonce.hex(),
        "content_hash": record.content_hash.hex() if record.content_hash else None,
        "metadata": record.metadata,
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _U32.pack(len(text)) + text + record.ciphertext


def decode_record(body: bytes) -> StoredRecord:
    """The record a frame body holds, as L3 serves it (tier ``l3``).

    Raises:
        StoreError: the body is not a record.
    """
    try:
        (length,) = _U32.unpack_from(body)
        header: dict[str, Any] = json.loads(body[4 : 4 + length])
        content_hash = header["content_hash"]
        return StoredRecord(
            tenant=header["tenant"],
            key=header["key"],
            version=int(header["version"]),
            deleted=False,
            cls=header["cls"],
            updated_ms=int(header["updated_ms"]),
            partition=int(header["partition"]),
            offset=int(header["offset"]),
            tier="l3",
            event_id=header["event_id"],
            agent=header["agent"],
            key_id=header["key_id"],
            key_version=header["key_version"],
            nonce=bytes.fromhex(header["nonce"]),
            ciphertext=bytes(body[4 + length :]),
            content_hash=bytes.fromhex(content_hash) if content_hash else None,
            metadata=dict(header["metadata"]),
        )
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"L3 frame body is not a record: {exc}") from exc


def seal_frame(body: bytes, compressor: zstandard.ZstdCompressor) -> bytes:
    """Compress a body and wrap it in a checksummed frame."""
    packed = compressor.compress(body)
    return _HEAD.pack(MAGIC, len(packed), hashlib.sha256(packed).digest()) + packed


def open_frame(frame: bytes, where: str) -> bytes:
    """The body of one frame, after checking its magic, length and checksums.

    Raises:
        StoreError: the frame is damaged; ``where`` says which one.
    """
    if len(frame) < _HEAD.size:
        raise StoreError(f"L3 {where}: frame truncated to {len(frame)} bytes")
    magic, length, digest = _HEAD.unpack_from(frame)
    packed = frame[_HEAD.size :]
    if magic != MAGIC or length != len(packed):
        raise StoreError(f"L3 {where}: not a frame (bad magic or length)")
    if hashlib.sha256(packed).digest() != digest:
        raise StoreError(f"L3 {where}: frame fails its checksum")
    try:
        return zstandard.ZstdDecompressor().decompress(packed)
    except zstandard.ZstdError as exc:
        raise StoreError(f"L3 {where}: frame does not decompress: {exc}") from exc


def iter_frames(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (position, frame) for every whole frame of a segment file, in order.

    Stops at the first bytes that do not start a frame (an uncommitted tail).
    """
    data = path.read_bytes()
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, length, _ = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic != MAGIC or end > len(data):
            return
        yield pos, data[pos:end]
        pos = end


def segment_name(partition: int, seq: int) -> str:
    """The file name of a partition's ``seq``-th segment."""
    return f"p{partition:05d}-{seq:08d}.seg"


def _read_at(path: Path, pos: int, length: int) -> bytes:
    with path.open("rb") as src:
        data = os.pread(src.fileno(), length, pos)
    if len(data) != length:
        raise StoreError(f"L3 {path.name}@{pos}: segment ends inside a frame")
    return data


def _file_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                raise StoreError(f"L3 {path.name}: shorter than its {size} bytes")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- index ---------------------------------------------------------------------


def connect_index(
    path: Path, *, synchronous: str = "FULL", readonly: bool = False
) -> sqlite3.Connection:
    """Open the L3 index.

    Raises:
        StoreError: it cannot be opened or created.
    """
    return open_database(
        path, INDEX_SCHEMA, what="L3 index", synchronous=synchronous, readonly=readonly
    )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, where: Path) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"L3 index {where}: cannot begin a write: {exc}") from exc
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"L3 index {where}: write failed: {exc}") from exc
        raise


def _checkpoint(db: sqlite3.Connection, partition: int) -> int:
    row = db.execute(
        "SELECT next_offset FROM checkpoints WHERE partition = ?", (partition,)
    ).fetchone()
    return int(row[0]) if row else 0


# -- the projection ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class L3Options:
    """How L3 writes: segment size, compaction threshold, compression level."""

    segment_max_bytes: int = 64 * 1024 * 1024
    compact_dead_ratio: float = 0.5
    zstd_level: int = 3
    synchronous: str = "FULL"

    @classmethod
    def from_settings(cls, settings: Settings) -> L3Options:
        """The options a :class:`~strata.config.Settings` names."""
        return cls(
            segment_max_bytes=settings.l3_segment_max_bytes,
            compact_dead_ratio=settings.l3_compact_dead_ratio,
            zstd_level=settings.l3_zstd_level,
            synchronous=settings.sqlite_synchronous,
        )


@dataclass(frozen=True, slots=True)
class _Put:
    tenant: str
    key: str
    version: int
    frame: bytes
    body_sha256: bytes
    key_version: int | None
    #: Re-encryptions replace an entry only if it still holds this version.
    only_if_version: int | None = None


@dataclass(frozen=True, slots=True)
class _Drop:
    tenant: str
    key: str


@dataclass(frozen=True, slots=True)
class _DropTenant:
    tenant: str


_Op = _Put | _Drop | _DropTenant


@dataclass(slots=True)
class _Segment:
    name: str
    seq: int
    size: int
    new: bool
    frames: list[bytes] = field(default_factory=list)
    seal: bool = False
    sha256: str | None = None


@dataclass(slots=True)
class _Appended:
    """Where a list of frames went: segments touched and (segment, pos, length)."""

    segments: list[_Segment]
    placements: list[tuple[str, int, int]]


class L3Projection:
    """Archives records moved to L3, exactly once per offset and partition."""

    name = "l3"

    def __init__(self, paths: StorePaths, options: L3Options | None = None) -> None:
        self.paths = paths
        self.options = options or L3Options()
        self.directory = paths.l3
        self._segments = paths.l3 / "segments"
        self._locks = paths.l3 / "locks"
        self._index_path = paths.l3 / "index.db"
        self._db: sqlite3.Connection | None = None
        self._l2: L2Reader | None = None
        self._compressor = zstandard.ZstdCompressor(
            level=self.options.zstd_level, write_checksum=True
        )
        # Partitions whose segment folder was checked for orphans by this
        # process; a failure clears the mark so the next attempt checks again.
        self._checked: set[int] = set()

    def _index(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect_index(
                self._index_path, synchronous=self.options.synchronous
            )
        return self._db

    def _l2_reader(self) -> L2Reader:
        # Resolved per batch: a migration cutover switches the live L2 file.
        path = self.paths.l2_db
        if self._l2 is None or self._l2.path != path:
            if self._l2 is not None:
                self._l2.close()
            self._l2 = L2Reader(path)
        return self._l2

    def close(self) -> None:
        """Close the index and the L2 connection."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._l2 is not None:
            self._l2.close()
            self._l2 = None

    def checkpoint(self, partition: int) -> int:
        """The next offset of ``partition`` L3 has not applied."""
        if self._db is None and not self._index_path.exists():
            return 0
        return _checkpoint(self._index(), partition)

    async def apply(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> int:
        """Apply a batch after L2 and move the checkpoint to ``next_offset``.

        Returns how many events changed L3. Offsets below the checkpoint and
        events L2 did not accept change nothing.

        Raises:
            StoreError: L3 cannot be written; its checkpoint did not move.
        """
        try:
            async with self._locked(partition):
                used = await self._apply_locked(
                    partition, envelopes, outcomes, next_offset
                )
                await self._compact_quietly(partition)
                return used
        except StoreError:
            self._checked.discard(partition)
            raise
        except (OSError, sqlite3.Error) as exc:
            self._checked.discard(partition)
            raise StoreError(f"L3 {self.directory}: {exc}") from exc

    async def _apply_locked(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> int:
        db = self._index()
        done = _checkpoint(db, partition)
        if next_offset <= done:
            return 0
        await self._remove_orphans(partition)
        ops = self._plan(envelopes, outcomes, done)
        frames = [op.frame for op in ops if isinstance(op, _Put)]
        appended = await self._append(partition, frames)

        # A batch that changes nothing in L3 only moves the checkpoint: that
        # commit needs no sync of its own. Lost to a power cut, it takes the
        # checkpoint back over offsets that change nothing when replayed; the
        # next commit that does change something syncs it along (WAL order).
        relaxed = not ops and self.options.synchronous.upper() != "OFF"
        if relaxed:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            used = self._commit(db, partition, done, next_offset, ops, appended)
        finally:
            if relaxed:
                db.execute(f"PRAGMA synchronous={self.options.synchronous}")
        self._freeze(appended.segments)
        log.debug(
            "l3.applied",
            partition=partition,
            events=used,
            frames=len(frames),
            next_offset=next_offset,
        )
        return used

    def _commit(
        self,
        db: sqlite3.Connection,
        partition: int,
        done: int,
        next_offset: int,
        ops: list[_Op],
        appended: _Appended,
    ) -> int:
        with _transaction(db, self._index_path):
            if _checkpoint(db, partition) != done:
                # Only possible if the partition lock was bypassed; retrying
                # rereads the checkpoint and skips what is already applied.
                raise StoreError(
                    f"L3 partition {partition}: checkpoint changed during the batch"
                )
            self._save_segments(db, partition, appended.segments)
            used = self._record(db, ops, appended.placements)
            db.execute(
                "INSERT INTO checkpoints (partition, next_offset) VALUES (?, ?) "
                "ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
                (partition, next_offset),
            )
        return used

    # -- deciding ------------------------------------------------------------

    def _plan(
        self,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        done: int,
    ) -> list[_Op]:
        ops: list[_Op] = []
        db = self._index()
        l2 = self._l2_reader()
        # What the batch has done so far, over what the index holds.
        held: dict[tuple[str, str], int | None] = {}
        erased: set[str] = set()
        # Most batches are writes to keys L3 does not hold; with an empty
        # archive none needs a lookup.
        empty = db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is None

        def holds(ident: tuple[str, str]) -> int | None:
            if ident[0] in erased:
                return None
            if ident not in held and empty:
                return None
            if ident not in held:
                row = db.execute(
                    "SELECT version FROM entries WHERE tenant = ? AND key = ?", ident
                ).fetchone()
                held[ident] = int(row[0]) if row else None
            return held[ident]

        for env, outcome in zip(envelopes, outcomes, strict=True):
            if env.offset < done or outcome is None or outcome.action == "rejected":
                continue
            event = env.event
            if isinstance(event, TenantErased):
                ops.append(_DropTenant(event.tenant))
                erased.add(event.tenant)
                continue
            ident = (event.tenant, event.key)
            if isinstance(event, MemoryTiered) and event.to_tier == "l3":
                put = self._put_from_l2(l2, ident, event.version, None)
                if put is not None:
                    ops.append(put)
                    held[ident] = event.version
            elif isinstance(event, MemoryReencrypted):
                if holds(ident) == event.version:
                    put = self._put_from_l2(l2, ident, event.version, event.version)
                    if put is not None:
                        ops.append(put)
            elif holds(ident) is not None:
                # Promoted back, rewritten or deleted: the archived copy is dead.
                ops.append(_Drop(*ident))
                held[ident] = None
        return ops

    def _put_from_l2(
        self, l2: L2Reader, ident: tuple[str, str], version: int, only_if: int | None
    ) -> _Put | None:
        record = l2.version_payload(ident[0], ident[1], version)
        if record is None or record.ciphertext is None:
            # L2 is ahead of this batch and a later event removed the version
            # (the tenant was erased); that event drops it from L3 as well.
            log.debug("l3.payload_gone", tenant=ident[0], key=ident[1], version=version)
            return None
        body = encode_record(record)
        return _Put(
            tenant=ident[0],
            key=ident[1],
            version=version,
            frame=seal_frame(body, self._compressor),
            body_sha256=hashlib.sha256(body).digest(),
            key_version=record.key_version,
            only_if_version=only_if,
        )

    # -- writing -------------------------------------------------------------

    async def _append(self, partition: int, frames: list[bytes]) -> _Appended:
        """Append frames to the partition's open segment, rolling over and
        sealing at the size limit; fsync everything before returning."""
        if not frames:
            return _Appended([], [])
        db = self._index()
        limit = self.options.segment_max_bytes
        segments: list[_Segment] = []
        row = db.execute(
            "SELECT name, seq, size FROM segments WHERE partition = ? AND sealed = 0 "
            "ORDER BY seq DESC LIMIT 1",
            (partition,),
        ).fetchone()
        if row is not None:
            await self._cut_tail(row[0], row[2])
            segments.append(_Segment(row[0], row[1], row[2], new=False))
        placements = []
        for frame in frames:
            current = segments[-1] if segments else None
            if current is None or current.size >= limit:
                if current is not None:
                    current.seal = True
                seq = current.seq if current else self._last_seq(db, partition)
                current = _Segment(segment_name(partition, seq + 1), seq + 1, 0, True)
                segments.append(current)
            placements.append((current.name, current.size, len(frame)))
            current.frames.append(frame)
            current.size += len(frame)
        segments[-1].seal = segments[-1].size >= limit

        await aiofiles.os.makedirs(self._segments, exist_ok=True)
        for seg in segments:
            if seg.frames:
                await self._write(seg)
        if any(seg.new for seg in segments):
            await asyncio.to_thread(_fsync_dir, self._segments)
        for seg in segments:
            if seg.seal:
                seg.sha256 = await asyncio.to_thread(
                    _file_sha256, self._segments / seg.name, seg.size
                )
        return _Appended(segments, placements)

    async def _write(self, seg: _Segment) -> None:
        # A new segment is opened with "wb": a file of that name can only be
        # the leftover of a batch that never committed.
        async with aiofiles.open(
            self._segments / seg.name, "wb" if seg.new else "ab"
        ) as out:
            await out.write(b"".join(seg.frames))
            await out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())

    async def _cut_tail(self, name: str, size: int) -> None:
        path = self._segments / name
        try:
            actual = (await aiofiles.os.stat(path)).st_size
        except FileNotFoundError:
            actual = 0
        if actual > size:
            log.warning(
                "l3.tail_discarded",
                segment=name,
                bytes=actual - size,
                consequence="frames of an uncommitted batch are written again",
            )
            await asyncio.to_thread(os.truncate, path, size)
        elif actual < size:
            raise StoreError(
                f"L3 segment {path} holds {actual} bytes but the index says {size}: "
                "the archive was truncated (run `strata tier verify`)"
            )

    @staticmethod
    def _last_seq(db: sqlite3.Connection, partition: int) -> int:
        # Kept apart from the segments table so that a name is never reused
        # after compaction deletes the newest segment: a reader holding an old
        # location must find the file gone, not another file under its name.
        row = db.execute(
            "SELECT last_seq FROM sequences WHERE partition = ?", (partition,)
        ).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _save_segments(
        db: sqlite3.Connection, partition: int, segments: list[_Segment]
    ) -> None:
        for seg in segments:
            db.execute(
                "INSERT INTO segments (name, partition, seq, size, sealed, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "size = excluded.size, sealed = excluded.sealed, sha256 = excluded.sha256",
                (seg.name, partition, seg.seq, seg.size, int(seg.seal), seg.sha256),
            )
            db.execute(
                "INSERT INTO sequences (partition, last_seq) VALUES (?, ?) "
                "ON CONFLICT (partition) DO UPDATE SET "
                "last_seq = MAX(last_seq, excluded.last_seq)",
                (partition, seg.seq),
            )

    def _record(
        self,
        db: sqlite3.Connection,
        ops: list[_Op],
        placements: list[tuple[str, int, int]],
    ) -> int:
        used = 0
        spots = iter(placements)
        for op in ops:
            if isinstance(op, _Put):
                segment, pos, length = next(spots)
                # Every frame counts, live or not: erasure purges by this.
                db.execute(
                    "INSERT OR IGNORE INTO tenants_in (segment, tenant) VALUES (?, ?)",
                    (segment, op.tenant),
                )
                if db.execute(
                    "SELECT 1 FROM erased WHERE tenant = ?", (op.tenant,)
                ).fetchone():
                    continue
                if op.only_if_version is not None:
                    row = db.execute(
                        "SELECT version FROM entries WHERE tenant = ? AND key = ?",
                        (op.tenant, op.key),
                    ).fetchone()
                    if row is None or row[0] != op.only_if_version:
                        continue
                _unlink(db, op.tenant, op.key)
                db.execute(
                    "INSERT INTO entries (tenant, key, version, segment, pos, length, "
                    "body_sha256, key_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        op.tenant,
                        op.key,
                        op.version,
                        segment,
                        pos,
                        length,
                        op.body_sha256,
                        op.key_version,
                    ),
                )
                db.execute(
                    "UPDATE segments SET live_bytes = live_bytes + ? WHERE name = ?",
                    (length, segment),
                )
                used += 1
            elif isinstance(op, _Drop):
                used += _unlink(db, op.tenant, op.key)
            else:
                keys = db.execute(
                    "SELECT key FROM entries WHERE tenant = ?", (op.tenant,)
                ).fetchall()
                for (key,) in keys:
                    _unlink(db, op.tenant, key)
                # Keys are destroyed, so the frames are unreadable already;
                # compaction then removes them (and the names in their headers).
                db.execute(
                    "UPDATE segments SET purge = 1 WHERE name IN "
                    "(SELECT segment FROM tenants_in WHERE tenant = ?)",
                    (op.tenant,),
                )
                db.execute(
                    "INSERT OR IGNORE INTO erased (tenant) VALUES (?)", (op.tenant,)
                )
                used += 1
        return used

    def _freeze(self, segments: list[_Segment]) -> None:
        for seg in segments:
            if seg.seal:
                try:
                    os.chmod(self._segments / seg.name, 0o444)
                except OSError as exc:
                    log.warning(
                        "l3.seal_chmod_failed",
                        segment=seg.name,
                        error=str(exc),
                        consequence="the sealed segment stays writable; its checksum still guards it",
                    )
                log.info("l3.segment_sealed", segment=seg.name, bytes=seg.size)

    async def _remove_orphans(self, partition: int) -> None:
        if partition in self._checked:
            return
        known = {
            r[0]
            for r in self._index().execute(
                "SELECT name FROM segments WHERE partition = ?", (partition,)
            )
        }
        if self._segments.exists():
            for path in self._segments.glob(f"p{partition:05d}-*.seg"):
                if path.name not in known:
                    log.warning(
                        "l3.orphan_removed",
                        segment=path.name,
                        consequence="none: the index never referenced it",
                    )
                    await aiofiles.os.remove(path)
        self._checked.add(partition)

    @contextlib.asynccontextmanager
    async def _locked(self, partition: int) -> AsyncIterator[None]:
        await aiofiles.os.makedirs(self._locks, exist_ok=True)
        async with file_lock(self._locks / f"p{partition:05d}.lock"):
            yield

    # -- compaction ------------------------------------------------------------

    async def compact(self, partition: int) -> tuple[int, int]:
        """Rewrite the partition's segments that are mostly dead or hold erased data.

        Returns (segments rewritten, bytes reclaimed).

        Raises:
            StoreError: a segment cannot be read or written.
        """
        try:
            async with self._locked(partition):
                return await self._compact_locked(partition)
        except (OSError, sqlite3.Error) as exc:
            self._checked.discard(partition)
            raise StoreError(f"L3 compaction of partition {partition}: {exc}") from exc

    async def _compact_quietly(self, partition: int) -> None:
        try:
            await self._compact_locked(partition)
        except (StoreError, OSError, sqlite3.Error) as exc:
            # The batch is committed; only the dead bytes stay until next time.
            self._checked.discard(partition)
            log.warning(
                "l3.compaction_failed",
                partition=partition,
                error=str(exc),
                consequence="dead bytes stay on disk until the next compaction",
            )

    async def _compact_locked(self, partition: int) -> tuple[int, int]:
        db = self._index()
        await self._seal_purged_open_segment(db, partition)
        due = [
            (name, size)
            for name, size, live, purge in db.execute(
                "SELECT name, size, live_bytes, purge FROM segments "
                "WHERE partition = ? AND sealed = 1 ORDER BY seq",
                (partition,),
            )
            if purge
            or live == 0
            or size - live >= self.options.compact_dead_ratio * size
        ]
        if not due:
            return 0, 0
        await self._remove_orphans(partition)
        rewritten = reclaimed = 0
        for name, size in due:
            moved = await self._rewrite(db, partition, name)
            if moved is not None:
                rewritten += 1
                reclaimed += size - moved
        return rewritten, reclaimed

    async def _seal_purged_open_segment(
        self, db: sqlite3.Connection, partition: int
    ) -> None:
        """Seal an open segment that holds erased data, so compaction rewrites it."""
        row = db.execute(
            "SELECT name, size FROM segments WHERE partition = ? AND sealed = 0 "
            "AND purge = 1",
            (partition,),
        ).fetchone()
        if row is None:
            return
        await self._cut_tail(row[0], row[1])
        sha = await asyncio.to_thread(_file_sha256, self._segments / row[0], row[1])
        with _transaction(db, self._index_path):
            db.execute(
                "UPDATE segments SET sealed = 1, sha256 = ? WHERE name = ?",
                (sha, row[0]),
            )

    async def _rewrite(
        self, db: sqlite3.Connection, partition: int, name: str
    ) -> int | None:
        """Copy a segment's live frames to the open segment, repoint, delete it.

        Returns the live bytes moved, or None when a frame is damaged (the
        segment is kept for `strata tier verify` to report).
        """
        live = db.execute(
            "SELECT tenant, key, pos, length FROM entries WHERE segment = ? ORDER BY pos",
            (name,),
        ).fetchall()
        path = self._segments / name
        frames = []
        for _, _, pos, length in live:
            frame = await asyncio.to_thread(_read_at, path, pos, length)
            try:
                open_frame(frame, f"{name}@{pos}")
            except StoreError as exc:
                log.error("l3.compaction_skipped", segment=name, error=str(exc))
                return None
            frames.append(frame)
        appended = await self._append(partition, frames)
        moved = 0
        with _transaction(db, self._index_path):
            self._save_segments(db, partition, appended.segments)
            for (tenant, key, pos, length), (seg, new_pos, _) in zip(
                live, appended.placements, strict=True
            ):
                # An erasure from another partition may have dropped the entry
                # since it was read; then its copy is dead on arrival.
                db.execute(
                    "INSERT OR IGNORE INTO tenants_in (segment, tenant) VALUES (?, ?)",
                    (seg, tenant),
                )
                if db.execute(
                    "UPDATE entries SET segment = ?, pos = ? WHERE tenant = ? AND key = ? "
                    "AND segment = ? AND pos = ?",
                    (seg, new_pos, tenant, key, name, pos),
                ).rowcount:
                    db.execute(
                        "UPDATE segments SET live_bytes = live_bytes + ? WHERE name = ?",
                        (length, seg),
                    )
                    moved += length
            db.execute("DELETE FROM segments WHERE name = ?", (name,))
            db.execute("DELETE FROM tenants_in WHERE segment = ?", (name,))
        self._freeze(appended.segments)
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(path)
        await asyncio.to_thread(_fsync_dir, self._segments)
        log.info("l3.segment_compacted", segment=name, live_bytes=moved)
        return moved

    def digest(self) -> str:
        """An order-independent digest of the archived records."""
        return l3_digest(self.directory)


def _unlink(db: sqlite3.Connection, tenant: str, key: str) -> int:
    row = db.execute(
        "SELECT segment, length FROM entries WHERE tenant = ? AND key = ?",
        (tenant, key),
    ).fetchone()
    if row is None:
        return 0
    db.execute("DELETE FROM entries WHERE tenant = ? AND key = ?", (tenant, key))
    db.execute(
        "UPDATE segments SET live_bytes = live_bytes - ? WHERE name = ?",
        (row[1], row[0]),
    )
    return 1


# -- reading -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class L3Stats:
    """What the archive holds: records, segments and bytes."""

    records: int = 0
    segments: int = 0
    sealed: int = 0
    bytes: int = 0
    live_bytes: int = 0

    @property
    def dead_bytes(self) -> int:
        """Bytes of frames no entry points to any more."""
        return self.bytes - self.live_bytes

    def to_dict(self) -> dict[str, int]:
        """A JSON-ready form."""
        return {
            "records": self.records,
            "segments": self.segments,
            "sealed": self.sealed,
            "bytes": self.bytes,
            "live_bytes": self.live_bytes,
            "dead_bytes": self.dead_bytes,
        }


class L3Reader:
    """Read access to L3 for the read API; never writes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._segments = directory / "segments"
        self._index_path = directory / "index.db"
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self._index_path.exists():
                return None
            self._conn = connect_index(self._index_path, readonly=True)
        return self._conn

    def close(self) -> None:
        """Close the index, if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get(self, tenant: str, key: str) -> StoredRecord | None:
        """The archived version of a key, or None when L3 holds none.

        Raises:
            StoreError: the frame cannot be read or fails its checksum, or
                holds another record than the index says.
        """
        for _ in range(3):
            db = self._db()
            if db is None:
                return None
            row = db.execute(
                "SELECT segment, pos, length FROM entries WHERE tenant = ? AND key = ?",
                (tenant, key),
            ).fetchone()
            if row is None:
                return None
            try:
                frame = _read_at(self._segments / row[0], row[1], row[2])
            except FileNotFoundError:
                # Compacted between the lookup and the read: look up again.
                continue
            except OSError as exc:
                raise StoreError(f"L3 {row[0]}: {exc}") from exc
            record = decode_record(open_frame(frame, f"{row[0]}@{row[1]}"))
            if (record.tenant, record.key) != (tenant, key):
                raise StoreError(
                    f"L3 index points {tenant!r}/{key!r} at a frame of another record"
                )
            return record
        raise StoreError(f"L3 {tenant!r}/{key!r}: segment kept moving under the read")

    def checkpoint(self, partition: int) -> int:
        """The next offset of ``partition`` L3 has not applied."""
        db = self._db()
        return _checkpoint(db, partition) if db is not None else 0

    def checkpoints(self) -> dict[int, int]:
        """Every partition's checkpoint."""
        db = self._db()
        if db is None:
            return {}
        return {int(p): int(o) for p, o in db.execute("SELECT * FROM checkpoints")}

    def stats(self) -> L3Stats:
        """Records, segments and bytes the archive holds."""
        db = self._db()
        if db is None:
            return L3Stats()
        records = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        segs, sealed, size, live = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(sealed), 0), COALESCE(SUM(size), 0), "
            "COALESCE(SUM(live_bytes), 0) FROM segments"
        ).fetchone()
        return L3Stats(records, segs, sealed, size, live)

    def key_versions(self, tenant: str) -> set[int]:
        """Key versions the tenant's archived records are sealed under."""
        db = self._db()
        if db is None:
            return set()
        return {
            int(r[0])
            for r in db.execute(
                "SELECT DISTINCT key_version FROM entries WHERE tenant = ? "
                "AND key_version IS NOT NULL",
                (tenant,),
            )
        }

    def digest(self) -> str:
        """The order-independent digest of L3's content."""
        return l3_digest(self.directory)


def l3_digest(directory: Path) -> str:
    """Sum modulo 2**256 of a SHA-256 per archived record and erased tenant.

    Positions are left out: a rebuild or a compaction lays frames out
    differently but must hold the same records.
    """
    total = 0
    path = directory / "index.db"
    if path.exists():
        conn = connect_index(path, readonly=True)
        try:
            rows = conn.execute(
                "SELECT 'r', tenant, key, version, hex(body_sha256) FROM entries "
                "UNION ALL SELECT 'e', tenant, '', 0, '' FROM erased"
            )
            for row in rows:
                h = hashlib.sha256(repr(tuple(row)).encode()).digest()
                total = (total + int.from_bytes(h, "big")) % (1 << 256)
        finally:
            conn.close()
    return total.to_bytes(32, "big").hex()


# -- verification ----------------------------------------------------------------


@dataclass
class L3Verification:
    """What `strata tier verify` found."""

    segments: int = 0
    entries: int = 0
    orphans: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is damaged (orphans are harmless leftovers)."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "segments": self.segments,
            "entries": self.entries,
            "orphans": self.orphans,
            "findings": self.findings,
        }


def verify_l3(directory: Path) -> L3Verification:
    """Check every segment against its recorded size and checksum, and every
    entry's frame against its checksums and the record it should hold."""
    report = L3Verification()
    path = directory / "index.db"
    if not path.exists():
        return report
    seg_dir = directory / "segments"
    conn = connect_index(path, readonly=True)
    try:
        known = set()
        for name, size, sealed, sha in conn.execute(
            "SELECT name, size, sealed, sha256 FROM segments ORDER BY name"
        ):
            known.add(name)
            report.segments += 1
            _verify_segment(seg_dir / name, size, bool(sealed), sha, report)
        for tenant, key, version, seg, pos, length, body_sha in conn.execute(
            "SELECT tenant, key, version, segment, pos, length, body_sha256 FROM entries"
        ):
            report.entries += 1
            where = f"{seg}@{pos} ({tenant}/{key} v{version})"
            try:
                body = open_frame(_read_at(seg_dir / seg, pos, length), where)
                record = decode_record(body)
            except (StoreError, OSError) as exc:
                report.findings.append(str(exc))
                continue
            if hashlib.sha256(body).digest() != body_sha:
                report.findings.append(f"L3 {where}: body differs from the indexed one")
            elif (record.tenant, record.key, record.version) != (tenant, key, version):
                report.findings.append(f"L3 {where}: frame holds another record")
        if seg_dir.exists():
            report.orphans = sorted(
                p.name for p in seg_dir.glob("*.seg") if p.name not in known
            )
    finally:
        conn.close()
    return report


def _verify_segment(
    path: Path, size: int, sealed: bool, sha: str | None, report: L3Verification
) -> None:
    try:
        actual = path.stat().st_size
    except OSError as exc:
        report.findings.append(f"L3 segment {path.name}: {exc.strerror or exc}")
        return
    if actual < size or (sealed and actual != size):
        report.findings.append(
            f"L3 segment {path.name}: {actual} bytes, the index says {size}"
        )
    elif sealed and _file_sha256(path, size) != sha:
        report.findings.append(f"L3 segment {path.name}: sealed checksum differs")


# -- read statistics ----------------------------------------------------------------

READS_SCHEMA = """
CREATE TABLE IF NOT EXISTS last_read (
    tenant  TEXT NOT NULL,
    key     TEXT NOT NULL,
    read_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cold_reads (
    tenant  TEXT NOT NULL,
    key     TEXT NOT NULL,
    read_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS cold_reads_key ON cold_reads (tenant, key, read_ms);
"""


def read_stats_path(l2_db: Path) -> Path:
    """Where the read statistics of the data dir holding ``l2_db`` live."""
    return l2_db.parent / "reads.db"


class ReadStats:
    """When records were last read, and each read of an archived record.

    Written by readers in any process, read by the tiering job. Recording a
    read never fails the read: a locked or unwritable file costs only the
    statistic (said once in the log). A last-read time is written at most once
    a minute per key and process, since aging thresholds are hours or days;
    every read of a record in L3 is written, since promotion counts them.
    """

    def __init__(
        self, path: Path, *, refresh_ms: int = 60_000, memo: int = 10_000
    ) -> None:
        self.path = path
        self._refresh_ms = refresh_ms
        self._memo_size = memo
        self._noted: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._conn: sqlite3.Connection | None = None
        self._warned = False

    def _db(self, *, create: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.path.parent.exists() or (not create and not self.path.exists()):
                return None
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.25)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # Losing the last few statistics in a power cut costs nothing.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(READS_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the file, if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def note(self, tenant: str, key: str, *, tier: str, at_ms: int) -> None:
        """Record a read of a record that lives in ``tier``, at ``at_ms``."""
        ident = (tenant, key)
        cold = tier == "l3"
        last = self._noted.get(ident)
        if not cold and last is not None and at_ms - last < self._refresh_ms:
            return
        try:
            db = self._db(create=True)
            if db is None:
                return
            db.execute(
                "INSERT INTO last_read (tenant, key, read_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant, key) DO UPDATE SET "
                "read_ms = MAX(read_ms, excluded.read_ms)",
                (tenant, key, at_ms),
            )
            if cold:
                db.execute(
                    "INSERT INTO cold_reads (tenant, key, read_ms) VALUES (?, ?, ?)",
                    (tenant, key, at_ms),
                )
        except sqlite3.Error as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "reads.not_recorded",
                    path=str(self.path),
                    error=str(exc),
                    consequence="aging sees older last-read times; reads still work",
                )
            return
        self._noted[ident] = at_ms
        self._noted.move_to_end(ident)
        if len(self._noted) > self._memo_size:
            self._noted.popitem(last=False)

    def last_read(self, tenant: str, key: str) -> int | None:
        """When the key was last read, in UTC milliseconds; None if never.

        Raises:
            StoreError: the statistics cannot be read.
        """
        row = self._query(
            "SELECT read_ms FROM last_read WHERE tenant = ? AND key = ?", (tenant, key)
        )
        return int(row[0]) if row else None

    def cold_reads(self, tenant: str, key: str, *, since_ms: int) -> int:
        """Reads of the key while it was in L3, at or after ``since_ms``.

        Raises:
            StoreError: the statistics cannot be read.
        """
        row = self._query(
            "SELECT COUNT(*) FROM cold_reads WHERE tenant = ? AND key = ? AND read_ms >= ?",
            (tenant, key, since_ms),
        )
        return int(row[0]) if row else 0

    def forget_cold(self, tenant: str, key: str) -> None:
        """Drop the key's cold reads (it was promoted: they have been used).

        Raises:
            StoreError: the statistics cannot be written.
        """
        self._query(
            "DELETE FROM cold_reads WHERE tenant = ? AND key = ?", (tenant, key)
        )

    def prune(self, before_ms: int) -> None:
        """Drop cold reads older than ``before_ms``.

        Raises:
            StoreError: the statistics cannot be written.
        """
        self._query("DELETE FROM cold_reads WHERE read_ms < ?", (before_ms,))

    def _query(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        try:
            db = self._db(create=False)
            if db is None:
                return None
            row: tuple[Any, ...] | None = db.execute(sql, args).fetchone()
            return row
        except sqlite3.Error as exc:
            raise StoreError(f"read statistics {self.path}: {exc}") from exc
