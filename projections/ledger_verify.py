"""Verifying the ledger: every chain, checkpoint file, signed root and signature.

The fast pass (:func:`_scan`) reads each log once, checking chain links,
sequence numbers and offsets and computing the Merkle roots at every signed
size, without parsing JSON. Only when it finds the chain broken does
:mod:`projections.ledger_findings` parse the partition to say where.
Partitions are independent, so large ledgers are verified a partition per
process.
"""

from __future__ import annotations

import binascii
import bisect
import contextlib
import hashlib
import json
import multiprocessing
import operator
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from projections.ledger_files import (
    GENESIS,
    PartitionState,
    ckpt_path,
    iter_entries,
    log_path,
    partitions_in,
    read_state,
    sth_path,
)
from projections.ledger_findings import Finding, count, diagnose
from projections.merkle import Frontier, levels_of, peaks_of
from strata.errors import StoreError, StrataError
from strata.signing import LedgerPublicKey, TreeHead, load_public_key

_GENESIS_HEX = GENESIS.encode()
_ZERO = bytes(32)
_LEAF = b"\x00"
_NODE = b"\x01"


@dataclass
class PartitionSummary:
    """One partition's verified state: what a report shows per partition."""

    partition: int
    entries: int = 0
    head: str = GENESIS
    root: str = ""
    signed: TreeHead | None = None
    signed_checkpoints: int = 0
    uncommitted: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        out: dict[str, Any] = {
            "partition": self.partition,
            "entries": self.entries,
            "head": self.head,
            "root": self.root,
            "signed_checkpoints": self.signed_checkpoints,
            "unsigned_entries": self.entries - (self.signed.size if self.signed else 0),
            "uncommitted_entries": self.uncommitted,
        }
        if self.signed is not None:
            out["latest_checkpoint"] = {
                "size": self.signed.size,
                "root": self.signed.root.hex(),
                "time_ms": self.signed.time_ms,
                "key_id": self.signed.key_id,
            }
        return out


@dataclass
class VerifyReport:
    """The result of verifying a ledger folder."""

    entries: int = 0
    partitions: int = 0
    findings: list[Finding] = field(default_factory=list)
    summaries: list[PartitionSummary] = field(default_factory=list)
    key_id: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no finding was made."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `strata ledger verify --json`."""
        return {
            "ok": self.ok,
            "entries": self.entries,
            "partitions": self.partitions,
            "findings": [f.to_dict() for f in self.findings],
            "summaries": [s.to_dict() for s in self.summaries],
            "key_id": self.key_id or "",
            "seconds": round(self.seconds, 3),
        }


#: Below this many bytes of logs, starting processes costs more than it saves.
PARALLEL_MIN_BYTES = 32 << 20


def verify_ledger(
    directory: Path,
    public_key: LedgerPublicKey | None = None,
    *,
    jobs: int | None = None,
) -> VerifyReport:
    """Verify every partition: chains, checkpoint file, signed roots and signatures.

    Args:
        directory: the ledger folder.
        public_key: the key tree heads must be signed with; by default the one
            in the keys folder beside the ledger folder.
        jobs: processes to verify partitions in; by default one per CPU when
            the logs hold at least :data:`PARALLEL_MIN_BYTES`, else one. More
            than one is used only from a single-threaded process.
    """
    began = time.perf_counter()
    report = VerifyReport()
    no_key = "no ledger public key to check the signed checkpoints with"
    if public_key is None:
        try:
            public_key = load_public_key(directory.parent / "keys")
        except StrataError as exc:
            no_key = f"cannot check the signed checkpoints: {exc}"
    report.key_id = public_key.key_id if public_key else None
    partitions = partitions_in(directory) if directory.exists() else []
    if jobs is None:
        jobs = _default_jobs(directory, partitions)
    raw_key = public_key.raw if public_key else None
    tasks = [(directory, p, raw_key, no_key) for p in partitions]
    # Forked workers start at once and need no importable __main__; forking
    # is only safe while this process has a single thread, since a fork
    # copies other threads' locks in whatever state they are in.
    if jobs > 1 and len(partitions) > 1 and threading.active_count() == 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
            parts = list(pool.map(_verify_one, tasks))
    else:
        parts = [_verify_one(task) for task in tasks]
    for part in parts:
        report.entries += part.entries
        report.partitions += part.partitions
        report.findings += part.findings
        report.summaries += part.summaries
    report.seconds = time.perf_counter() - began
    return report


def _default_jobs(directory: Path, partitions: list[int]) -> int:
    total = 0
    for partition in partitions:
        with contextlib.suppress(FileNotFoundError):
            total += log_path(directory, partition).stat().st_size
    return len(os.sched_getaffinity(0)) if total >= PARALLEL_MIN_BYTES else 1


def _verify_one(
    task: tuple[Path, int, bytes | None, str],
) -> VerifyReport:
    """Verify one partition into a report of its own (picklable both ways)."""
    directory, partition, raw_key, no_key = task
    report = VerifyReport()
    key = LedgerPublicKey(raw_key) if raw_key is not None else None
    verify_partition(directory, partition, report, key, no_key)
    return report


def verify_partition(
    directory: Path,
    partition: int,
    report: VerifyReport,
    public_key: LedgerPublicKey | None = None,
    no_key: str = "no ledger public key to check the signed checkpoints with",
) -> None:
    """Check one partition, adding its findings and summary to ``report``.

    Args:
        directory: the ledger folder.
        partition: the partition to check.
        report: where findings and the partition's summary go.
        public_key: the key signed checkpoints must verify under.
        no_key: the finding to make when there are signed checkpoints but
            no key to check them with.
    """
    add = report.findings.append
    summary = PartitionSummary(partition)
    report.summaries.append(summary)
    report.partitions += 1
    try:
        state = read_state(directory, partition)
    except StoreError as exc:
        add(Finding(partition, None, str(exc), "state"))
        state = PartitionState()

    heads = _check_heads(directory, partition, public_key, no_key)
    report.findings.extend(heads.findings)
    scan = _scan(
        log_path(directory, partition),
        partition,
        state.entries,
        {h.size for _, h in heads.trusted},
    )
    committed = min(state.entries, scan.count)
    report.entries += committed
    summary.entries = committed
    summary.uncommitted = max(0, scan.count - state.entries)
    summary.signed_checkpoints = heads.lines
    if scan.count and not ckpt_path(directory, partition).exists():
        add(Finding(partition, None, "the checkpoint file is missing", "state"))

    at = scan.at_committed
    ends_at_head = at is not None and at[0] == state.head
    broken = not scan.clean or not ends_at_head
    entry_findings = diagnose(directory, partition, state) if broken else []
    report.findings.extend(entry_findings)
    # An unclean scan with nothing located and the committed entries ending
    # at the recorded head was a write cut off past the checkpoint.
    if broken and not entry_findings and not ends_at_head:
        add(
            Finding(
                partition,
                None,
                "the chain does not end at the head the checkpoint file records",
                "state",
            )
        )
    if at is not None:
        summary.head = at[0]
        summary.root = Frontier.from_hex(committed, at[1]).root().hex()
        if not entry_findings and ends_at_head:
            _check_state(partition, state, at, report)
    else:
        summary.head, summary.root = scan.final_head, scan.final_root.hex()

    missing = any(f.kind in {"deleted", "truncated"} for f in entry_findings)
    _check_roots(partition, heads.trusted, scan, report, missing)
    matching = [h for _, h in heads.trusted if scan.roots.get(h.size) == h.root]
    summary.signed = matching[-1] if matching else None
    if state.sths > heads.lines:
        add(
            Finding(
                partition,
                None,
                f"the checkpoint file records {state.sths} signed checkpoints, "
                f"the file holds {heads.lines}: some were removed",
                "checkpoint",
            )
        )


def _check_state(
    partition: int,
    state: PartitionState,
    at: tuple[str, list[str], int],
    report: VerifyReport,
) -> None:
    """The checkpoint file against a chain that ends at its head."""
    _, frontier, nbytes = at
    if state.frontier is not None and frontier != state.frontier:
        report.findings.append(
            Finding(
                partition,
                None,
                "the checkpoint file's Merkle frontier does not match the entries "
                "(tree heads signed from it would be wrong)",
                "state",
            )
        )
    if nbytes != state.size:
        report.findings.append(
            Finding(
                partition,
                None,
                f"the entries take {nbytes} bytes, the checkpoint file says {state.size}",
                "state",
            )
        )


@dataclass
class _Heads:
    """The signed checkpoints of a partition, as read and checked."""

    trusted: list[tuple[int, TreeHead]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    lines: int = 0


def _check_heads(
    directory: Path, partition: int, key: LedgerPublicKey | None, no_key: str
) -> _Heads:
    """Parse the signed checkpoints; check signatures, their chain and order.

    Heads whose signature fails are not trusted for root comparisons: they
    could say anything.
    """
    out = _Heads()
    path = sth_path(directory, partition)
    if not path.exists():
        return out
    prev = _ZERO
    last_size = 0
    if key is None:
        out.findings.append(Finding(partition, None, no_key, "signature"))

    def add(k: int, what: str, kind: str = "checkpoint") -> None:
        out.findings.append(
            Finding(partition, None, f"signed checkpoint {k} {what}", kind, k)
        )

    for k, raw in iter_entries(path):
        out.lines += 1
        this, prev_expected = hashlib.sha256(raw).digest(), prev
        prev = this
        try:
            head = TreeHead.from_dict(json.loads(raw))
        except ValueError as exc:
            add(k, f"cannot be read: {exc}")
            continue
        signed = True
        if key is not None and head.key_id != key.key_id:
            add(
                k,
                f"is signed by key {head.key_id[:16]}..., not the ledger's",
                "signature",
            )
            signed = False
        elif key is not None and not key.verify(head.message(), head.signature):
            add(k, "has a signature that does not verify: it was changed", "signature")
            signed = False
        if head.partition != partition:
            add(k, f"names partition {head.partition}")
        if head.prev != prev_expected:
            add(
                k,
                "does not follow the one before it: a signed checkpoint was removed, "
                "inserted or reordered",
            )
        if k and head.size <= last_size:
            add(
                k,
                f"covers {count(head.size, 'entry', 'entries')}, no more than the {last_size} of one "
                "before it: it does not extend it",
            )
        last_size = max(last_size, head.size)
        if signed and head.partition == partition:
            out.trusted.append((k, head))
    return out


def _check_roots(
    partition: int,
    heads: Sequence[tuple[int, TreeHead]],
    scan: _Scan,
    report: VerifyReport,
    missing: bool,
) -> None:
    """Compare signed roots with the roots of the entries.

    ``missing`` says the entry checks already found entries missing; a signed
    size beyond the log is then their consequence, not a truncated end.

    A change below a signed size alters every later root too, so mismatches
    are reported once per run, naming the range the first change lies in:
    after the last signed size that still matches.
    """
    add = report.findings.append
    last_good = 0
    run: list[tuple[int, TreeHead]] = []

    def flush() -> None:
        if run:
            (k, first), last_k = run[0], run[-1][0]
            which = (
                f"checkpoint {k} signs a root"
                if k == last_k
                else f"checkpoints {k}-{last_k} sign roots"
            )
            add(
                Finding(
                    partition,
                    None,
                    f"signed {which} the entries no longer give: an "
                    "entry was changed, deleted, inserted or reordered, the first "
                    f"of them among entries {last_good}-{first.size - 1}",
                    "root",
                    k,
                )
            )
            run.clear()

    for k, head in heads:
        if head.size > scan.count:
            flush()
            what = (
                ("root", None, "entries are missing")
                if missing
                else ("truncated", scan.count, "the log was truncated behind it")
            )
            add(
                Finding(
                    partition,
                    what[1],
                    f"signed checkpoint {k} covers {count(head.size, 'entry', 'entries')} but the log "
                    f"holds {scan.count}: {what[2]}",
                    what[0],
                    k,
                )
            )
            return
        if scan.roots.get(head.size) == head.root:
            flush()
            last_good = head.size
        else:
            run.append((k, head))
    flush()


@dataclass
class _Scan:
    """What the fast pass over a log learned."""

    count: int = 0
    clean: bool = True
    roots: dict[int, bytes] = field(default_factory=dict)
    at_committed: tuple[str, list[str], int] | None = None
    final_head: str = GENESIS
    final_root: bytes = b""


class _Scanner:
    """The fast pass over one log, fed whole lines a chunk at a time.

    Every verification takes this path, so it works on lists of lines with
    bulk operations rather than line by line, and reads fields by position
    instead of parsing JSON: the writer's canonical form puts ``seq``,
    ``partition`` and ``offset`` first and ``prev`` last. Any deviation only
    marks the log unclean, for :mod:`projections.ledger_findings` to locate.

    The Merkle tree is hashed a level at a time over aligned blocks of
    ``_BLOCK`` leaves; each full block's root joins a frontier of block roots,
    and roots at signed sizes inside a block come from that block's levels.
    """

    def __init__(self, partition: int, committed: int, sizes: set[int]) -> None:
        self.partition = partition
        self.committed = committed
        self.marks = sorted({*sizes, committed} - {0})
        self.out = _Scan()
        self.blocks = Frontier()
        self.pending: list[bytes] = []
        self.hashed = 0
        self.pos = 0
        self.nbytes = 0
        self.prev_hex = _GENESIS_HEX
        self.last_offset = -1
        self.committed_at: tuple[str, int] | None = (
            (GENESIS, 0) if committed == 0 else None
        )
        self.committed_peaks: list[str] = []

    def feed(self, lines: list[bytes], terminated: bool = True) -> None:
        """Take the next lines (without their newlines)."""
        sha256 = hashlib.sha256
        leaves = [sha256(_LEAF + line).digest() for line in lines]
        hexes = list(map(binascii.hexlify, leaves))
        if self.out.clean:
            self.out.clean = terminated and self._in_order(lines, hexes)
        upto = self.committed - self.pos
        if 0 < upto <= len(lines):
            nbytes = self.nbytes + sum(map(len, lines[:upto])) + upto
            self.committed_at = (hexes[upto - 1].decode(), nbytes)
        self.nbytes += sum(map(len, lines)) + len(lines) - (not terminated)
        self.pos += len(lines)
        if hexes:
            self.prev_hex = hexes[-1]

        pending = self.pending
        pending += leaves
        while len(pending) >= _BLOCK:
            self._hash_block(pending[:_BLOCK], full=True)
            del pending[:_BLOCK]

    def _in_order(self, lines: list[bytes], hexes: list[bytes]) -> bool:
        """Links, sequence numbers, partition and increasing offsets."""
        if [line[-66:-2] for line in lines] != [self.prev_hex, *hexes[:-1]]:
            return False
        base, partition = self.pos, self.partition
        prefixes = [
            b'{"seq":%d,"partition":%d,"offset":' % (base + i, partition)
            for i in range(len(lines))
        ]
        if not all(map(bytes.startswith, lines, prefixes)):
            return False
        try:
            offsets = [
                int(line[len(pre) : line.index(b",", len(pre))])
                for line, pre in zip(lines, prefixes, strict=True)
            ]
        except ValueError:
            return False
        if not offsets:
            return True
        ordered = offsets[0] > self.last_offset and all(
            map(operator.lt, offsets, offsets[1:])
        )
        self.last_offset = offsets[-1]
        return ordered

    def _hash_block(self, leaves: list[bytes], *, full: bool) -> list[bytes]:
        """Hash one block; record roots at marks inside it; return its peaks.

        Inside a block the peaks are the block frontier's followed by the
        block's own, all smaller; at the end of a full block its root joins
        the block frontier instead, merging with equal-sized peaks.
        """
        start = self.hashed
        levels = levels_of(leaves)
        before = list(self.blocks.peaks)
        if full:
            self.blocks.append(levels[-1][0])
            self.hashed += len(leaves)

        def peaks(count: int) -> list[bytes]:
            if full and count == len(leaves):
                return list(self.blocks.peaks)
            return [*before, *peaks_of(levels, count)]

        first = bisect.bisect_right(self.marks, start)
        last = bisect.bisect_right(self.marks, start + len(leaves))
        for size in self.marks[first:last]:
            self._mark(size, peaks(size - start))
        return peaks(len(leaves))

    def _mark(self, size: int, peaks: list[bytes]) -> None:
        self.out.roots[size] = Frontier(size, peaks).root()
        if size == self.committed:
            self.committed_peaks = [p.hex() for p in peaks]

    def finish(self) -> _Scan:
        """The result, once every line was fed."""
        peaks = self._hash_block(self.pending, full=False)
        out = self.out
        out.count = self.pos
        out.final_head = self.prev_hex.decode()
        out.final_root = Frontier(self.pos, peaks).root()
        if self.committed_at is not None:
            head, nbytes = self.committed_at
            out.at_committed = (head, self.committed_peaks, nbytes)
        return out


_BLOCK = 1 << 12
_CHUNK = 4 << 20


def _scan(path: Path, partition: int, committed: int, sizes: set[int]) -> _Scan:
    """One pass over a log: chain links, sequence numbers, offsets, and the
    Merkle roots at ``sizes`` and at the ``committed`` size."""
    scanner = _Scanner(partition, committed, sizes)
    try:
        src = path.open("rb")
    except FileNotFoundError:
        return scanner.finish()
    pending = b""
    with src:
        while chunk := src.read(_CHUNK):
            chunk = pending + chunk if pending else chunk
            cut = chunk.rfind(b"\n") + 1
            pending = chunk[cut:]
            if cut:
                lines = chunk[:cut].split(b"\n")
                lines.pop()
                scanner.feed(lines)
    if pending:
        scanner.feed([pending], terminated=False)
    return scanner.finish()
