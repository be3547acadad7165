"""The audit ledger: per partition, an append-only chain of entries.

Files in the ledger folder, for partition ``N``::

    pNNNNN.log    one JSON entry per line
    pNNNNN.ckpt   {"next_offset", "size", "entries", "head"}, replaced atomically

An entry's hash is ``SHA-256(0x00 || line)`` (the RFC 6962 leaf hash), and each
entry carries the hash of the one before it. Entries hold the SHA-256 of the
event's raw message (ciphertext and metadata), never plaintext.

Exactly once: a batch is appended and fsynced, then the checkpoint file is
replaced. On the next batch, bytes past the checkpoint's ``size`` (a batch
appended by a worker that died before its checkpoint) are cut off and the
events they held are appended again. A cross-process lock keeps two workers
of one data dir from interleaving on a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import structlog

from projections.base import Envelope, Outcome
from strata.errors import StoreError

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
_LEAF = b"\x00"


def entry_hash(line: bytes) -> bytes:
    """The hash of one entry: SHA-256 of 0x00 and the line without its newline."""
    return hashlib.sha256(_LEAF + line).digest()


@dataclass
class PartitionState:
    """What the checkpoint file of one partition says."""

    next_offset: int = 0
    size: int = 0
    entries: int = 0
    head: str = GENESIS
    stamp: tuple[int, int] | None = field(default=None, compare=False)

    def to_json(self) -> bytes:
        """The checkpoint file's content."""
        doc = {
            "next_offset": self.next_offset,
            "size": self.size,
            "entries": self.entries,
            "head": self.head,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


def _log_path(directory: Path, partition: int) -> Path:
    return directory / f"p{partition:05d}.log"


def _ckpt_path(directory: Path, partition: int) -> Path:
    return directory / f"p{partition:05d}.ckpt"


def read_state(directory: Path, partition: int) -> PartitionState:
    """Read one partition's checkpoint; a missing file means an empty ledger.

    Raises:
        StoreError: the file exists but cannot be read or parsed.
    """
    path = _ckpt_path(directory, partition)
    try:
        st = path.stat()
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return PartitionState()
    except (OSError, ValueError) as exc:
        raise StoreError(f"ledger checkpoint {path}: {exc}") from exc
    return PartitionState(
        next_offset=int(doc["next_offset"]),
        size=int(doc["size"]),
        entries=int(doc["entries"]),
        head=str(doc["head"]),
        stamp=(st.st_mtime_ns, st.st_ino),
    )


def partitions_in(directory: Path) -> list[int]:
    """Partitions that have a ledger file or checkpoint."""
    found = set()
    for path in directory.glob("p*.*"):
        if path.suffix in {".log", ".ckpt"} and path.stem[1:].isdigit():
            found.add(int(path.stem[1:]))
    return sorted(found)


class LedgerProjection:
    """Appends one entry per applied event, per partition, exactly once."""

    name = "ledger"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._states: dict[int, PartitionState] = {}

    def checkpoint(self, partition: int) -> int:
        """The next offset of ``partition`` the ledger has not applied."""
        return read_state(self.directory, partition).next_offset

    def checkpoints(self) -> dict[int, int]:
        """Every partition's checkpoint."""
        return {p: self.checkpoint(p) for p in partitions_in(self.directory)}

    async def apply(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> int:
        """Append entries for a batch and move the checkpoint to ``next_offset``.

        Envelopes below the checkpoint, and those with no outcome (never
        applied), make no entry. Returns the number of entries appended.

        Raises:
            StoreError: the ledger cannot be written; the checkpoint did not move.
        """
        try:
            await aiofiles.os.makedirs(self.directory, exist_ok=True)
            async with self._locked(partition):
                return await self._append_locked(
                    partition, envelopes, outcomes, next_offset
                )
        except OSError as exc:
            raise StoreError(
                f"ledger {_log_path(self.directory, partition)}: {exc.strerror or exc}"
            ) from exc

    async def _append_locked(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> int:
        state = await self._current_state(partition)
        if next_offset <= state.next_offset:
            return 0
        lines: list[bytes] = []
        head, entries = state.head, state.entries
        for env, outcome in zip(envelopes, outcomes, strict=True):
            if env.offset < state.next_offset or outcome is None:
                continue
            line = _entry_line(entries, env, outcome, head)
            head = entry_hash(line).hex()
            entries += 1
            lines.append(line + b"\n")

        data = b"".join(lines)
        path = _log_path(self.directory, partition)
        if data:
            async with aiofiles.open(path, "ab") as out:
                await out.write(data)
                await out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
        new = PartitionState(next_offset, state.size + len(data), entries, head)
        await self._write_state(partition, new)
        log.debug(
            "ledger.appended",
            partition=partition,
            entries=len(lines),
            next_offset=next_offset,
        )
        return len(lines)

    async def _current_state(self, partition: int) -> PartitionState:
        """The checkpoint, with any uncheckpointed tail of the log cut off."""
        cached = self._states.get(partition)
        ckpt = _ckpt_path(self.directory, partition)
        try:
            st = ckpt.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if cached is not None and cached.stamp == stamp:
            state = cached
        else:
            state = await asyncio.to_thread(read_state, self.directory, partition)
        path = _log_path(self.directory, partition)
        try:
            size = (await aiofiles.os.stat(path)).st_size
        except FileNotFoundError:
            size = 0
        if size > state.size:
            log.warning(
                "ledger.tail_discarded",
                partition=partition,
                bytes=size - state.size,
                consequence="entries past the checkpoint are appended again",
            )
            await asyncio.to_thread(os.truncate, path, state.size)
        elif size < state.size:
            raise StoreError(
                f"ledger {path} holds {size} bytes but its checkpoint says "
                f"{state.size}: the ledger was truncated (run `strata ledger verify`)"
            )
        self._states[partition] = state
        return state

    async def _write_state(self, partition: int, state: PartitionState) -> None:
        path = _ckpt_path(self.directory, partition)
        tmp = path.with_suffix(".ckpt.tmp")
        async with aiofiles.open(tmp, "wb") as out:
            await out.write(state.to_json())
            await out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
        await aiofiles.os.replace(tmp, path)
        st = path.stat()
        state.stamp = (st.st_mtime_ns, st.st_ino)
        self._states[partition] = state

    @contextlib.asynccontextmanager
    async def _locked(self, partition: int) -> AsyncIterator[None]:
        fd = os.open(
            self.directory / f"p{partition:05d}.lock", os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.005)
            yield
        finally:
            os.close(fd)

    def digest(self) -> str:
        """A digest of every partition's head, count and checkpoint."""
        return ledger_digest(self.directory)


def _entry_line(seq: int, env: Envelope, outcome: Outcome, prev: str) -> bytes:
    event = env.event
    entry: dict[str, Any] = {
        "seq": seq,
        "partition": env.partition,
        "offset": env.offset,
        "event_id": event.event_id,
        "tenant": event.tenant,
        "key": getattr(event, "key", ""),
        "action": outcome.action,
        "version": outcome.version,
        "time_ms": event.time_ms,
        "event_hash": env.event_hash.hex(),
        "prev": prev,
    }
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()


def ledger_digest(directory: Path) -> str:
    """SHA-256 over each partition's (partition, entries, head), in partition order."""
    h = hashlib.sha256()
    for partition in partitions_in(directory):
        state = read_state(directory, partition)
        h.update(f"{partition}:{state.entries}:{state.head};".encode())
    return h.hexdigest()


# -- verification -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem a verification found, and where."""

    partition: int
    entry: int | None
    problem: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "partition": self.partition,
            "entry": self.entry,
            "problem": self.problem,
        }


@dataclass
class VerifyReport:
    """The result of verifying a ledger folder."""

    entries: int = 0
    partitions: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no finding was made."""
        return not self.findings


def iter_entries(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number from 0, line without newline) of a ledger file."""
    with path.open("rb") as src:
        for number, line in enumerate(src):
            yield number, line.rstrip(b"\n")


def verify_partition(directory: Path, partition: int, report: VerifyReport) -> None:
    """Check one partition's chain and checkpoint, adding findings to ``report``."""
    path = _log_path(directory, partition)
    prev = GENESIS
    last_offset = -1
    count = 0
    size = 0
    add = report.findings.append
    if path.exists():
        for number, line in iter_entries(path):
            size += len(line) + 1
            count += 1
            try:
                entry = json.loads(line)
                seq, offset, entry_prev = entry["seq"], entry["offset"], entry["prev"]
            except (ValueError, KeyError, TypeError):
                add(Finding(partition, number, "entry is not a valid ledger entry"))
                prev = entry_hash(line).hex()
                continue
            if seq != number:
                add(
                    Finding(
                        partition, number, f"sequence number {seq}, expected {number}"
                    )
                )
            if entry_prev != prev:
                add(
                    Finding(
                        partition,
                        number,
                        "previous-hash link broken: entry before it was changed, "
                        "removed or reordered, or this entry was inserted",
                    )
                )
            if entry.get("partition") != partition:
                add(
                    Finding(
                        partition,
                        number,
                        f"entry names partition {entry.get('partition')}",
                    )
                )
            if not isinstance(offset, int) or offset <= last_offset:
                add(
                    Finding(
                        partition,
                        number,
                        f"offset {offset} does not increase (previous {last_offset})",
                    )
                )
            else:
                last_offset = offset
            prev = entry_hash(line).hex()
    report.entries += count
    report.partitions += 1

    try:
        state = read_state(directory, partition)
    except StoreError as exc:
        add(Finding(partition, None, str(exc)))
        return
    if state.entries != count:
        what = "truncated" if count < state.entries else "extended past its checkpoint"
        add(
            Finding(
                partition,
                min(count, state.entries),
                f"ledger {what}: {count} entries, checkpoint says {state.entries}",
            )
        )
    elif state.head != prev:
        add(
            Finding(
                partition,
                count - 1 if count else None,
                "last entry does not hash to the checkpoint's head",
            )
        )
    elif state.size != size:
        add(
            Finding(
                partition, None, f"file is {size} bytes, checkpoint says {state.size}"
            )
        )


def verify_ledger(directory: Path) -> VerifyReport:
    """Verify every partition's chain against its checkpoint."""
    report = VerifyReport()
    if not directory.exists():
        return report
    for partition in partitions_in(directory):
        verify_partition(directory, partition, report)
    return report
