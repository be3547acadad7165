"""What a ledger verification finds, and locating it in a broken log.

:class:`Finding` is one problem and where it is. :func:`diagnose` parses a
partition whose chain the fast pass found broken and says which entries were
changed, deleted, inserted, reordered or truncated.
"""

from __future__ import annotations

import itertools
import json
import re
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from projections.ledger_files import PartitionState, iter_entries, log_path
from projections.merkle import leaf_hash
from schemas.events import ACTIONS

_ZERO = bytes(32)


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem a verification found, and where.

    ``entry`` is the 0-based line of the partition's log the problem is at
    (for missing entries, the line where they are missing); None when the
    problem is with a signed checkpoint (``checkpoint``, its 0-based line) or
    the checkpoint file. ``kind`` is one of ``changed``, ``deleted``,
    ``inserted``, ``reordered``, ``truncated``, ``invalid``, ``checkpoint``,
    ``signature``, ``root`` and ``state``.
    """

    partition: int
    entry: int | None
    problem: str
    kind: str = "changed"
    checkpoint: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        out: dict[str, Any] = {
            "partition": self.partition,
            "entry": self.entry,
            "problem": self.problem,
            "kind": self.kind,
        }
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        return out


def count(n: int, one: str, many: str) -> str:
    """``n`` with the noun that agrees with it: ``1 entry``, ``2 entries``."""
    return f"{n} {one if n == 1 else many}"


_SEQ_RE = re.compile(rb'^\{"seq":(\d{1,18}),')
_PREV_RE = re.compile(rb'"prev":"([0-9a-f]{64})"\}$')
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(slots=True)
class _Line:
    """One log line as the diagnosis sees it."""

    pos: int
    hash: bytes
    seq: int = -1
    prev: bytes | None = None
    offset: int = -1
    partition: int = -1
    problem: str = ""


def _parse_line(pos: int, raw: bytes) -> _Line:
    line = _Line(pos, leaf_hash(raw))
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not an object")
        numbers = [doc[k] for k in ("seq", "offset", "partition", "version", "time_ms")]
        if not all(type(v) is int for v in numbers):
            raise TypeError("a number field is not an integer")
        if not all(isinstance(doc[k], str) for k in ("event_id", "tenant", "key")):
            raise TypeError("a text field is not a string")
        for name in ("prev", "event_hash"):
            if not (isinstance(doc[name], str) and _HEX64_RE.match(doc[name])):
                raise TypeError(f"{name} is not a 64-digit hash")
        if doc["action"] not in ACTIONS:
            raise TypeError(f"unknown action {doc['action']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        # Keep what can still be read, so the line can be placed in the order.
        why = f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else exc
        line.problem = f"it is not a valid ledger entry: {why}"
        if m := _SEQ_RE.match(raw):
            line.seq = int(m.group(1))
        if m := _PREV_RE.search(raw):
            line.prev = bytes.fromhex(m.group(1).decode())
        return line
    line.seq, line.offset, line.partition = numbers[0], numbers[1], numbers[2]
    line.prev = bytes.fromhex(doc["prev"])
    return line


class _Diagnosis:
    """Locates what is wrong in a log that the fast pass found inconsistent.

    Sequence numbers say where each line claims to belong, and the longest
    run of lines whose claims increase is taken to be in place (the
    backbone). Around it: a line claiming a place that no backbone line holds
    was moved (reordered); a line repeating another byte for byte, or left
    over where no place is empty, was inserted; a line filling an empty place
    with a wrong claim was changed; places nobody fills were deleted, or
    truncated at the end. Then the chain is followed in sequence order: a
    broken link blames the entry before it, or the entry itself when the
    link after it is broken too (its ``prev`` was changed).

    It holds every line's hashes in memory (about 200 bytes an entry), which
    is why it runs only when something is wrong.
    """

    def __init__(
        self,
        partition: int,
        state: PartitionState,
        lines: list[_Line],
        terminated: bool = True,
    ):
        self.partition = partition
        self.committed = state.entries
        #: A last line without its newline, past the committed entries: a
        #: write a crash cut off, which the next writer discards.
        self.cut_off = (
            lines[-1]
            if lines and not terminated and lines[-1].pos >= state.entries
            else None
        )
        self.head = bytes.fromhex(state.head) if _HEX64_RE.match(state.head) else None
        self.lines = lines
        self.slot: dict[int, _Line] = {}
        self.findings: dict[int, Finding] = {}

    def report(self, pos: int, problem: str, kind: str) -> None:
        if pos not in self.findings:
            self.findings[pos] = Finding(self.partition, pos, problem, kind)

    def run(self) -> list[Finding]:
        backbone = self._backbone()
        end = max(self.committed, max(self.slot, default=-1) + 1)
        self._place_moved(backbone, end)
        self._gaps(backbone, end)
        self._follow_chain(end)
        self._check_fields(end)
        return [self.findings[p] for p in sorted(self.findings)]

    def _backbone(self) -> list[_Line]:
        """A longest strictly increasing run of claims (later lines win ties)."""
        lines = self.lines
        bound = max(self.committed, len(lines))
        tails: list[int] = []
        tail_pos: list[int] = []
        pred = [-1] * len(lines)
        for ln in lines:
            if not 0 <= ln.seq < bound:
                continue
            k = bisect_left(tails, ln.seq)
            pred[ln.pos] = tail_pos[k - 1] if k else -1
            if k == len(tails):
                tails.append(ln.seq)
                tail_pos.append(ln.pos)
            else:
                tails[k], tail_pos[k] = ln.seq, ln.pos
        chosen: list[_Line] = []
        at = tail_pos[-1] if tail_pos else -1
        while at >= 0:
            chosen.append(lines[at])
            at = pred[at]
        chosen.reverse()
        self.slot = {ln.seq: ln for ln in chosen}
        return self._prefer_confirmed(chosen)

    def _prefer_confirmed(self, chosen: list[_Line]) -> list[_Line]:
        """Of two lines claiming one place side by side, keep the one the
        chain supports best (see :meth:`_support`)."""
        on = {ln.pos for ln in chosen}
        for ln in self.lines:
            held = self.slot.get(ln.seq)
            if ln.pos in on or held is None or held.hash == ln.hash:
                continue
            lo, hi = self.slot.get(ln.seq - 1), self.slot.get(ln.seq + 1)
            if (lo is not None and ln.pos < lo.pos) or (
                hi is not None and ln.pos > hi.pos
            ):
                continue
            if self._support(ln) > self._support(held):
                on.discard(held.pos)
                on.add(ln.pos)
                self.slot[ln.seq] = ln
        return [ln for ln in self.lines if ln.pos in on]

    def _support(self, line: _Line) -> int:
        """How many links vouch for ``line``: to and from the entries the
        sequence numbers put around it, and to and from its neighbours in
        the file. The genesis value and the checkpoint's head count as
        neighbours at the ends."""
        lines, slot = self.lines, self.slot
        lo, hi = slot.get(line.seq - 1), slot.get(line.seq + 1)
        prev_by_seq = _ZERO if line.seq == 0 else (lo.hash if lo else None)
        if hi is not None:
            next_by_seq = hi.prev
        elif line.seq == self.committed - 1:
            next_by_seq = self.head
        else:
            next_by_seq = None
        prev_by_pos = _ZERO if line.pos == 0 else lines[line.pos - 1].hash
        next_by_pos = (
            lines[line.pos + 1].prev if line.pos + 1 < len(lines) else self.head
        )
        votes = (
            line.prev == prev_by_seq,
            line.hash == next_by_seq,
            line.prev == prev_by_pos,
            line.hash == next_by_pos,
        )
        return sum(votes)

    def _place_moved(self, backbone: list[_Line], end: int) -> None:
        on = {ln.pos for ln in backbone}
        for ln in self.lines:
            if ln.pos in on or ln.problem or not 0 <= ln.seq < end:
                continue
            if ln.seq not in self.slot:
                self.slot[ln.seq] = ln
                self.report(
                    ln.pos,
                    f"line {ln.pos} holds entry {ln.seq}, out of its place: "
                    "entries were reordered",
                    "reordered",
                )

    def _gaps(self, backbone: list[_Line], end: int) -> None:
        n = len(self.lines)
        bounds = [(-1, -1), *((ln.pos, ln.seq) for ln in backbone), (n, end)]
        for (pa, a), (pb, b) in itertools.pairwise(bounds):
            leftover: list[_Line] = []
            for ln in self.lines[pa + 1 : pb]:
                twin = self.slot.get(ln.seq)
                if (
                    ln.pos in self.findings
                    or (twin is not None and twin.pos == ln.pos)
                    or ln is self.cut_off
                ):
                    continue
                if twin is not None and twin.hash == ln.hash:
                    self.report(
                        ln.pos,
                        f"line {ln.pos} repeats line {twin.pos} byte for byte: "
                        "it was inserted",
                        "inserted",
                    )
                else:
                    leftover.append(ln)
            empty = (s for s in range(a + 1, b) if s not in self.slot)
            for ln in leftover:
                s = next(empty, None)
                if s is None:
                    claim = (
                        f"(claiming entry {ln.seq})"
                        if ln.seq >= 0
                        else f"({ln.problem.removeprefix('it ').replace(': ', ', ', 1)})"
                    )
                    self.report(
                        ln.pos,
                        f"line {ln.pos} {claim} has no place in the chain: it was "
                        "inserted",
                        "inserted",
                    )
                    continue
                self.slot[s] = ln
                why = ln.problem or f"its sequence number reads {ln.seq}, not {s}"
                self.report(ln.pos, f"entry {ln.pos} was changed: {why}", "changed")
            missing = [s for s in range(a + 1, b) if s not in self.slot]
            if not missing:
                continue
            first, last = missing[0], missing[-1]
            span = f"entry {first}" if first == last else f"entries {first}-{last}"
            if pb == n and last == end - 1:
                self.report(
                    n,
                    f"the log ends after {n} lines and {span} the checkpoint "
                    "file records are missing: it was truncated",
                    "truncated",
                )
            else:
                self.report(
                    pa + 1, f"{span} missing before line {pa + 1}: deleted", "deleted"
                )

    def _links_out(self, s: int) -> bool | None:
        """Whether the entry after place ``s`` records its hash (None: unknown)."""
        here, after = self.slot.get(s), self.slot.get(s + 1)
        if here is None:
            return None
        if s == self.committed - 1 and self.head is not None:
            # The checkpoint file, not a line past it, says what the last
            # committed entry hashes to.
            return self.head == here.hash
        if after is not None and after.prev is not None:
            return after.prev == here.hash
        return None

    def _follow_chain(self, end: int) -> None:
        findings, slot = self.findings, self.slot
        for place, placed in slot.items():
            if not placed.problem or placed is self.cut_off:
                continue
            if place >= self.committed:
                self.report(
                    placed.pos,
                    f"line {placed.pos}, past the {self.committed} entries the "
                    f"checkpoint file records, {placed.problem.removeprefix('it ')}",
                    "inserted",
                )
            else:
                self.report(
                    placed.pos,
                    f"entry {placed.pos} was changed: {placed.problem}",
                    "changed",
                )
        for s in range(end):
            ln = slot.get(s)
            if ln is None:
                continue
            earlier = slot.get(s - 1)
            before = _ZERO if s == 0 else (earlier.hash if earlier else None)
            if before is not None and ln.prev is not None and ln.prev != before:
                if ln.pos in findings or (
                    earlier is not None and earlier.pos in findings
                ):
                    pass
                elif s >= self.committed:
                    self.report(
                        ln.pos,
                        f"line {ln.pos} claims entry {s}, past the {self.committed} "
                        f"entries the checkpoint file records, and does not link to "
                        "the entry before it: the ledger's writer did not write it",
                        "inserted",
                    )
                elif earlier is None or self._links_out(s) is False:
                    self.report(
                        ln.pos,
                        f"entry {ln.pos} was changed: its link to the entry before "
                        "is wrong and the entry after does not link to it",
                        "changed",
                    )
                else:
                    self.report(
                        earlier.pos,
                        f"entry {earlier.pos} was changed: it no longer hashes to "
                        "the value the entry after it records",
                        "changed",
                    )
            if s == self.committed - 1 and self._links_out(s) is False:
                self.report(
                    ln.pos,
                    f"entry {ln.pos} was changed: it does not hash to the head "
                    "the checkpoint file records",
                    "changed",
                )

    def _check_fields(self, end: int) -> None:
        """Fields of intact entries the writer got wrong: the partition, and
        offsets that do not increase (an event applied twice)."""
        last_offset, last_pos = -1, -1
        for s in range(end):
            ln = self.slot.get(s)
            if ln is None or ln.pos in self.findings or ln is self.cut_off:
                continue
            if ln.partition != self.partition:
                self.report(
                    ln.pos, f"entry {ln.pos} names partition {ln.partition}", "invalid"
                )
            elif ln.offset <= last_offset:
                self.report(
                    ln.pos,
                    f"entry {ln.pos} has offset {ln.offset}, not above the "
                    f"{last_offset} of entry {last_pos}",
                    "invalid",
                )
            else:
                last_offset, last_pos = ln.offset, ln.pos


def diagnose(directory: Path, partition: int, state: PartitionState) -> list[Finding]:
    """Locate what is wrong in a partition's log (see :class:`_Diagnosis`)."""
    path = log_path(directory, partition)
    if not path.exists():
        if not state.entries:
            return []
        return [
            Finding(
                partition,
                0,
                f"the log file {path.name} is missing, though the checkpoint file "
                f"records {count(state.entries, 'entry', 'entries')}: "
                "it was deleted",
                "deleted",
            )
        ]
    lines = [_parse_line(pos, raw) for pos, raw in iter_entries(path)]
    return _Diagnosis(partition, state, lines, _ends_in_newline(path)).run()


def _ends_in_newline(path: Path) -> bool:
    try:
        with path.open("rb") as src:
            if src.seek(0, 2) == 0:
                return True
            src.seek(-1, 2)
            return src.read(1) == b"\n"
    except FileNotFoundError:
        return True
