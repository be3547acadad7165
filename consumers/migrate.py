"""Shadow migration of L2: build a new version beside the live one, compare, switch.

Versions of L2 sit side by side in ``l2/`` and the pointer file
``l2/CURRENT`` names the live one (see :mod:`strata.paths`). A migration:

1. **Builds** version V by a bounded replay of the memory topic into
   ``l2/strata.vV.db`` with the same projection code the worker runs. The
   shadow stores its checkpoints with its writes, so a killed build resumes.
   The live version keeps serving and the live worker keeps applying.
2. **Compares** the two at one position: it snapshots the live records and
   checkpoints in one read transaction, replays the shadow to exactly those
   checkpoints, and reports records only in one and records that differ.
3. **Switches** (cutover, and rollback the other way) once the incoming
   version has caught up: it catches up in rounds while the live worker
   runs, then takes the outgoing database's write lock, so the live worker's
   next batch waits, replays the last few events into the incoming version,
   checks that it is at or past every live checkpoint, replaces the pointer
   (:func:`os.replace`), and releases the lock. At the instant of the switch
   the incoming version holds everything the outgoing one did, so reads that
   follow the pointer never go backwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiokafka import ConsumerRecord

from consumers.replay import BoundedReplay, JobJournal, ReplayProgress, ReplayReport
from consumers.validation import decode_and_validate
from projections.base import Envelope
from projections.l2 import L2Projection, connect
from schemas.codec import Codec
from strata.config import Settings
from strata.errors import (
    ApplyError,
    CheckFailedError,
    CodecError,
    StoreError,
    UsageError,
)
from strata.keystore import LocalKeystore
from strata.paths import L2Pointer, StorePaths, read_l2_pointer, write_l2_pointer

log = structlog.get_logger(__name__)

#: Projections that have versions. The ledger is append-only and signed: a
#: second version of it would be a second history, not a migration.
PROJECTIONS = ("l2",)

# The record as the read API sees it: current state joined with its payload row.
_RECORD_SQL = (
    "SELECT r.tenant, r.key, r.version, r.deleted, r.cls, r.updated_ms, r.partition, "
    "r.offset, r.tier, h.event_id, h.agent, h.key_id, h.key_version, h.nonce, "
    "h.ciphertext, h.content_hash, h.metadata FROM records r "
    "LEFT JOIN history h ON h.id = r.payload_id"
)


def check_projection(name: str, version: int) -> None:
    """Refuse a projection or version that cannot be migrated.

    Raises:
        UsageError: naming the option at fault.
    """
    if name not in PROJECTIONS:
        raise UsageError(
            f"--projection {name!r}: only {', '.join(PROJECTIONS)} has versions"
        )
    if version < 1:
        raise UsageError(f"--version {version}: versions start at 1")


@dataclass
class ProjectionDiff:
    """How a shadow version differs from the live one at the same checkpoints.

    The lists hold ``tenant/key`` names (never payloads), at most ``limit``
    each; the counts are complete.
    """

    live_version: int
    shadow_version: int
    checkpoints: dict[int, int]
    compared: int = 0
    only_live: list[str] = field(default_factory=list)
    only_shadow: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when both hold the same records."""
        return not any(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "live_version": self.live_version,
            "shadow_version": self.shadow_version,
            "checkpoints": self.checkpoints,
            "compared": self.compared,
            "only_live": self.counts.get("only_live", 0),
            "only_shadow": self.counts.get("only_shadow", 0),
            "differing": self.counts.get("differing", 0),
            "examples": {
                "only_live": self.only_live,
                "only_shadow": self.only_shadow,
                "differing": self.differing,
            },
        }


@dataclass
class SwitchReport:
    """What a cutover or rollback did."""

    from_version: int
    to_version: int
    outgoing_checkpoints: dict[int, int] = field(default_factory=dict)
    incoming_checkpoints: dict[int, int] = field(default_factory=dict)
    rounds: int = 0
    replayed_under_lock: int = 0
    lock_held_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "from_version": self.from_version,
            "to_version": self.to_version,
            "outgoing_checkpoints": self.outgoing_checkpoints,
            "incoming_checkpoints": self.incoming_checkpoints,
            "rounds": self.rounds,
            "replayed_under_lock": self.replayed_under_lock,
            "lock_held_s": round(self.lock_held_s, 3),
        }


class L2Version:
    """One version of L2 that a bounded replay writes into.

    Events are decoded and validated exactly as the worker does, and applied
    with the worker's projection code; events the worker dead-letters are
    skipped here (the live worker already dead-lettered them).
    """

    def __init__(
        self,
        settings: Settings,
        version: int,
        *,
        keystore: LocalKeystore | None = None,
        on_progress: Callable[[ReplayProgress], None] | None = None,
    ) -> None:
        self.settings = settings
        self.version = version
        self.paths = StorePaths(settings.data_dir)
        self.path = self.paths.l2_version_db(version)
        self.keystore = keystore or LocalKeystore(
            self.paths.keys, settings.master_key_path
        )
        self._on_progress = on_progress
        self._codec = Codec()
        self._projection = L2Projection(
            self.path, synchronous=settings.sqlite_synchronous
        )

    def close(self) -> None:
        """Close the database."""
        self._projection.close()

    def checkpoints(self) -> dict[int, int]:
        """Every partition's checkpoint."""
        return self._projection.checkpoints()

    async def catch_up(self, targets: dict[int, int] | None = None) -> ReplayReport:
        """Replay from this version's checkpoints to ``targets`` (default: the end).

        Raises:
            BrokerError: the broker cannot be reached.
            StoreError: the database cannot be written; rerun to resume.
        """
        replay = BoundedReplay(self.settings, on_progress=self._on_progress)
        return await replay.run(self.checkpoints(), self._apply, targets=targets)

    async def _apply(
        self, partition: int, records: Sequence[ConsumerRecord], next_offset: int
    ) -> None:
        envelopes: list[Envelope] = []
        for msg in records:
            try:
                event = decode_and_validate(
                    self._codec, msg.value, msg.key, self.settings, self.keystore
                )
            except (CodecError, ApplyError) as exc:
                log.debug(
                    "migrate.poison_skipped",
                    partition=partition,
                    offset=msg.offset,
                    error_class=type(exc).__name__,
                )
                continue
            value: bytes = msg.value
            envelopes.append(
                Envelope(
                    partition,
                    msg.offset,
                    event,
                    hashlib.sha256(value).digest(),
                    len(value),
                )
            )
        self._projection.apply(partition, envelopes, next_offset)


# -- building and comparing ------------------------------------------------------


def _live_version_other_than(paths: StorePaths, version: int) -> int:
    live = paths.l2_live_version
    if live == version:
        raise UsageError(
            f"--version {version}: v{version} is the live version of l2; "
            "build another version beside it"
        )
    return live


async def build_shadow(
    settings: Settings,
    version: int,
    *,
    on_progress: Callable[[ReplayProgress], None] | None = None,
) -> ReplayReport:
    """Build (or resume building) shadow version ``version`` up to the end offsets.

    Raises:
        UsageError: ``version`` is the live version.
        BrokerError: the broker cannot be reached.
        StoreError: the shadow database cannot be written; rerun to resume.
    """
    paths = StorePaths(settings.data_dir)
    live = _live_version_other_than(paths, version)
    shadow = L2Version(settings, version, on_progress=on_progress)
    try:
        log.info("migrate.build_started", live=live, shadow=version)
        report = await shadow.catch_up()
    finally:
        shadow.close()
    log.info("migrate.build_finished", shadow=version, records=report.records)
    return report


def _checkpoints_of(conn: sqlite3.Connection) -> dict[int, int]:
    rows = conn.execute("SELECT partition, next_offset FROM checkpoints")
    return {int(p): int(o) for p, o in rows}


def _record_digests(conn: sqlite3.Connection) -> dict[tuple[str, str], bytes]:
    # A digest per record keeps the comparison's memory small and payload-free.
    return {
        (row[0], row[1]): hashlib.sha256(repr(row[2:]).encode()).digest()
        for row in conn.execute(_RECORD_SQL)
    }


def _snapshot(path: Path) -> tuple[dict[int, int], dict[tuple[str, str], bytes]]:
    """Checkpoints and record digests from one read transaction (one WAL snapshot).

    Raises:
        StoreError: the database cannot be read.
    """
    if not path.exists():
        return {}, {}
    with closing(connect(path, readonly=True)) as conn:
        try:
            conn.execute("BEGIN")
            checkpoints = _checkpoints_of(conn)
            digests = _record_digests(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"L2 {path}: cannot be read: {exc}") from exc
    return checkpoints, digests


def _checkpoints_at(path: Path) -> dict[int, int]:
    if not path.exists():
        return {}
    with closing(connect(path, readonly=True)) as conn:
        return _checkpoints_of(conn)


async def diff_shadow(
    settings: Settings,
    version: int,
    *,
    wait_live_s: float = 30.0,
    limit: int = 20,
) -> ProjectionDiff:
    """Compare shadow ``version`` with the live version at one position.

    When the shadow is ahead of the live version on some partition (the live
    worker lags), waits up to ``wait_live_s`` for the live one to pass it.

    Raises:
        UsageError: ``version`` is the live version.
        CheckFailedError: the live version stayed behind the shadow.
    """
    paths = StorePaths(settings.data_dir)
    live = _live_version_other_than(paths, version)
    shadow = L2Version(settings, version)
    try:
        deadline = time.monotonic() + wait_live_s
        while True:
            live_ckpts, live_rows = _snapshot(paths.l2_version_db(live))
            ahead = {
                p: (off, live_ckpts.get(p, 0))
                for p, off in shadow.checkpoints().items()
                if off > live_ckpts.get(p, 0)
            }
            if not ahead:
                break
            if time.monotonic() > deadline:
                raise CheckFailedError(
                    f"live l2 v{live} stayed behind shadow v{version} for "
                    f"{wait_live_s:g}s on partitions {sorted(ahead)} "
                    "(is a worker running?); nothing compared"
                )
            await asyncio.sleep(0.2)
        await shadow.catch_up(targets=live_ckpts)
        _, shadow_rows = _snapshot(shadow.path)
    finally:
        shadow.close()
    return _compare(live, version, live_ckpts, live_rows, shadow_rows, limit)


def _compare(
    live: int,
    version: int,
    checkpoints: dict[int, int],
    live_rows: dict[tuple[str, str], bytes],
    shadow_rows: dict[tuple[str, str], bytes],
    limit: int,
) -> ProjectionDiff:
    only_live = sorted(live_rows.keys() - shadow_rows.keys())
    only_shadow = sorted(shadow_rows.keys() - live_rows.keys())
    differing = sorted(
        k
        for k in live_rows.keys() & shadow_rows.keys()
        if live_rows[k] != shadow_rows[k]
    )
    diff = ProjectionDiff(
        live_version=live,
        shadow_version=version,
        checkpoints=checkpoints,
        compared=len(live_rows.keys() | shadow_rows.keys()),
        only_live=[f"{t}/{k}" for t, k in only_live[:limit]],
        only_shadow=[f"{t}/{k}" for t, k in only_shadow[:limit]],
        differing=[f"{t}/{k}" for t, k in differing[:limit]],
        counts={
            "only_live": len(only_live),
            "only_shadow": len(only_shadow),
            "differing": len(differing),
        },
    )
    log.info("migrate.compared", live=live, shadow=version, **diff.counts)
    return diff


# -- switching -------------------------------------------------------------------


def _lag(outgoing: dict[int, int], incoming: dict[int, int]) -> int:
    return sum(max(0, off - incoming.get(p, 0)) for p, off in outgoing.items())


async def switch_l2(
    settings: Settings,
    to_version: int,
    *,
    lock_timeout_s: float = 10.0,
    max_final_lag: int = 20_000,
    max_rounds: int = 10,
    catch_up: bool = True,
    on_progress: Callable[[ReplayProgress], None] | None = None,
) -> SwitchReport:
    """Make ``to_version`` the live L2 once it has caught up with the current one.

    Args:
        to_version: the incoming version (built on demand from its checkpoints).
        lock_timeout_s: the longest the outgoing version's writers are held.
        max_final_lag: take the lock only once the incoming version is at most
            this many events behind.
        max_rounds: catch-up rounds before giving up on reaching that lag.
        catch_up: False refuses the switch unless the incoming version is
            already at or past the live checkpoints (nothing is replayed).

    Raises:
        UsageError: ``to_version`` is already live.
        CheckFailedError: it could not catch up; the pointer is unchanged.
        StoreError: a database or the pointer cannot be written.
    """
    paths = StorePaths(settings.data_dir)
    from_version = paths.l2_live_version
    if from_version == to_version:
        raise UsageError(f"--version {to_version}: v{to_version} is already live")
    outgoing_path = paths.l2_version_db(from_version)
    incoming = L2Version(settings, to_version, on_progress=on_progress)
    report = SwitchReport(from_version, to_version)
    try:
        await _approach(
            incoming, outgoing_path, report, catch_up, max_final_lag, max_rounds
        )
        await _switch_locked(
            incoming, outgoing_path, paths, report, catch_up, lock_timeout_s
        )
    finally:
        incoming.close()
    log.info("migrate.switched", **report.to_dict())
    return report


async def _approach(
    incoming: L2Version,
    outgoing_path: Path,
    report: SwitchReport,
    catch_up: bool,
    max_final_lag: int,
    max_rounds: int,
) -> None:
    """Catch up while the live worker runs, until the lag is small enough to lock."""
    if not catch_up:
        return
    for _ in range(max_rounds):
        outgoing = _checkpoints_at(outgoing_path)
        if _lag(outgoing, incoming.checkpoints()) <= max_final_lag:
            return
        report.rounds += 1
        await incoming.catch_up(targets=outgoing)
    outgoing = _checkpoints_at(outgoing_path)
    lag = _lag(outgoing, incoming.checkpoints())
    if lag > max_final_lag:
        raise CheckFailedError(
            f"l2 v{incoming.version} is still {lag} events behind the live version "
            f"after {max_rounds} rounds; the live version stays"
        )


async def _switch_locked(
    incoming: L2Version,
    outgoing_path: Path,
    paths: StorePaths,
    report: SwitchReport,
    catch_up: bool,
    lock_timeout_s: float,
) -> None:
    lock = connect(outgoing_path)
    try:
        try:
            # Readers keep reading (WAL); the live worker's next batch waits here.
            lock.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(
                f"L2 {outgoing_path}: cannot take the write lock: {exc}"
            ) from exc
        locked_at = time.monotonic()
        try:
            frozen = _checkpoints_of(lock)
            if catch_up:
                try:
                    replay = await asyncio.wait_for(
                        incoming.catch_up(targets=frozen), timeout=lock_timeout_s
                    )
                except TimeoutError:
                    raise CheckFailedError(
                        f"l2 v{incoming.version} did not catch up within "
                        f"{lock_timeout_s:g}s of holding the live version's writers; "
                        "the live version stays"
                    ) from None
                report.replayed_under_lock = replay.records
            current = incoming.checkpoints()
            behind = {
                p: (current.get(p, 0), off)
                for p, off in frozen.items()
                if current.get(p, 0) < off
            }
            if behind:
                raise CheckFailedError(
                    f"l2 v{incoming.version} is behind the live version on partitions "
                    + ", ".join(
                        f"{p} ({a} < {b})" for p, (a, b) in sorted(behind.items())
                    )
                    + "; the live version stays"
                )
            write_l2_pointer(
                paths.l2_pointer,
                L2Pointer(
                    version=report.to_version,
                    previous=report.from_version,
                    switched_ms=time.time_ns() // 1_000_000,
                ),
            )
            report.outgoing_checkpoints = frozen
            report.incoming_checkpoints = current
        finally:
            report.lock_held_s = time.monotonic() - locked_at
            lock.execute("ROLLBACK")
    finally:
        lock.close()


async def rollback_to_previous(
    settings: Settings, version: int, **options: Any
) -> SwitchReport:
    """Switch reads from ``version`` back to the version it replaced.

    The old version is caught up first: it stood still while ``version`` was live.

    Raises:
        UsageError: ``version`` is not the live version.
    """
    paths = StorePaths(settings.data_dir)
    pointer = read_l2_pointer(paths.l2_pointer)
    live = pointer.version if pointer is not None else 1
    if live != version:
        raise UsageError(
            f"--version {version} --rollback: v{version} is not live (v{live} is)"
        )
    previous = pointer.previous if pointer is not None else None
    if previous is None:
        raise UsageError(
            f"--rollback: v{version} replaced no earlier version; nothing to go back to"
        )
    if not paths.l2_version_db(previous).exists():
        raise UsageError(
            f"--rollback: v{previous} ({paths.l2_version_db(previous)}) no longer exists"
        )
    return await switch_l2(settings, previous, **options)


# -- the job ---------------------------------------------------------------------


@dataclass
class MigrationReport:
    """What one `strata migrate` run did."""

    projection: str
    version: int
    job_id: str
    build: ReplayReport | None = None
    diff: ProjectionDiff | None = None
    switch: SwitchReport | None = None
    refused: str | None = None
    live_version: int = 1

    @property
    def ok(self) -> bool:
        """False when the comparison found differences or a switch was refused."""
        return self.refused is None and (self.diff is None or self.diff.ok)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "job_id": self.job_id,
            "projection": self.projection,
            "version": self.version,
            "live_version": self.live_version,
            "build": self.build.to_dict() if self.build else None,
            "diff": self.diff.to_dict() if self.diff else None,
            "switch": self.switch.to_dict() if self.switch else None,
            "refused": self.refused,
        }


async def run_migration(
    settings: Settings,
    projection: str,
    version: int,
    *,
    cutover: bool = False,
    rollback: bool = False,
    force: bool = False,
    wait_live_s: float = 30.0,
    lock_timeout_s: float = 10.0,
    on_progress: Callable[[str, ReplayProgress], None] | None = None,
) -> MigrationReport:
    """Build and compare shadow ``version``, then switch to it or back, as asked.

    Without ``rollback``: builds the shadow up to the end offsets seen at
    start, compares it with the live version, and with ``cutover`` switches
    reads to it when the comparison is clean (or ``force``). With
    ``rollback``: switches reads from ``version`` back to the one it replaced.
    Each step is recorded on the jobs topic.

    Raises:
        UsageError: bad projection, version or combination of options.
        CheckFailedError: a switch could not catch up (the pointer is unchanged).
        BrokerError: the broker cannot be reached; rerun to resume the build.
        StoreError: a database cannot be written; rerun to resume the build.
    """
    check_projection(projection, version)
    if cutover and rollback:
        raise UsageError("--cutover and --rollback do not go together")
    report = MigrationReport(projection, version, uuid.uuid4().hex)

    def stage(name: str) -> Callable[[ReplayProgress], None] | None:
        return None if on_progress is None else (lambda p: on_progress(name, p))

    async with JobJournal(settings, job_id=report.job_id, kind="migrate") as journal:
        await journal.record("started", projection=projection, version=version)
        try:
            if rollback:
                report.switch = await rollback_to_previous(
                    settings,
                    version,
                    lock_timeout_s=lock_timeout_s,
                    on_progress=stage("rollback"),
                )
            else:
                await _build_compare_switch(
                    settings, report, cutover, force, wait_live_s, lock_timeout_s, stage
                )
        except Exception as exc:
            await journal.record_failure(exc)
            raise
        report.live_version = StorePaths(settings.data_dir).l2_live_version
        await journal.record("completed", **report.to_dict())
    return report


async def _build_compare_switch(
    settings: Settings,
    report: MigrationReport,
    cutover: bool,
    force: bool,
    wait_live_s: float,
    lock_timeout_s: float,
    stage: Callable[[str], Callable[[ReplayProgress], None] | None],
) -> None:
    report.build = await build_shadow(
        settings, report.version, on_progress=stage("build")
    )
    report.diff = await diff_shadow(settings, report.version, wait_live_s=wait_live_s)
    if not cutover:
        return
    if not report.diff.ok and not force:
        report.refused = (
            f"shadow v{report.version} differs from the live version "
            f"({report.diff.counts}); not switching without --force"
        )
        log.warning(
            "migrate.cutover_refused",
            version=report.version,
            consequence="reads stay on the live version",
            **report.diff.counts,
        )
        return
    report.switch = await switch_l2(
        settings,
        report.version,
        lock_timeout_s=lock_timeout_s,
        on_progress=stage("cutover"),
    )
