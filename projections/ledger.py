"""The audit ledger: per partition, an append-only chain of entries under
signed Merkle checkpoints that anyone holding the public key can check.

The files and the entry format are described in :mod:`projections.ledger_files`;
verification is :mod:`projections.ledger_verify`, proofs
:mod:`projections.ledger_proofs`.

Every ``ledger_checkpoint_entries`` entries, and when entries have waited
``ledger_checkpoint_interval_ms`` unsigned, the writer signs a tree head: the
partition's size and Merkle root, the time, and the hash of the previous tree
head, with the ledger's Ed25519 key (:mod:`strata.signing`). Heads at
multiples of the entry interval fall at the same sizes however the log was
batched, so a rebuild signs the same roots there. The Merkle tree is kept as
its frontier (:class:`~projections.merkle.Frontier`, ``O(log n)`` hashes in
the checkpoint file), so an append costs one leaf hash and one node hash
amortised, and never reads the log.

Exactly once: a batch's entries are appended and fsynced, then its tree heads,
then the checkpoint file is replaced. On the next batch, bytes past the sizes
the checkpoint records (a worker died in between) are cut off and the events
they held are appended again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from projections.base import Envelope, Outcome
from projections.ledger_files import (
    GENESIS,
    PartitionState,
    ckpt_path,
    entry_hash,
    entry_line,
    iter_entries,
    log_path,
    partitions_in,
    read_state,
    scan_frontier,
    sth_path,
)
from projections.ledger_findings import Finding
from projections.ledger_verify import VerifyReport, verify_ledger
from projections.merkle import Frontier
from strata.config import Settings, load_settings
from strata.errors import StoreError
from strata.locks import file_lock
from strata.paths import StorePaths
from strata.signing import (
    LedgerSigner,
    TreeHead,
    load_or_create_signer,
    sign_tree_head,
    signing_key_path,
)

__all__ = [
    "GENESIS",
    "Finding",
    "LedgerProjection",
    "PartitionState",
    "VerifyReport",
    "entry_hash",
    "iter_entries",
    "ledger_digest",
    "partitions_in",
    "read_state",
    "verify_ledger",
]

log = structlog.get_logger(__name__)

_LOCK_WAIT_S = 60.0
_LEAF = b"\x00"
_NODE = b"\x01"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What a batch appends: its entry lines (joined), the (size, root) of the
    tree heads due and when they fell due, and the checkpoint after them."""

    data: bytes
    appended: int
    due: list[tuple[int, bytes]]
    now: int
    #: When the oldest entry still unsigned after this batch was appended.
    oldest: int
    state: PartitionState


class LedgerProjection:
    """Appends one entry per applied event, per partition, exactly once, and
    signs a tree head every so many entries or seconds.

    Args:
        directory: the ledger folder.
        settings: where the signing key and master key live and how often to
            sign; by default read from the environment, with the data dir
            taken to be the ledger folder's parent.
        signer: the signing key to use instead of the one in the keys folder.
    """

    name = "ledger"

    def __init__(
        self,
        directory: Path,
        *,
        settings: Settings | None = None,
        signer: LedgerSigner | None = None,
    ) -> None:
        self.directory = directory
        self._settings = settings
        self._signer = signer
        self._signer_lock = threading.Lock()
        self._states: dict[int, PartitionState] = {}

    @property
    def settings(self) -> Settings:
        """The settings in force, read on first use."""
        if self._settings is None:
            self._settings = load_settings(data_dir=self.directory.parent)
        return self._settings

    def signer(self) -> LedgerSigner:
        """The ledger signing key, unwrapped (and created) on first use.

        Raises:
            ConfigError: the master key cannot be used.
            KeyUnavailableError: the signing key does not unwrap.
            StoreError: the key file is gone while the ledger holds heads it
                signed.
        """
        with self._signer_lock:  # partitions append in threads at once
            if self._signer is None:
                settings = self.settings
                keys = StorePaths(settings.data_dir).keys
                self._refuse_lost_signer(signing_key_path(keys))
                self._signer = load_or_create_signer(keys, settings.master_key_path)
            return self._signer

    def check_signer(self) -> None:
        """Refuse a signing key file lost after it signed this ledger's heads,
        before anything is appended that it would have to sign.

        Raises:
            StoreError: the key file is gone while the ledger holds heads it
                signed.
        """
        if self._signer is None:
            self._refuse_lost_signer(
                signing_key_path(StorePaths(self.settings.data_dir).keys)
            )

    def _refuse_lost_signer(self, path: Path) -> None:
        """Refuse to create a signing key where one signed this ledger's heads:
        a new key would fail every earlier head's signature."""
        if path.exists():
            return
        signed = [
            p
            for p in partitions_in(self.directory)
            if read_state(self.directory, p).sths
        ]
        if signed:
            raise StoreError(
                f"ledger signing key {path} is missing, but the ledger in "
                f"{self.directory} holds tree heads it signed (partitions "
                f"{', '.join(map(str, signed))}); restore the file: a new key "
                "would fail every earlier head"
            )

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
            self.directory.mkdir(parents=True, exist_ok=True)
            async with self._locked(partition):
                # The entries and hashes are built here, on the event loop's
                # thread: in a thread of their own they would contend with it
                # for the interpreter, which cost the worker more than the work
                # itself. Only the writes and syncs, which release it, go to a
                # thread.
                batch = self._prepare(partition, envelopes, outcomes, next_offset)
                if batch is None:
                    return 0
                await asyncio.to_thread(self._commit, partition, batch)
                return batch.appended
        except OSError as exc:
            raise StoreError(
                f"ledger {log_path(self.directory, partition)}: {exc.strerror or exc}"
            ) from exc

    def sign_now(self, partition: int) -> TreeHead | None:
        """Sign a tree head over every entry of ``partition`` now, unless the
        last one already covers them all; return it.

        Raises:
            StoreError: the ledger cannot be read or written, or its lock not taken.
        """
        return self._sign_unsigned(partition, waited_ms=0)

    def sign_due(self, partition: int) -> TreeHead | None:
        """Sign a tree head over every entry of ``partition`` if its oldest
        unsigned entry has waited ``ledger_checkpoint_interval_ms``; return it.

        Appends sign when that time has passed, so this is what signs the last
        entries of a partition that receives no more events.

        Raises:
            StoreError: as :meth:`sign_now`.
        """
        return self._sign_unsigned(
            partition, waited_ms=self.settings.ledger_checkpoint_interval_ms
        )

    def _sign_unsigned(self, partition: int, *, waited_ms: int) -> TreeHead | None:
        try:
            with self._locked_sync(partition):
                state = self._current_state(partition)
                if state.entries == state.signed_entries:
                    return None
                if _now_ms() - state.unsigned_since_ms < waited_ms:
                    return None
                new = PartitionState(**{**state.__dict__, "stamp": None})
                heads = self._sign(
                    partition, new, [(state.entries, state.tree().root())]
                )
                new.unsigned_since_ms = 0
                self._write_heads(partition, heads)
                self._write_state(partition, new)
                return heads[-1][0]
        except OSError as exc:
            raise StoreError(f"ledger {self.directory}: {exc.strerror or exc}") from exc

    def _prepare(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> _Prepared | None:
        """The entries and tree heads a batch appends, and the checkpoint after
        them; None when the checkpoint is already at ``next_offset``."""
        state = self._current_state(partition)
        if next_offset <= state.next_offset:
            return None
        every = self.settings.ledger_checkpoint_entries
        peaks = state.tree().peaks
        head, entries = state.head, state.entries
        lines: list[bytes] = []
        due: list[tuple[int, bytes]] = []
        sha256 = hashlib.sha256
        for env, outcome in zip(envelopes, outcomes, strict=True):
            if env.offset < state.next_offset or outcome is None:
                continue
            line = entry_line(entries, env, outcome, head)
            h = sha256(_LEAF + line).digest()
            # Frontier.append, inlined: this loop runs once per event.
            peaks.append(h)
            merges = entries
            while merges & 1:
                right = peaks.pop()
                peaks[-1] = sha256(_NODE + peaks[-1] + right).digest()
                merges >>= 1
            head = h.hex()
            entries += 1
            lines.append(line)
            if entries % every == 0:
                due.append((entries, Frontier(entries, peaks).root()))
        frontier = Frontier(entries, peaks)

        # The interval trigger: sign when the oldest unsigned entry has waited
        # long enough. Entries signed by a count trigger above no longer wait.
        now = _now_ms()
        signed = due[-1][0] if due else state.signed_entries
        still_waiting = signed == state.signed_entries < state.entries
        oldest = state.unsigned_since_ms if still_waiting else now
        interval = self.settings.ledger_checkpoint_interval_ms
        if entries > signed and now - oldest >= interval:
            due.append((entries, frontier.root()))
        new = PartitionState(
            next_offset=next_offset,
            size=state.size,
            entries=entries,
            head=head,
            frontier=frontier.to_hex(),
            sth_size=state.sth_size,
            sths=state.sths,
            sth_head=state.sth_head,
            signed_entries=state.signed_entries,
        )
        data = b"\n".join(lines) + b"\n" if lines else b""
        new.size += len(data)
        return _Prepared(data, len(lines), due, now, oldest, new)

    def _commit(self, partition: int, batch: _Prepared) -> None:
        """Sign the batch's tree heads (the signing key may come from a remote
        KMS), then write its entries, the heads and the checkpoint."""
        new = batch.state
        heads = self._sign(partition, new, batch.due, batch.now) if batch.due else []
        new.unsigned_since_ms = 0 if new.signed_entries == new.entries else batch.oldest
        if batch.data:
            _append_durably(log_path(self.directory, partition), batch.data)
        self._write_heads(partition, heads)
        self._write_state(partition, new)
        log.debug(
            "ledger.appended",
            partition=partition,
            entries=batch.appended,
            signed=len(heads),
            next_offset=new.next_offset,
        )

    def _sign(
        self,
        partition: int,
        state: PartitionState,
        due: Sequence[tuple[int, bytes]],
        now: int | None = None,
    ) -> list[tuple[TreeHead, bytes]]:
        """Sign tree heads at the given (size, root) and advance ``state`` past them."""
        signer = self.signer()
        heads: list[tuple[TreeHead, bytes]] = []
        prev = bytes.fromhex(state.sth_head)
        for size, root in due:
            head = sign_tree_head(signer, partition, size, root, prev, now)
            line = head.line()
            prev = hashlib.sha256(line).digest()
            heads.append((head, line))
            state.sth_size += len(line) + 1
            state.sths += 1
            state.signed_entries = size
        state.sth_head = prev.hex()
        if heads:
            log.debug(
                "ledger.signed",
                partition=partition,
                size=state.signed_entries,
                root=heads[-1][0].root.hex(),
                key_id=signer.key_id[:16],
            )
        return heads

    def _write_heads(
        self, partition: int, heads: Sequence[tuple[TreeHead, bytes]]
    ) -> None:
        if heads:
            data = b"".join(line + b"\n" for _, line in heads)
            _append_durably(sth_path(self.directory, partition), data)

    def _current_state(self, partition: int) -> PartitionState:
        """The checkpoint, with any uncheckpointed tail of either file cut off."""
        cached = self._states.get(partition)
        try:
            st = ckpt_path(self.directory, partition).stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if cached is not None and cached.stamp == stamp:
            state = cached
        else:
            state = read_state(self.directory, partition)
        path = log_path(self.directory, partition)
        if stamp is None and path.exists() and path.stat().st_size:
            # Cutting the log back to an empty checkpoint would destroy the
            # audit trail; a rebuild from the topic is the way to start over.
            raise StoreError(
                f"ledger {path} holds entries but its checkpoint file is missing; "
                "move the ledger folder away and run `strata rebuild --projection "
                "ledger` to rebuild it from the topic"
            )
        if stamp is None:
            # A partition's checkpoint exists before its first entry does, so
            # a log without one always means a lost file, never a first batch
            # cut off by a crash (which would be refused above for ever).
            self._write_state(partition, state)
        if cached is not None and state.next_offset < cached.next_offset:
            # Cutting back to it, or appending after it, would leave the
            # chain without the entries this process already wrote.
            raise StoreError(
                f"ledger {ckpt_path(self.directory, partition)} went back from "
                f"offset {cached.next_offset} to {state.next_offset} while this "
                "process was appending to it (the file was removed or "
                "replaced); stop the worker, then restore the ledger folder, or "
                "move it away and start the worker again to rebuild the "
                "ledger from the topic"
            )
        if state.frontier is None:
            # A checkpoint from before tree heads: rebuild the frontier once.
            tree, head = scan_frontier(path, state.size)
            if tree.size != state.entries or head != state.head:
                raise StoreError(
                    f"ledger {path} does not match its checkpoint "
                    "(run `strata ledger verify`)"
                )
            state.frontier = tree.to_hex()
        try:
            state.tree()
        except ValueError as exc:
            raise StoreError(
                f"ledger checkpoint {ckpt_path(self.directory, partition)}: {exc}"
            ) from exc
        _cut_tail(path, state.size, partition, "entries")
        _cut_tail(
            sth_path(self.directory, partition),
            state.sth_size,
            partition,
            "tree heads",
        )
        self._states[partition] = state
        return state

    def _write_state(self, partition: int, state: PartitionState) -> None:
        path = ckpt_path(self.directory, partition)
        tmp = path.with_suffix(".ckpt.tmp")
        with tmp.open("wb") as out:
            out.write(state.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        st = path.stat()
        state.stamp = (st.st_mtime_ns, st.st_ino)
        self._states[partition] = state

    def _lock_fd(self, partition: int) -> int:
        return os.open(
            self.directory / f"p{partition:05d}.lock", os.O_RDWR | os.O_CREAT, 0o600
        )

    @contextlib.asynccontextmanager
    async def _locked(self, partition: int) -> AsyncIterator[None]:
        async with file_lock(self.directory / f"p{partition:05d}.lock"):
            yield

    @contextlib.contextmanager
    def _locked_sync(self, partition: int) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = self._lock_fd(partition)
        try:
            deadline = time.monotonic() + _LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"ledger partition {partition} stayed locked for "
                            f"{_LOCK_WAIT_S:g}s"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)

    def digest(self) -> str:
        """A digest of every partition's entries, head and Merkle root."""
        return ledger_digest(self.directory)


def _append_durably(path: Path, data: bytes) -> None:
    with path.open("ab") as out:
        out.write(data)
        out.flush()
        # Data and the new size, which is all an append needs; not the mtime.
        os.fdatasync(out.fileno())


#: Where lines cut from past a checkpoint are kept, beside the partition files.
DISCARDED = "discarded"


def _cut_tail(path: Path, size: int, partition: int, what: str) -> None:
    """Cut what lies past the checkpoint, keeping a copy of it under
    :data:`DISCARDED`: a crash's leftovers, or lines someone added, which an
    auditor may want to see."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        if size:
            raise StoreError(
                f"ledger {path} is missing, but its checkpoint says it holds "
                f"{size} bytes: it was deleted (run `strata ledger verify`)"
            ) from None
        return
    if actual > size:
        kept = path.parent / DISCARDED / f"{path.name}.{time.time_ns()}"
        kept.parent.mkdir(exist_ok=True)
        with path.open("rb") as src:
            src.seek(size)
            _append_durably(kept, src.read())
        log.warning(
            "ledger.tail_discarded",
            partition=partition,
            file=path.name,
            bytes=actual - size,
            kept=str(kept),
            consequence=f"{what} past the checkpoint are written again",
        )
        os.truncate(path, size)
    elif actual < size:
        raise StoreError(
            f"ledger {path} holds {actual} bytes but its checkpoint says {size}: "
            "it was truncated (run `strata ledger verify`)"
        )


def ledger_digest(directory: Path) -> str:
    """SHA-256 over each partition's entry count, chain head and Merkle root.

    Signed tree heads are left out: where the time trigger placed them
    depends on when batches arrived, while the entries and roots do not.
    """
    h = hashlib.sha256()
    for partition in partitions_in(directory):
        state = read_state(directory, partition)
        if state.frontier is None:
            tree, _ = scan_frontier(log_path(directory, partition), state.size)
        else:
            tree = state.tree()
        h.update(
            f"{partition}:{state.entries}:{state.head}:{tree.root().hex()};".encode()
        )
    return h.hexdigest()
