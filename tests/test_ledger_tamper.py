"""Any change to a ledger of 1,200 entries is detected and located.

One byte flipped in each kind of field, at the start, middle and end;
entries deleted, inserted, duplicated, swapped; the log truncated behind a
signed checkpoint; signed checkpoints and the checkpoint file altered.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from projections import ledger_verify
from projections.ledger import VerifyReport, verify_ledger
from projections.ledger_files import PartitionState
from projections.merkle import Frontier, leaf_hash
from strata.signing import LedgerPublicKey
from tests.test_ledger_writer import build_ledger

COUNT = 1200
EVERY = 100
FIELDS = (
    "seq",
    "partition",
    "offset",
    "event_id",
    "tenant",
    "key",
    "action",
    "version",
    "time_ms",
    "event_hash",
    "prev",
)

Lines = list[bytes]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LedgerPublicKey]:
    """A data dir with a 1,200-entry, 12-checkpoint ledger, built once."""
    root = tmp_path_factory.mktemp("pristine")
    _, signer = asyncio.run(build_ledger(root, COUNT, batch=150, every=EVERY))
    return root, signer.public_key


def ledger_copy(pristine: tuple[Path, LedgerPublicKey], tmp_path: Path) -> Path:
    """A copy of the pristine ledger folder to change."""
    copy = tmp_path / "copy"
    shutil.copytree(pristine[0] / "ledger", copy)
    return copy


def tampered(
    pristine: tuple[Path, LedgerPublicKey],
    tmp_path: Path,
    change: Callable[[Lines], Lines],
    file: str = "p00000.log",
) -> VerifyReport:
    """Verify a copy of the pristine ledger after ``change`` to one of its files."""
    key = pristine[1]
    copy = ledger_copy(pristine, tmp_path)
    lines = (copy / file).read_bytes().splitlines()
    (copy / file).write_bytes(b"".join(line + b"\n" for line in change(lines)))
    return verify_ledger(copy, key)


def located(report: VerifyReport) -> dict[int, set[str]]:
    """Entry -> kinds of the findings that name an entry."""
    out: dict[int, set[str]] = {}
    for f in report.findings:
        if f.entry is not None:
            out.setdefault(f.entry, set()).add(f.kind)
    return out


def flip(line: bytes, field: str) -> bytes:
    """Flip the lowest bit of the middle byte of ``field``'s value."""
    m = re.search(rb'"%s":"?([^",}]+)' % field.encode(), line)
    assert m is not None
    at = (m.start(1) + m.end(1)) // 2
    return line[:at] + bytes([line[at] ^ 1]) + line[at + 1 :]


def test_the_untouched_ledger_verifies(pristine: tuple[Path, LedgerPublicKey]) -> None:
    """No finding on the ledger as written; every entry counted once."""
    report = verify_ledger(pristine[0] / "ledger", pristine[1])
    assert report.ok, report.findings
    assert report.entries == COUNT
    summary = report.summaries[0]
    assert summary.signed is not None
    assert summary.signed.size == COUNT
    assert summary.signed_checkpoints == COUNT // EVERY


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("entry", [0, 517, COUNT - 1])
def test_one_flipped_byte_is_located_in_its_entry(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path, field: str, entry: int
) -> None:
    """A flipped byte in any field names exactly that entry as changed, and the
    signed checkpoints over it no longer match."""

    def change(lines: Lines) -> Lines:
        lines[entry] = flip(lines[entry], field)
        return lines

    report = tampered(pristine, tmp_path, change)
    assert not report.ok
    assert located(report) == {entry: {"changed"}}, report.findings
    roots = [f for f in report.findings if f.kind == "root"]
    assert roots
    assert roots[0].checkpoint == entry // EVERY


@pytest.mark.parametrize("entry", [0, 600, COUNT - 2])
def test_a_deleted_entry_is_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path, entry: int
) -> None:
    """Removing a line names the line where the entry is missing."""
    report = tampered(pristine, tmp_path, lambda ls: ls[:entry] + ls[entry + 1 :])
    assert located(report) == {entry: {"deleted"}}, report.findings
    assert any(f.kind == "root" for f in report.findings)


def test_an_inserted_entry_is_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """A forged entry that even links to its predecessor is found where it sits."""

    def change(lines: Lines) -> Lines:
        doc = json.loads(lines[700])
        doc["tenant"] = "someone-else"
        forged = json.dumps(doc, separators=(",", ":")).encode()
        return [*lines[:700], forged, *lines[700:]]

    report = tampered(pristine, tmp_path, change)
    assert located(report) == {700: {"inserted"}}, report.findings


def test_a_copied_entry_is_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """An existing entry copied elsewhere is reported at the copy."""
    report = tampered(pristine, tmp_path, lambda ls: [*ls[:900], ls[250], *ls[900:]])
    assert located(report) == {900: {"inserted"}}, report.findings


def test_an_entry_doubled_in_place_is_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """An entry written twice in a row (an event applied twice) is found."""
    report = tampered(pristine, tmp_path, lambda ls: [*ls[:301], ls[300], *ls[301:]])
    assert set(located(report)) <= {300, 301}
    assert {"inserted"} in located(report).values(), report.findings


@pytest.mark.parametrize(("a", "b"), [(400, 401), (100, 900)])
def test_swapped_entries_are_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path, a: int, b: int
) -> None:
    """Reordering names the lines that moved, and nothing else."""

    def change(lines: Lines) -> Lines:
        lines[a], lines[b] = lines[b], lines[a]
        return lines

    report = tampered(pristine, tmp_path, change)
    where = located(report)
    assert where, report.findings
    assert set(where) <= {a, b}, report.findings
    assert all(kinds == {"reordered"} for kinds in where.values())
    if b - a > 1:
        assert set(where) == {a, b}


def test_truncation_is_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """Cutting the log names the first missing entry, from the checkpoint file
    and from the signed checkpoints that cover more."""
    report = tampered(pristine, tmp_path, lambda ls: ls[:1000])
    assert located(report) == {1000: {"truncated"}}, report.findings
    behind = [f for f in report.findings if f.checkpoint is not None]
    assert behind
    assert behind[0].checkpoint == 10


def test_truncation_hidden_from_the_checkpoint_file_is_still_found(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """Rewriting the checkpoint file to match a truncated log does not help:
    the signed checkpoints beyond the cut still name it."""
    key = pristine[1]
    copy = ledger_copy(pristine, tmp_path)
    lines = (copy / "p00000.log").read_bytes().split(b"\n")[:1000]
    (copy / "p00000.log").write_bytes(b"".join(line + b"\n" for line in lines))
    frontier = Frontier()
    for line in lines:
        frontier.append(leaf_hash(line))
    state = PartitionState(
        next_offset=2000,
        size=sum(len(line) + 1 for line in lines),
        entries=1000,
        head=leaf_hash(lines[-1]).hex(),
        frontier=frontier.to_hex(),
    )
    (copy / "p00000.ckpt").write_bytes(state.to_json())
    report = verify_ledger(copy, key)
    assert located(report) == {1000: {"truncated"}}, report.findings
    assert report.findings[-1].checkpoint == 10


def _next_entry(lines: Lines, *, linked: bool) -> bytes:
    """An entry after the last, linked to it or (as a copy would be) not."""
    doc = json.loads(lines[-1])
    doc["seq"] += 1
    doc["offset"] += 1
    doc["key"] = "forged"
    if linked:
        doc["prev"] = leaf_hash(lines[-1]).hex()
    return json.dumps(doc, separators=(",", ":")).encode()


def test_a_line_past_the_checkpoint_that_does_not_link_is_located_there(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """An appended entry is blamed, not the last committed one it fails to follow."""
    report = tampered(
        pristine, tmp_path, lambda ls: [*ls, _next_entry(ls, linked=False)]
    )
    assert located(report) == {COUNT: {"inserted"}}, report.findings
    assert report.entries == COUNT


def test_garbage_past_the_checkpoint_is_located_there(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    report = tampered(pristine, tmp_path, lambda ls: [*ls, b'{"seq":1200,"x'])
    assert located(report) == {COUNT: {"inserted"}}, report.findings
    assert "not a valid ledger entry" in report.findings[0].problem


def test_linked_lines_past_the_checkpoint_are_counted_but_not_in_the_ledger(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """What a writer appends before recording its checkpoint (or a crash cut
    off mid-line) is not a finding: it is not part of the ledger, no proof
    covers it, and the next writer discards it; verify counts it apart."""
    key = pristine[1]
    copy = ledger_copy(pristine, tmp_path)
    log = copy / "p00000.log"
    lines = log.read_bytes().splitlines()
    linked = _next_entry(lines, linked=True)
    log.write_bytes(log.read_bytes() + linked + b"\n")
    report = verify_ledger(copy, key)
    assert report.ok, report.findings
    assert (report.entries, report.summaries[0].uncommitted) == (COUNT, 1)

    cut = _next_entry([*lines, linked], linked=True)[:30]
    log.write_bytes(log.read_bytes() + cut)
    report = verify_ledger(copy, key)
    assert report.ok, report.findings
    assert (report.entries, report.summaries[0].uncommitted) == (COUNT, 2)


def test_a_changed_signed_checkpoint_is_located(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """A signed root altered in place fails its signature, at that checkpoint."""

    def change(lines: Lines) -> Lines:
        lines[4] = flip(lines[4], "root")
        return lines

    report = tampered(pristine, tmp_path, change, file="p00000.sth")
    signature = [f for f in report.findings if f.kind == "signature"]
    assert [f.checkpoint for f in signature] == [4]
    assert not located(report)


def test_a_removed_signed_checkpoint_is_found(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """Dropping a signed checkpoint breaks their chain after it."""
    report = tampered(pristine, tmp_path, lambda ls: ls[:6] + ls[7:], file="p00000.sth")
    chain = [f for f in report.findings if f.kind == "checkpoint"]
    assert chain
    assert chain[0].checkpoint == 6


def test_a_checkpoint_file_with_a_wrong_frontier_is_found(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """A frontier that would make the writer sign wrong roots is reported."""

    def change(lines: Lines) -> Lines:
        doc = json.loads(lines[0])
        doc["frontier"][0] = "0" * 64
        return [json.dumps(doc).encode()]

    report = tampered(pristine, tmp_path, change, file="p00000.ckpt")
    assert [f.kind for f in report.findings] == ["state"]


def test_signatures_by_another_key_are_refused(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """Verifying with a key other than the signer's fails every checkpoint."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from strata.signing import LedgerSigner

    other = LedgerSigner(Ed25519PrivateKey.generate()).public_key
    report = verify_ledger(pristine[0] / "ledger", other)
    assert {f.kind for f in report.findings} == {"signature"}
    assert len(report.findings) == COUNT // EVERY


@pytest.mark.parametrize("block", [1, 4, 32, 256])
def test_hashing_blocks_do_not_change_the_verdict(
    pristine: tuple[Path, LedgerPublicKey],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    block: int,
) -> None:
    """Signed sizes falling inside, at the edge of, and across hashing blocks
    give the same roots: the untouched ledger verifies, a change is located."""
    monkeypatch.setattr(ledger_verify, "_BLOCK", block)
    assert verify_ledger(pristine[0] / "ledger", pristine[1]).ok

    def change(lines: Lines) -> Lines:
        lines[517] = flip(lines[517], "key")
        return lines

    report = tampered(pristine, tmp_path, change)
    assert located(report) == {517: {"changed"}}
    assert [f.checkpoint for f in report.findings if f.kind == "root"] == [5]


def test_parallel_verification_agrees(tmp_path: Path) -> None:
    """Partitions verified in forked processes give the same report."""
    root = tmp_path / "data"
    _, signer = asyncio.run(build_ledger(root, 300, partitions=3, every=50))
    code = (
        "import json, sys; from pathlib import Path; "
        "from projections.ledger import verify_ledger; "
        "from strata.signing import LedgerPublicKey; "
        "key = LedgerPublicKey(bytes.fromhex(sys.argv[2])); "
        "print(json.dumps([verify_ledger(Path(sys.argv[1]), key, jobs=j).to_dict() "
        "for j in (1, 2)]))"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        str(root / "ledger"),
        signer.public_key.raw.hex(),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    serial, parallel = json.loads(done.stdout)
    assert serial.pop("seconds") >= 0
    assert parallel.pop("seconds") >= 0
    assert serial == parallel
    assert serial["ok"] is True
    assert serial["entries"] == 900


def test_a_deleted_log_file_and_a_stray_one_are_named_as_such(
    pristine: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    key = pristine[1]
    copy = ledger_copy(pristine, tmp_path)
    (copy / "p00000.log").unlink()
    (copy / "p00009.log").write_bytes(b'{"x":\n')
    report = verify_ledger(copy, key)
    where = {(f.partition, f.entry, f.kind): f.problem for f in report.findings}
    assert (
        "is missing, though the checkpoint file records 1200 entries"
        in where[(0, 0, "deleted")]
    )
    assert where[(9, 0, "inserted")].startswith(
        "line 0 (is not a valid ledger entry"
    ), where
