"""Inclusion and consistency proofs of the ledger, and checking them offline.

A proof is one self-contained JSON object: the signed checkpoint it is
against, and the audit path (RFC 9162 section 2.1.3) or consistency path
(section 2.1.4). :func:`check_proof` needs only the document and the ledger's
public key, never the ledger.

Inclusion proof (``format`` ``strata-ledger-inclusion-proof/v1``)::

    partition, entry (0-based), event_id, line (the entry's exact line),
    audit_path (hex hashes, leaf first), checkpoint (a signed tree head)

Consistency proof (``format`` ``strata-ledger-consistency-proof/v1``)::

    partition, proof (hex hashes), first, second (signed tree heads)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _enc
from pathlib import Path
from typing import Any

from projections.ledger_files import (
    iter_entries,
    log_path,
    partitions_in,
    read_tree_heads,
)
from projections.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from strata.errors import CheckFailedError, NotFoundError, UsageError
from strata.signing import (
    COUNT_BITS,
    PARTITION_BITS,
    LedgerPublicKey,
    TreeHead,
    TreeHeadError,
    is_hex_hash,
    json_preview,
)

INCLUSION_FORMAT = "strata-ledger-inclusion-proof/v1"
CONSISTENCY_FORMAT = "strata-ledger-consistency-proof/v1"


def _leaves(directory: Path, partition: int, count: int) -> list[tuple[bytes, bytes]]:
    """(line, leaf hash) of the first ``count`` entries of a partition."""
    out: list[tuple[bytes, bytes]] = []
    path = log_path(directory, partition)
    try:
        for _, line in iter_entries(path):
            if len(out) >= count:
                break
            out.append((line, leaf_hash(line)))
    except FileNotFoundError:
        pass
    if len(out) < count:
        raise CheckFailedError(
            f"ledger {path} holds {len(out)} entries, fewer than the {count} its "
            "signed checkpoint covers (run `strata ledger verify`)"
        )
    return out


def find_event(directory: Path, event_id: str) -> list[tuple[int, int]]:
    """Every (partition, entry) whose event id is ``event_id``."""
    needle = b'"event_id":' + _enc(event_id).encode() + b","
    found: list[tuple[int, int]] = []
    for partition in partitions_in(directory):
        path = log_path(directory, partition)
        if path.exists():
            found += [
                (partition, n) for n, line in iter_entries(path) if needle in line
            ]
    return found


def inclusion_proof_doc(directory: Path, partition: int, entry: int) -> dict[str, Any]:
    """An inclusion proof of one entry against the latest signed checkpoint
    of its partition, as a self-contained JSON object.

    Raises:
        NotFoundError: no signed checkpoint covers the entry yet.
        CheckFailedError: the ledger no longer matches its signed checkpoint.
        StoreError: the ledger cannot be read.
    """
    heads = read_tree_heads(directory, partition)
    if not heads or heads[-1].size <= entry:
        raise NotFoundError(
            f"entry {entry} of partition {partition} is not covered by a signed "
            "checkpoint yet (run `strata ledger sign`)"
        )
    head = heads[-1]
    leaves = _leaves(directory, partition, head.size)
    hashes = [h for _, h in leaves]
    if root_of(hashes) != head.root:
        raise CheckFailedError(
            f"partition {partition} no longer matches its signed checkpoint at "
            f"size {head.size} (run `strata ledger verify`)"
        )
    line = leaves[entry][0]
    return {
        "format": INCLUSION_FORMAT,
        "partition": partition,
        "entry": entry,
        "event_id": json.loads(line)["event_id"],
        "line": line.decode("ascii"),
        "audit_path": [p.hex() for p in inclusion_proof(hashes, entry, head.size)],
        "checkpoint": head.to_dict(),
    }


def prove_event(
    directory: Path, event_id: str, at: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The inclusion proof of the entry of ``event_id`` (see :func:`inclusion_proof_doc`).

    An event published twice has a second entry (rejected as a duplicate);
    the first is proven unless ``at`` picks another, and the proof lists the
    others under ``also_at``.

    Args:
        directory: the ledger folder.
        event_id: the event to prove.
        at: (partition, entry) of the entry to prove.

    Raises:
        NotFoundError: no entry has this event id, or none is signed yet.
        UsageError: ``at`` is not an entry of this event.
    """
    found = find_event(directory, event_id)
    if not found:
        raise NotFoundError(f"no ledger entry has event id {event_id!r}")
    chosen = found[0] if at is None else at
    if chosen not in found:
        raise UsageError(f"event {event_id!r} has no entry at {at}")
    doc = inclusion_proof_doc(directory, *chosen)
    others = [f"{p}:{e}" for p, e in found if (p, e) != chosen]
    if others:
        doc["also_at"] = others
    return doc


def consistency_proof_doc(
    directory: Path, partition: int, first: int | None = None, second: int | None = None
) -> dict[str, Any]:
    """A proof that the signed checkpoint of size ``second`` extends that of
    ``first`` (by default the two latest), as a self-contained JSON object.

    Raises:
        NotFoundError: no signed checkpoint has one of the sizes.
        UsageError: ``first`` is larger than ``second``.
        CheckFailedError: the ledger no longer matches its signed checkpoint.
    """
    heads = {h.size: h for h in read_tree_heads(directory, partition)}
    sizes = sorted(heads)
    if second is None:
        if not sizes:
            raise NotFoundError(f"partition {partition} has no signed checkpoint")
        second = sizes[-1]
    if first is None:
        earlier = [s for s in sizes if s < second]
        first = earlier[-1] if earlier else second
    for size in (first, second):
        if size not in heads:
            raise NotFoundError(
                f"partition {partition} has no signed checkpoint of size {size} "
                f"(sizes: {', '.join(map(str, sizes)) or 'none'})"
            )
    if first > second:
        raise UsageError(
            f"the first size ({first}) is larger than the second ({second})"
        )
    hashes = [h for _, h in _leaves(directory, partition, second)]
    if root_of(hashes) != heads[second].root:
        raise CheckFailedError(
            f"partition {partition} no longer matches its signed checkpoint at "
            f"size {second} (run `strata ledger verify`)"
        )
    return {
        "format": CONSISTENCY_FORMAT,
        "partition": partition,
        "proof": [p.hex() for p in consistency_proof(hashes, first, second)],
        "first": heads[first].to_dict(),
        "second": heads[second].to_dict(),
    }


@dataclass
class ProofCheck:
    """The verdict on a proof document."""

    ok: bool
    kind: str
    problems: list[str]
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "kind": self.kind,
            "problems": self.problems,
            **self.details,
        }


def check_proof(doc: Any, public_key: LedgerPublicKey) -> ProofCheck:
    """Check an inclusion or consistency proof with the public key alone.

    Nothing but the document and the key is read: the ledger need not be at
    hand. Every problem found is listed. A field that is missing or of the
    wrong type or range is not a problem of the proof but a malformed
    document: integers must be JSON integers within the bounds of the signed
    encoding, hashes 64 hex digits.

    Raises:
        UsageError: the document is not a Strata ledger proof at all, or one
            of its fields is malformed (the message names the field).
    """
    if not isinstance(doc, dict) or doc.get("format") not in (
        INCLUSION_FORMAT,
        CONSISTENCY_FORMAT,
    ):
        raise UsageError(
            f"not a ledger proof: expected format {INCLUSION_FORMAT!r} or "
            f"{CONSISTENCY_FORMAT!r}"
        )
    if doc["format"] == INCLUSION_FORMAT:
        return _check_inclusion(doc, public_key)
    return _check_consistency(doc, public_key)


def _malformed(field: str, problem: str) -> UsageError:
    return UsageError(f"malformed ledger proof: field {field}: {problem}")


def _field(doc: dict[str, Any], name: str) -> Any:
    if name not in doc:
        raise _malformed(name, "missing")
    return doc[name]


def _count(doc: dict[str, Any], name: str, bits: int) -> int:
    value = _field(doc, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _malformed(
            name, f"expected a non-negative integer, got {json_preview(value)}"
        )
    if value >= 1 << bits:
        raise _malformed(
            name, f"expected an integer below 2**{bits}, got {json_preview(value)}"
        )
    return value


def _text(doc: dict[str, Any], name: str) -> str:
    value = _field(doc, name)
    if not isinstance(value, str):
        raise _malformed(name, f"expected a string, got {json_preview(value)}")
    return value


def _hashes(doc: dict[str, Any], name: str) -> list[bytes]:
    values = _field(doc, name)
    if not isinstance(values, list):
        raise _malformed(
            name, f"expected an array of hashes, got {json_preview(values)}"
        )
    for i, value in enumerate(values):
        if not is_hex_hash(value):
            raise _malformed(
                f"{name}[{i}]",
                f"expected 64 hex digits (a SHA-256 hash), got {json_preview(value)}",
            )
    return [bytes.fromhex(v) for v in values]


def _tree_head(doc: dict[str, Any], name: str) -> TreeHead:
    value = _field(doc, name)
    try:
        return TreeHead.from_dict(value)
    except TreeHeadError as exc:
        where = name if exc.field is None else f"{name}.{exc.field}"
        raise _malformed(where, exc.problem) from exc


def _entry_line(doc: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The entry's line as the ledger holds it, and its fields."""
    line = _text(doc, "line")
    fields: Any = None
    if line.isascii():
        try:
            fields = json.loads(line)
        except (ValueError, RecursionError):
            fields = None
    if not isinstance(fields, dict):
        raise _malformed(
            "line",
            f"expected the entry's line, a JSON object, got {json_preview(line)}",
        )
    return line.encode("ascii"), fields


def _head_problems(head: TreeHead, key: LedgerPublicKey, name: str) -> list[str]:
    if head.key_id != key.key_id:
        return [f"{name} is signed by key {head.key_id[:16]}..., not the given key"]
    if not key.verify(head.message(), head.signature):
        return [f"{name}'s signature does not verify"]
    return []


def _check_inclusion(doc: dict[str, Any], key: LedgerPublicKey) -> ProofCheck:
    partition = _count(doc, "partition", PARTITION_BITS)
    entry = _count(doc, "entry", COUNT_BITS)
    event_id = _text(doc, "event_id") if "event_id" in doc else None
    line, fields = _entry_line(doc)
    path = _hashes(doc, "audit_path")
    head = _tree_head(doc, "checkpoint")
    problems = _head_problems(head, key, "the checkpoint")
    if not verify_inclusion(leaf_hash(line), entry, head.size, path, head.root):
        problems.append(
            f"the entry is not at {entry} in the tree of {head.size} the checkpoint signs"
        )
    if fields.get("seq") != entry or fields.get("partition") != head.partition:
        problems.append("the entry's own sequence number or partition disagrees")
    if event_id is not None and fields.get("event_id") != event_id:
        problems.append(
            f"the entry is event {json_preview(fields.get('event_id'))}, not the "
            f"{json_preview(event_id)} the proof names"
        )
    if partition != head.partition:
        problems.append("the proof names another partition than its checkpoint")
    details = {
        "partition": head.partition,
        "entry": entry,
        "event_id": fields.get("event_id", ""),
        "size": head.size,
        "root": head.root.hex(),
        "key_id": head.key_id,
    }
    return ProofCheck(not problems, "inclusion", problems, details)


def _check_consistency(doc: dict[str, Any], key: LedgerPublicKey) -> ProofCheck:
    partition = _count(doc, "partition", PARTITION_BITS)
    proof = _hashes(doc, "proof")
    first = _tree_head(doc, "first")
    second = _tree_head(doc, "second")
    problems = _head_problems(first, key, "the first checkpoint")
    problems += _head_problems(second, key, "the second checkpoint")
    if first.partition != second.partition:
        problems.append("the checkpoints are of different partitions")
    if not verify_consistency(first.size, second.size, first.root, second.root, proof):
        problems.append(
            f"the tree of {second.size} does not extend the tree of {first.size}"
        )
    if partition != first.partition or partition != second.partition:
        problems.append("the proof names another partition than its checkpoints")
    details = {
        "partition": second.partition,
        "first_size": first.size,
        "second_size": second.size,
        "first_root": first.root.hex(),
        "second_root": second.root.hex(),
        "key_id": second.key_id,
    }
    return ProofCheck(not problems, "consistency", problems, details)
