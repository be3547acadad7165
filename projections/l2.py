"""L2, the warm tier: durable current state and full history in SQLite.

Each batch runs in one ``BEGIN IMMEDIATE`` transaction that also moves the
partition's checkpoint, so a batch is applied entirely or not at all, and an
offset below the checkpoint is never applied twice, even by a worker that has
lost its partition and does not know it yet: SQLite serialises the writers and
the checkpoint is read inside the transaction.

Conflicts are decided here, from the state the log has built: a write with an
expected version applies only when the key is at that version.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from projections.base import Envelope, Outcome
from projections.sqlite import open_database
from schemas.events import (
    MemoryDeleted,
    MemoryReencrypted,
    MemoryTiered,
    MemoryWritten,
    TenantErased,
)
from strata.errors import ConfigError, StoreError
from strata.paths import StorePaths, existing_store_id

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id               INTEGER PRIMARY KEY,
    tenant           TEXT NOT NULL,
    key              TEXT NOT NULL,
    version          INTEGER NOT NULL,
    action           TEXT NOT NULL,
    reason           TEXT NOT NULL DEFAULT '',
    event_id         TEXT NOT NULL,
    agent            TEXT NOT NULL DEFAULT '',
    cls              TEXT NOT NULL DEFAULT '',
    time_ms          INTEGER NOT NULL,
    partition        INTEGER NOT NULL,
    offset           INTEGER NOT NULL,
    expected_version INTEGER,
    key_id           TEXT,
    key_version      INTEGER,
    nonce            BLOB,
    ciphertext       BLOB,
    content_hash     BLOB,
    metadata         TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS history_position ON history (partition, offset);
CREATE INDEX IF NOT EXISTS history_key ON history (tenant, key, version);
CREATE INDEX IF NOT EXISTS history_event ON history (event_id);
CREATE TABLE IF NOT EXISTS records (
    tenant     TEXT NOT NULL,
    key        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    deleted    INTEGER NOT NULL,
    cls        TEXT NOT NULL,
    payload_id INTEGER,
    updated_ms INTEGER NOT NULL,
    partition  INTEGER NOT NULL,
    offset     INTEGER NOT NULL,
    tier       TEXT NOT NULL DEFAULT 'l2',
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_cls ON records (tenant, cls);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS erasures (
    tenant    TEXT NOT NULL,
    partition INTEGER NOT NULL,
    event_id  TEXT NOT NULL,
    time_ms   INTEGER NOT NULL,
    PRIMARY KEY (tenant, partition)
);
CREATE TABLE IF NOT EXISTS erased_outcomes (
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    action    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (partition, offset)
) WITHOUT ROWID;
"""

#: WAL pages after which the writer checkpoints by itself (about 80 MB).
WRITER_AUTOCHECKPOINT_PAGES = 20_000

#: (version, deleted, tier, class) of one key.
_KeyState = tuple[int, bool, str, str]

_INSERT_HISTORY = (
    "INSERT INTO history (id, tenant, key, version, action, reason, event_id, agent, "
    "cls, time_ms, partition, offset, expected_version, key_id, key_version, "
    "nonce, ciphertext, content_hash, metadata) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_UPSERT_RECORD = (
    "INSERT INTO records (tenant, key, version, deleted, cls, payload_id, "
    "updated_ms, partition, offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (tenant, key) DO UPDATE SET version = excluded.version, "
    "deleted = excluded.deleted, cls = excluded.cls, "
    "payload_id = excluded.payload_id, updated_ms = excluded.updated_ms, "
    "partition = excluded.partition, offset = excluded.offset, tier = 'l2'"
)


_METADATA_ENCODER = json.JSONEncoder(sort_keys=True)


def _metadata_json(metadata: dict[str, str]) -> str:
    """The stored form of metadata; the same bytes as ``json.dumps(..., sort_keys=True)``."""
    return _METADATA_ENCODER.encode(metadata) if metadata else "{}"


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_RECORD_COLUMNS = (
    "r.tenant, r.key, r.version, r.deleted, r.cls, r.updated_ms, r.partition, "
    "r.offset, r.tier, h.event_id, h.agent, h.key_id, h.key_version, h.nonce, "
    "h.ciphertext, h.content_hash, h.metadata"
)


class StoredRecord(NamedTuple):
    """One version of a record as L2 holds it: ciphertext, never plaintext.

    A named tuple: the worker builds one per projected write for L1, and a
    frozen dataclass of these 17 fields cost it 7 µs an event to construct.
    """

    tenant: str
    key: str
    version: int
    deleted: bool
    cls: str
    updated_ms: int
    partition: int
    offset: int
    tier: str
    event_id: str
    agent: str
    key_id: str | None
    key_version: int | None
    nonce: bytes | None
    ciphertext: bytes | None
    content_hash: bytes | None
    metadata: dict[str, str]

    @property
    def size(self) -> int:
        """Bytes this record holds, roughly: what L1 counts against its bound."""
        return len(self.ciphertext or b"") + len(self.key) + len(self.tenant) + 160


class StoredPayload(NamedTuple):
    """The sealed payload of one accepted write, and where it came from."""

    tenant: str
    key: str
    version: int
    event_id: str
    key_version: int | None
    nonce: bytes
    ciphertext: bytes
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One event's effect on a key, accepted or rejected."""

    version: int
    action: str
    reason: str
    event_id: str
    agent: str
    time_ms: int
    partition: int
    offset: int
    expected_version: int | None


def _record(row: Sequence[Any]) -> StoredRecord:
    return StoredRecord(
        tenant=row[0],
        key=row[1],
        version=row[2],
        deleted=bool(row[3]),
        cls=row[4],
        updated_ms=row[5],
        partition=row[6],
        offset=row[7],
        tier=row[8],
        event_id=row[9],
        agent=row[10],
        key_id=row[11],
        key_version=row[12],
        nonce=row[13],
        ciphertext=row[14],
        content_hash=row[15],
        metadata=json.loads(row[16]) if row[16] and row[16] != "{}" else {},
    )


def connect(
    path: Path, *, synchronous: str = "FULL", readonly: bool = False
) -> sqlite3.Connection:
    """Open the L2 database with the settings every connection needs.

    Raises:
        StoreError: the file cannot be opened or created.
    """
    return open_database(
        path, SCHEMA, what="L2 database", synchronous=synchronous, readonly=readonly
    )


def _recorded(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return str(row[0]) if row else None


def known_store_id(paths: StorePaths) -> str | None:
    """A data dir's store id without making one: its ``store-id`` file, else
    the one its L2 recorded (the file may have been lost), else None.

    Raises:
        StoreError: the file is damaged, or L2 cannot be read.
    """
    found = existing_store_id(paths)
    if found is not None:
        return found
    l2 = L2Reader(paths.l2_db)
    try:
        return l2.recorded_store()
    finally:
        l2.close()


class L2Projection:
    """Projects events into the SQLite warm tier, exactly once per offset."""

    name = "l2"

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._conn = connect(path, synchronous=synchronous)
        # The writer would otherwise copy the WAL into the database itself
        # every 1,000 pages, inside a commit, stalling that batch for as long
        # as the copy and its sync take. :meth:`checkpoint_wal`, called in the
        # background, keeps the WAL short; this only bounds it if nothing does.
        self._conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
        self._wal_conn: sqlite3.Connection | None = None
        self._wal_lock = threading.Lock()
        self._erased: set[tuple[str, int]] = set()
        self._begin_batch([])

    def close(self) -> None:
        """Close the database connections."""
        self._conn.close()
        with self._wal_lock:
            if self._wal_conn is not None:
                self._wal_conn.close()
                self._wal_conn = None

    def checkpoint_wal(self) -> None:
        """Copy committed WAL pages into the database file (``PASSIVE``).

        Runs beside the writer without blocking it; meant for a background
        thread (its own connection, used by one thread at a time).

        Raises:
            StoreError: the checkpoint failed.
        """
        with self._wal_lock:
            try:
                if self._wal_conn is None:
                    self._wal_conn = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False
                    )
                self._wal_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(
                    f"L2 {self.path}: WAL checkpoint failed: {exc}"
                ) from exc

    def bind_topic(self, topic: str) -> None:
        """Record the topic this store projects, or check it is the one recorded.

        Checkpoints are offsets of one topic: applied to another topic's
        partitions they would silently skip its events.

        Raises:
            ConfigError: the store was built from another topic.
        """
        recorded = self._meta("topic", topic)
        if recorded != topic:
            raise ConfigError(
                f"{self.path} projects topic {recorded!r}, not {topic!r}: check "
                "STRATA_TOPIC_PREFIX, or use another STRATA_DATA_DIR for this topic"
            )

    def bind_source(
        self, topic: str, cluster: str, ends: dict[int, int] | None
    ) -> None:
        """:meth:`bind_topic`, and record the cluster id if none was; then
        check the store against this source (see :func:`source_mismatch`).

        Args:
            topic: the memory topic.
            cluster: the Kafka cluster id ("" if the broker gave none).
            ends: the topic's end offset per partition (None: not checked).

        Raises:
            ConfigError: the store was built from another topic or cluster.
        """
        self.bind_topic(topic)
        recorded = self._meta("cluster", cluster) if cluster else ""
        problem = source_mismatch(
            self.path, topic, cluster, recorded, self.checkpoints(), ends
        )
        if problem:
            raise ConfigError(problem)

    def recorded_store(self) -> str | None:
        """The store id recorded with this projection, if one was."""
        return _recorded(self._conn, "store")

    def bind_store(self, store: str) -> None:
        """Record the data dir's store id, or check it is the one recorded.

        Raises:
            StoreError: the projection was built by another store.
        """
        recorded = self._meta("store", store)
        if recorded != store:
            raise StoreError(
                f"{self.path} was built by store {recorded}, but this data dir's "
                f"store-id says {store}: restore the store-id file to {recorded}, "
                "or rebuild this projection"
            )

    def _meta(self, name: str, value: str) -> str:
        """The recorded value of ``name``, recording ``value`` if there is none
        (two processes opening a new store at once record one of theirs)."""
        self._conn.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value)
        )
        row = self._conn.execute(
            "SELECT value FROM meta WHERE name = ?", (name,)
        ).fetchone()
        return str(row[0])

    def checkpoint(self, partition: int) -> int:
        """The next offset of ``partition`` this projection has not applied."""
        row = self._conn.execute(
            "SELECT next_offset FROM checkpoints WHERE partition = ?", (partition,)
        ).fetchone()
        return int(row[0]) if row else 0

    def checkpoints(self) -> dict[int, int]:
        """Every partition's checkpoint."""
        return dict(
            self._conn.execute("SELECT partition, next_offset FROM checkpoints")
        )

    def apply(
        self, partition: int, envelopes: Sequence[Envelope], next_offset: int
    ) -> list[Outcome | None]:
        """Apply a batch of one partition and move its checkpoint to ``next_offset``.

        Returns one outcome per envelope. Offsets below the checkpoint are not
        applied again; their outcome is read back from history (None when the
        offset never made history, as when it went to the dead-letter topic).

        Raises:
            StoreError: the database cannot be written; nothing was applied.
        """
        return self.apply_many([(partition, envelopes, next_offset)])[0]

    def apply_many(
        self, batches: Sequence[tuple[int, Sequence[Envelope], int]]
    ) -> list[list[Outcome | None]]:
        """Apply batches of several partitions in one transaction (one sync).

        Each item is (partition, envelopes, next offset) as for :meth:`apply`;
        the outcomes come back in the same order. All or none are applied.

        Raises:
            StoreError: the database cannot be written; nothing was applied.
        """
        with self._transaction():
            self._erased = {
                (r[0], r[1])
                for r in self._conn.execute("SELECT tenant, partition FROM erasures")
            }
            return [
                self._apply_partition(partition, envelopes, next_offset)
                for partition, envelopes, next_offset in batches
            ]

    def _apply_partition(
        self, partition: int, envelopes: Sequence[Envelope], next_offset: int
    ) -> list[Outcome | None]:
        done = self.checkpoint(partition)
        self._begin_batch([env for env in envelopes if env.offset >= done])
        outcomes: list[Outcome | None] = []
        for env in envelopes:
            if env.offset < done:
                outcomes.append(self._recorded_outcome(partition, env.offset))
            else:
                outcomes.append(self._apply_one(env))
        self._flush()
        if next_offset > done:
            self._conn.execute(
                "INSERT INTO checkpoints (partition, next_offset) VALUES (?, ?) "
                "ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
                (partition, next_offset),
            )
        return outcomes

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"L2 {self.path}: cannot begin a write: {exc}") from exc
        try:
            yield
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            raise StoreError(f"L2 {self.path}: write failed: {exc}") from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            # The transaction may already be gone (SQLite rolls back on some I/O
            # errors by itself); the original error is what the caller needs.
            log.debug("l2.rollback_failed", error=str(exc))

    def _recorded_outcome(self, partition: int, offset: int) -> Outcome | None:
        for table in ("history", "erased_outcomes"):
            row = self._conn.execute(
                f"SELECT action, version, reason FROM {table} "  # noqa: S608
                "WHERE partition = ? AND offset = ?",
                (partition, offset),
            ).fetchone()
            if row:
                return Outcome(row[0], row[1], row[2])
        return None

    # -- batching ------------------------------------------------------------
    #
    # A batch reads the state of every key it touches, and the event ids it
    # carries, in a few queries up front; history rows get their ids here and
    # are inserted together, and each key's record is written once with its
    # final state. Decisions are the same as applying events one by one, so
    # they do not depend on where batch boundaries fall (live and rebuild
    # split the log differently).

    def _begin_batch(self, envelopes: Sequence[Envelope]) -> None:
        self._rows: list[tuple[Any, ...]] = []
        self._pending: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._state: dict[tuple[str, str], _KeyState | None] = {}
        (top,) = self._conn.execute(
            "SELECT COALESCE(MAX(id), 0) FROM history"
        ).fetchone()
        self._next_id = int(top) + 1
        idents = list(
            {(e.event.tenant, getattr(e.event, "key", "")) for e in envelopes}
        )
        self._state = dict.fromkeys(idents)
        for chunk in _chunks(idents, 400):
            args = [part for ident in chunk for part in ident]
            for row in self._conn.execute(key_states_sql(len(chunk)), args):
                self._state[(row[0], row[1])] = (
                    int(row[2]),
                    bool(row[3]),
                    row[4],
                    row[5],
                )
        ids = list({e.event.event_id for e in envelopes})
        self._seen_ids: set[str] = set()
        for chunk in _chunks(ids, 900):
            marks = ", ".join("?" for _ in chunk)
            self._seen_ids.update(
                r[0]
                for r in self._conn.execute(
                    f"SELECT event_id FROM history WHERE event_id IN ({marks})",  # noqa: S608
                    chunk,
                )
            )

    def _flush(self) -> None:
        """Write the buffered history rows, then each touched key's final record."""
        if self._rows:
            self._conn.executemany(_INSERT_HISTORY, self._rows)
            self._rows.clear()
        if self._pending:
            self._conn.executemany(_UPSERT_RECORD, self._pending.values())
            self._pending.clear()

    def _apply_one(self, env: Envelope) -> Outcome:
        event = env.event
        if isinstance(event, TenantErased):
            self._flush()
            outcome = self._erase(env, event)
            self._state.clear()
            return outcome
        if (event.tenant, env.partition) in self._erased:
            return self._history(env, 0, "rejected", "tenant erased")
        # An event published twice (a dead letter replayed after its cause was
        # fixed, a re-run import) applies once: the first occurrence wins.
        if event.event_id in self._seen_ids:
            current = self._current(event.tenant, getattr(event, "key", ""))
            return self._history(
                env, current[0] if current else 0, "rejected", "duplicate event id"
            )
        if isinstance(event, MemoryWritten | MemoryDeleted):
            return self._write_or_delete(env, event)
        # The other kinds read and update rows with their own statements.
        self._flush()
        if isinstance(event, MemoryReencrypted):
            outcome = self._reencrypt(env, event)
        else:
            outcome = self._tier(env, event)
        self._state.pop((event.tenant, event.key), None)
        return outcome

    def _current(self, tenant: str, key: str) -> _KeyState | None:
        """(version, deleted, tier, class) of a key, as this batch has left it."""
        ident = (tenant, key)
        if ident in self._state:
            return self._state[ident]
        row = self._conn.execute(
            "SELECT version, deleted, tier, cls FROM records WHERE tenant = ? AND key = ?",
            ident,
        ).fetchone()
        state = (int(row[0]), bool(row[1]), str(row[2]), str(row[3])) if row else None
        self._state[ident] = state
        return state

    def _write_or_delete(
        self, env: Envelope, event: MemoryWritten | MemoryDeleted
    ) -> Outcome:
        current = self._current(event.tenant, event.key)
        version = current[0] if current else 0
        live = current is not None and not current[1]
        expected = event.expected_version
        if expected is not None and expected != version:
            reason = f"expected version {expected}, key is at version {version}"
            return self._history(env, version, "rejected", reason)
        if isinstance(event, MemoryDeleted) and not live:
            return self._history(env, version, "rejected", "key does not exist")

        deleting = isinstance(event, MemoryDeleted)
        action = "deleted" if deleting else "written"
        outcome = self._history(env, version + 1, action, "")
        payload_id = None if deleting else self._last_history_id
        # A deleted record keeps the class it had, so `list --cls` history stays right.
        cls = (
            event.cls
            if isinstance(event, MemoryWritten)
            else (current[3] if current else "")
        )
        ident = (event.tenant, event.key)
        self._state[ident] = (version + 1, deleting, "l2", cls)
        self._pending[ident] = (
            event.tenant,
            event.key,
            version + 1,
            int(deleting),
            cls,
            payload_id,
            event.time_ms,
            env.partition,
            env.offset,
        )
        return outcome

    def _reencrypt(self, env: Envelope, event: MemoryReencrypted) -> Outcome:
        # Key versions only move forward: a re-encryption to a version the row
        # already has, or to an older one, is a repeat (a rotation job resumed
        # after publishing, or two jobs over the same record) and changes
        # nothing. Deciding from the row keeps replays deciding the same way.
        row = self._conn.execute(
            "SELECT id, key_version FROM history WHERE tenant = ? AND key = ? "
            "AND event_id = ? AND action = 'written'",
            (event.tenant, event.key, event.source_event_id),
        ).fetchone()
        if row is None:
            return self._history(
                env, event.version, "rejected", "no such version to re-encrypt"
            )
        if row[1] is not None and row[1] >= event.key_version:
            return self._history(
                env, event.version, "rejected", f"already re-encrypted (key v{row[1]})"
            )
        self._conn.execute(
            "UPDATE history SET key_id = ?, key_version = ?, nonce = ?, ciphertext = ?, "
            "content_hash = ? WHERE id = ?",
            (
                event.key_id,
                event.key_version,
                event.nonce,
                event.ciphertext,
                event.content_hash,
                row[0],
            ),
        )
        return self._history(env, event.version, "reencrypted", "")

    def _tier(self, env: Envelope, event: MemoryTiered) -> Outcome:
        # A move applies to the version the tiering job saw, from the tier the
        # record is in. A stale or repeated move (a write in between, two job
        # runs before the worker caught up) is recorded as rejected, and a
        # replay decides the same way. L2 keeps the payload either way: see
        # projections/l3.py for why that makes every crash point lossless.
        current = self._current(event.tenant, event.key)
        at = current[0] if current else 0
        reason = ""
        if current is None or current[0] != event.version:
            reason = f"tier move of version {event.version}, key is at version {at}"
        elif current[1]:
            reason = "tier move of a deleted key"
        elif event.to_tier not in ("l2", "l3") or event.to_tier == event.from_tier:
            reason = (
                f"tier move from {event.from_tier!r} to {event.to_tier!r}: "
                "only l2 -> l3 and l3 -> l2 are moves"
            )
        elif current[2] != event.from_tier:
            reason = f"tier move from {event.from_tier}, record is in {current[2]}"
        if reason:
            return self._history(env, at, "rejected", reason)
        self._conn.execute(
            "UPDATE records SET tier = ? WHERE tenant = ? AND key = ?",
            (event.to_tier, event.tenant, event.key),
        )
        return self._history(env, event.version, "tiered", event.reason)

    def _erase(self, env: Envelope, event: TenantErased) -> Outcome:
        """Purge the tenant's rows of this partition only.

        An erasure publishes a marker to every partition. Each purges what its
        own partition holds and refuses the tenant's later events there, so
        the result does not depend on the order partitions are read in: live
        and rebuild agree. Called with the buffers flushed.
        """
        where = (event.tenant, env.partition)
        self._conn.execute(
            "DELETE FROM records WHERE tenant = ? AND partition = ?", where
        )
        # What each purged event was decided as stays, by position alone, so
        # a ledger offered these events again records what it did live.
        self._conn.execute(
            "INSERT OR IGNORE INTO erased_outcomes "
            "(partition, offset, action, version, reason) "
            "SELECT partition, offset, action, version, reason FROM history "
            "WHERE tenant = ? AND partition = ?",
            where,
        )
        self._conn.execute(
            "DELETE FROM history WHERE tenant = ? AND partition = ?", where
        )
        self._conn.execute(
            "INSERT OR IGNORE INTO erasures (tenant, partition, event_id, time_ms) "
            "VALUES (?, ?, ?, ?)",
            (*where, event.event_id, event.time_ms),
        )
        self._erased.add(where)
        return self._history(env, 0, "erased", "")

    _last_history_id: int | None = None

    def _history(
        self, env: Envelope, version: int, action: str, reason: str
    ) -> Outcome:
        event = env.event
        payload = isinstance(event, MemoryWritten) and action == "written"
        written = event if isinstance(event, MemoryWritten) else None
        row_id = self._next_id
        self._next_id += 1
        self._seen_ids.add(event.event_id)
        self._rows.append(
            (
                row_id,
                event.tenant,
                getattr(event, "key", ""),
                version,
                action,
                reason,
                event.event_id,
                getattr(event, "agent", ""),
                written.cls if written else "",
                event.time_ms,
                env.partition,
                env.offset,
                getattr(event, "expected_version", None),
                written.key_id if payload and written else None,
                written.key_version if payload and written else None,
                written.nonce if payload and written else None,
                written.ciphertext if payload and written else None,
                written.content_hash if payload and written else None,
                _metadata_json(written.metadata) if payload and written else "{}",
            )
        )
        self._last_history_id = row_id
        return Outcome(action, version, reason)

    # -- state for digests ---------------------------------------------------

    def digest(self) -> str:
        """An order-independent digest of records and history.

        Row ids and checkpoints are left out: a rebuild inserts in another
        order but must reach the same content.
        """
        return digest_database(self._conn)


def digest_database(conn: sqlite3.Connection) -> str:
    """Sum modulo 2**256 of a SHA-256 per row: equal sets give equal digests."""
    total = 0
    queries = (
        "SELECT 'r', r.tenant, r.key, r.version, r.deleted, r.cls, r.updated_ms, "
        "r.partition, r.offset, r.tier, h.partition, h.offset FROM records r "
        "LEFT JOIN history h ON h.id = r.payload_id",
        "SELECT 'h', tenant, key, version, action, reason, event_id, agent, cls, "
        "time_ms, partition, offset, expected_version, key_id, key_version, nonce, "
        "ciphertext, content_hash, metadata FROM history",
        "SELECT 'e', tenant, partition, event_id, time_ms FROM erasures",
    )
    for query in queries:
        for row in conn.execute(query):
            h = hashlib.sha256(repr(row).encode()).digest()
            total = (total + int.from_bytes(h, "big")) % (1 << 256)
    return total.to_bytes(32, "big").hex()


def key_states_sql(count: int) -> str:
    """The query reading the records of ``count`` (tenant, key) pairs.

    A join from the wanted keys, so each one is a primary-key lookup;
    ``(tenant, key) IN (VALUES ...)`` would make SQLite scan every record.
    """
    values = ", ".join("(?, ?)" for _ in range(count))
    return (
        f"WITH wanted (tenant, key) AS (VALUES {values}) "  # noqa: S608
        "SELECT r.tenant, r.key, r.version, r.deleted, r.tier, r.cls "
        "FROM wanted CROSS JOIN records AS r "
        "ON r.tenant = wanted.tenant AND r.key = wanted.key"
    )


def _has_schema(conn: sqlite3.Connection) -> bool:
    try:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'"
        ).fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"L2 database: cannot be read: {exc}") from exc
    return row is not None


def source_mismatch(
    path: Path,
    topic: str,
    cluster: str,
    recorded: str,
    checkpoints: dict[int, int],
    ends: dict[int, int] | None,
) -> str | None:
    """Why a store's checkpoints do not belong to this cluster's topic, if so.

    Offsets mean something only within one topic of one cluster: a topic on
    a new broker, or deleted and created again, numbers its events from 0,
    and checkpoints of the old one would skip them as applied.

    Args:
        path: the store, for the message.
        topic: the memory topic.
        cluster: the broker's cluster id ("" when unknown: not compared).
        recorded: the cluster id the store recorded ("" when none).
        checkpoints: the store's checkpoint per partition.
        ends: the topic's end offset per partition (None: not compared).
    """
    fix = (
        "if this broker is now the source, rebuild the stores from it with "
        "`strata rebuild` (the keys stay); otherwise point "
        "STRATA_KAFKA_BOOTSTRAP at the broker this data dir was built from"
    )
    if cluster and recorded and recorded != cluster:
        return (
            f"{path} projects {topic} of Kafka cluster {recorded}, but the broker "
            f"is of cluster {cluster}: its offsets are not the ones this store "
            f"applied; {fix}"
        )
    if ends is None:
        return None
    for partition, applied in sorted(checkpoints.items()):
        end = ends.get(partition)
        if end is None or applied > end:
            at = "has no such partition" if end is None else f"ends at offset {end}"
            return (
                f"{path} has applied partition {partition} of {topic} up to offset "
                f"{applied}, but the topic {at}: it is not the topic this store "
                f"was built from (deleted and created again?); {fix}"
            )
    return None


class L2Reader:
    """Read access to L2 for the read API; never writes.

    Given a function instead of a path, it resolves the database on every
    query and reconnects when the answer changes, so a long-lived reader
    follows a shadow migration's cutover.
    """

    def __init__(self, path: Path | Callable[[], Path]) -> None:
        self._where = path
        self._conn: sqlite3.Connection | None = None
        self._open: Path | None = None

    @property
    def path(self) -> Path:
        """The database this reader reads now."""
        return self._where() if callable(self._where) else self._where

    def _db(self) -> sqlite3.Connection | None:
        path = self.path
        if self._conn is not None and path != self._open:
            self.close()
        if self._conn is None:
            if not path.exists():
                return None
            conn = connect(path, readonly=True)
            if not _has_schema(conn):
                # A worker created the file and has not committed its tables
                # yet: nothing is projected so far.
                conn.close()
                return None
            self._conn = conn
            self._open = path
        return self._conn

    def close(self) -> None:
        """Close the connection, if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._open = None

    def checkpoint(self, partition: int) -> int:
        """The next offset of ``partition`` L2 has not applied."""
        db = self._db()
        if db is None:
            return 0
        row = db.execute(
            "SELECT next_offset FROM checkpoints WHERE partition = ?", (partition,)
        ).fetchone()
        return int(row[0]) if row else 0

    def checkpoints(self) -> dict[int, int]:
        """Every partition's checkpoint."""
        db = self._db()
        return (
            dict(db.execute("SELECT partition, next_offset FROM checkpoints"))
            if db
            else {}
        )

    def check_topic(self, topic: str) -> None:
        """Refuse to read for ``topic`` a store projected from another topic.

        Raises:
            ConfigError: the store was built from another topic.
        """
        db = self._db()
        row = (
            db.execute("SELECT value FROM meta WHERE name = 'topic'").fetchone()
            if db
            else None
        )
        if row is not None and row[0] != topic:
            raise ConfigError(
                f"{self.path} holds topic {row[0]!r}, not {topic!r}: check "
                "STRATA_TOPIC_PREFIX, or use the data dir of this topic"
            )

    def recorded_cluster(self) -> str:
        """The Kafka cluster id the store recorded, or "" if none."""
        db = self._db()
        return (_recorded(db, "cluster") if db else None) or ""

    def recorded_store(self) -> str | None:
        """The store id the projection recorded (see :meth:`L2Projection.bind_store`)."""
        db = self._db()
        return _recorded(db, "store") if db else None

    def is_erased(self, tenant: str) -> bool:
        """Whether a TenantErased event for this tenant was projected."""
        db = self._db()
        return bool(
            db
            and db.execute(
                "SELECT 1 FROM erasures WHERE tenant = ? LIMIT 1", (tenant,)
            ).fetchone()
        )

    def get(self, tenant: str, key: str) -> StoredRecord | None:
        """The current record of a key (deleted ones included), or None."""
        db = self._db()
        if db is None:
            return None
        row = db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records r "  # noqa: S608 - constant columns
            "LEFT JOIN history h ON h.id = r.payload_id "
            "WHERE r.tenant = ? AND r.key = ?",
            (tenant, key),
        ).fetchone()
        return _record(row) if row else None

    def get_as_of(self, tenant: str, key: str, offset: int) -> StoredRecord | None:
        """The key as it stood once its partition was projected up to ``offset``."""
        db = self._db()
        if db is None:
            return None
        row = db.execute(
            "SELECT tenant, key, version, action = 'deleted', cls, time_ms, partition, "
            "offset, 'l2', event_id, agent, key_id, key_version, nonce, ciphertext, "
            "content_hash, metadata FROM history WHERE tenant = ? AND key = ? "
            "AND offset <= ? AND action IN ('written', 'deleted') "
            "ORDER BY version DESC LIMIT 1",
            (tenant, key, offset),
        ).fetchone()
        return _record(row) if row else None

    def history(self, tenant: str, key: str) -> list[HistoryRow]:
        """Every event that touched a key, in log order."""
        db = self._db()
        if db is None:
            return []
        return [
            HistoryRow(*row)
            for row in db.execute(
                "SELECT version, action, reason, event_id, agent, time_ms, partition, "
                "offset, expected_version FROM history WHERE tenant = ? AND key = ? "
                "ORDER BY offset",
                (tenant, key),
            )
        ]

    def event_rows(
        self, event_ids: Sequence[str]
    ) -> list[tuple[str, str, HistoryRow, StoredRecord | None]]:
        """(tenant, key, row, payload) of every history row of these events; the
        payload is the stored record when the row is an accepted write.

        Looked up by the event-id index, 900 ids a query: the bulk form of
        :meth:`history` followed by :meth:`version_payload`.
        """
        db = self._db()
        if db is None:
            return []
        out: list[tuple[str, str, HistoryRow, StoredRecord | None]] = []
        ids = list(dict.fromkeys(event_ids))
        for first in range(0, len(ids), 900):
            chunk = ids[first : first + 900]
            marks = ", ".join("?" for _ in chunk)
            for row in db.execute(
                "SELECT tenant, key, version, 0, cls, time_ms, partition, offset, 'l2', "  # noqa: S608
                "event_id, agent, key_id, key_version, nonce, ciphertext, content_hash, "
                "metadata, action, reason, expected_version FROM history "
                f"WHERE event_id IN ({marks})",
                chunk,
            ):
                history = HistoryRow(
                    row[2], row[17], row[18], row[9], row[10], row[5], row[6], row[7],
                    row[19],
                )  # fmt: skip
                written = row[17] == "written" and row[14] is not None
                out.append(
                    (row[0], row[1], history, _record(row[:17]) if written else None)
                )
        return out

    def version_payload(
        self, tenant: str, key: str, version: int
    ) -> StoredRecord | None:
        """The written payload of one version of a key."""
        db = self._db()
        if db is None:
            return None
        row = db.execute(
            "SELECT tenant, key, version, 0, cls, time_ms, partition, offset, 'l2', "
            "event_id, agent, key_id, key_version, nonce, ciphertext, content_hash, "
            "metadata FROM history WHERE tenant = ? AND key = ? AND version = ? "
            "AND action = 'written'",
            (tenant, key, version),
        ).fetchone()
        return _record(row) if row else None

    def list(
        self, tenant: str, *, prefix: str | None = None, cls: str | None = None
    ) -> list[tuple[str, int, str, int]]:
        """Live keys of a tenant as (key, version, class, updated_ms), sorted by key."""
        db = self._db()
        if db is None:
            return []
        sql = "SELECT key, version, cls, updated_ms FROM records WHERE tenant = ? AND deleted = 0"
        args: list[Any] = [tenant]
        if prefix:
            # Compare by range rather than LIKE, so '%' and '_' in keys stay literal.
            sql += " AND key >= ? AND key < ?"
            args += [prefix, prefix + "\U0010ffff"]
        if cls:
            sql += " AND cls = ?"
            args.append(cls)
        return [
            (r[0], r[1], r[2], r[3]) for r in db.execute(sql + " ORDER BY key", args)
        ]

    def counts(self) -> dict[str, int]:
        """Live record counts per tier."""
        db = self._db()
        if db is None:
            return {}
        return dict(
            db.execute(
                "SELECT tier, COUNT(*) FROM records WHERE deleted = 0 GROUP BY tier"
            )
        )

    def digest(self) -> str:
        """The order-independent digest of L2's content."""
        db = self._db()
        return digest_database(db) if db else hashlib.sha256(b"").hexdigest()

    def tier_candidates(self) -> Iterator[tuple[str, str, int, str, int, str]]:
        """Live records as (tenant, key, version, class, updated_ms, tier).

        What the tiering job evaluates; rows are streamed, so a store of any
        size is scanned in bounded memory.
        """
        db = self._db()
        if db is None:
            return
        cursor = db.execute(
            "SELECT tenant, key, version, cls, updated_ms, tier FROM records "
            "WHERE deleted = 0"
        )
        while rows := cursor.fetchmany(1000):
            for r in rows:
                yield (r[0], r[1], int(r[2]), r[3], int(r[4]), r[5])

    # -- key coverage (rotation and erasure) -----------------------------------

    def payloads_between(
        self, partition: int, first: int, last: int
    ) -> dict[int, StoredPayload]:
        """The payloads L2 holds for the accepted writes at ``first..last``, by offset.

        Their key versions, nonces and ciphertexts are the current ones: a
        re-encryption replaces them in place. One range read of the position
        index, however many offsets.
        """
        db = self._db()
        if db is None:
            return {}
        return {
            row[8]: StoredPayload._make(row)
            for row in db.execute(
                "SELECT tenant, key, version, event_id, key_version, nonce, ciphertext, "
                "partition, offset FROM history WHERE partition = ? "
                "AND offset BETWEEN ? AND ? AND action = 'written' "
                "AND ciphertext IS NOT NULL",
                (partition, first, last),
            )
        }

    def key_version_counts(self) -> dict[tuple[str, int], int]:
        """Stored payloads per (tenant, key version), every version of every key."""
        db = self._db()
        if db is None:
            return {}
        return {
            (r[0], int(r[1])): int(r[2])
            for r in db.execute(
                "SELECT tenant, key_version, COUNT(*) FROM history "
                "WHERE action = 'written' AND ciphertext IS NOT NULL "
                "GROUP BY tenant, key_version"
            )
        }

    def payloads(
        self,
        tenant: str | None = None,
        *,
        key_versions: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> Iterator[StoredRecord]:
        """Stored payloads (every written version), in log order, streamed.

        Args:
            tenant: only this tenant's.
            key_versions: only those sealed under one of these key versions.
            limit: at most this many.
        """
        db = self._db()
        if db is None:
            return
        sql = (
            "SELECT tenant, key, version, 0, cls, time_ms, partition, offset, 'l2', "
            "event_id, agent, key_id, key_version, nonce, ciphertext, content_hash, "
            "metadata FROM history WHERE action = 'written' AND ciphertext IS NOT NULL"
        )
        args: list[Any] = []
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        if key_versions is not None:
            sql += f" AND key_version IN ({', '.join('?' * len(key_versions))})"
            args += list(key_versions)
        sql += " ORDER BY partition, offset"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        cursor = db.execute(sql, args)
        while rows := cursor.fetchmany(500):
            yield from (_record(r) for r in rows)

    def tenant_counts(self, tenant: str) -> dict[str, int]:
        """What L2 holds of a tenant: live records per tier, and stored payloads."""
        db = self._db()
        if db is None:
            return {"payloads": 0}
        counts: dict[str, int] = {
            str(r[0]): int(r[1])
            for r in db.execute(
                "SELECT tier, COUNT(*) FROM records WHERE tenant = ? AND deleted = 0 "
                "GROUP BY tier",
                (tenant,),
            )
        }
        counts["payloads"] = int(
            db.execute(
                "SELECT COUNT(*) FROM history WHERE tenant = ? AND ciphertext IS NOT NULL",
                (tenant,),
            ).fetchone()[0]
        )
        return counts

    def counts_by_tier_and_class(self) -> dict[str, dict[str, int]]:
        """Live record counts per tier, then per class (empty when L2 is missing)."""
        db = self._db()
        if db is None:
            return {}
        out: dict[str, dict[str, int]] = {}
        for tier, cls, count in db.execute(
            "SELECT tier, cls, COUNT(*) FROM records WHERE deleted = 0 "
            "GROUP BY tier, cls ORDER BY tier, cls"
        ):
            out.setdefault(str(tier), {})[str(cls)] = int(count)
        return out
