"""The ledger's files: names, the writer's checkpoint, and the entry format.

Files in the ledger folder, for partition ``N``::

    pNNNNN.log    one entry per line, one line per applied event
    pNNNNN.sth    one signed checkpoint (tree head) per line
    pNNNNN.ckpt   the writer's checkpoint, replaced atomically: next offset,
                  bytes and entries of both files, chain head, Merkle frontier
    pNNNNN.lock   serialises the writers of a partition across processes

An entry is one line of JSON, ASCII only, keys in this order: ``seq``
(0-based position), ``partition``, ``offset``, ``event_id``, ``tenant``,
``key``, ``action``, ``version``, ``time_ms``, ``event_hash`` (SHA-256 of the
raw message: ciphertext and metadata, never plaintext) and ``prev`` (the hash
of the entry before, 64 zeros for the first). An entry's hash is the RFC 6962
leaf hash of its line, ``SHA-256(0x00 || line)``, so the chain and the Merkle
tree share it.

A signed checkpoint line is :meth:`strata.signing.TreeHead.to_dict` as
compact JSON; its ``prev`` is the SHA-256 of the line before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _enc
from pathlib import Path

from projections.base import Envelope, Outcome
from projections.merkle import Frontier, leaf_hash
from strata.errors import StoreError
from strata.signing import TreeHead

GENESIS = "0" * 64


def entry_hash(line: bytes) -> bytes:
    """The hash of one entry: the RFC 6962 leaf hash of its line (no newline)."""
    return leaf_hash(line)


def log_path(directory: Path, partition: int) -> Path:
    """The entries file of a partition."""
    return directory / f"p{partition:05d}.log"


def sth_path(directory: Path, partition: int) -> Path:
    """The signed-checkpoint file of a partition."""
    return directory / f"p{partition:05d}.sth"


def ckpt_path(directory: Path, partition: int) -> Path:
    """The writer's checkpoint file of a partition."""
    return directory / f"p{partition:05d}.ckpt"


@dataclass
class PartitionState:
    """What the checkpoint file of one partition says.

    ``frontier`` holds the peaks of the Merkle tree over the ``entries``
    (:class:`~projections.merkle.Frontier`), None in checkpoints written
    before tree heads existed. ``signed_entries`` is the size of the last
    tree head and ``unsigned_since_ms`` when the oldest unsigned entry was
    appended (0 when every entry is signed).
    """

    next_offset: int = 0
    size: int = 0
    entries: int = 0
    head: str = GENESIS
    frontier: list[str] | None = field(default_factory=list)
    sth_size: int = 0
    sths: int = 0
    sth_head: str = GENESIS
    signed_entries: int = 0
    unsigned_since_ms: int = 0
    stamp: tuple[int, int] | None = field(default=None, compare=False)

    def to_json(self) -> bytes:
        """The checkpoint file's content."""
        doc = {
            "v": 2,
            "next_offset": self.next_offset,
            "size": self.size,
            "entries": self.entries,
            "head": self.head,
            "frontier": self.frontier,
            "sth_size": self.sth_size,
            "sths": self.sths,
            "sth_head": self.sth_head,
            "signed_entries": self.signed_entries,
            "unsigned_since_ms": self.unsigned_since_ms,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def tree(self) -> Frontier:
        """The Merkle frontier as an object.

        Raises:
            ValueError: the stored frontier is missing or malformed.
        """
        if self.frontier is None:
            raise ValueError("checkpoint has no Merkle frontier")
        return Frontier.from_hex(self.entries, self.frontier)


def read_state(directory: Path, partition: int) -> PartitionState:
    """Read one partition's checkpoint; a missing file means an empty ledger.

    Raises:
        StoreError: the file exists but cannot be read or parsed, or a field
            is missing or of the wrong kind (the message names it).
    """
    path = ckpt_path(directory, partition)
    where = f"ledger checkpoint {path}"
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        return PartitionState()
    except OSError as exc:
        raise StoreError(f"{where}: cannot be read: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise StoreError(f"{where}: not a JSON object: {doc!r:.40}")

    def number(name: str, default: int | None = None) -> int:
        if name not in doc:
            if default is None:
                raise StoreError(f"{where}: field {name} is missing")
            return default
        value = doc[name]
        try:
            return int(value)
        except (ValueError, TypeError, OverflowError) as exc:
            raise StoreError(
                f"{where}: field {name} is not a whole number: {value!r:.40}"
            ) from exc

    def text(name: str, default: str | None = None) -> str:
        if name not in doc:
            if default is None:
                raise StoreError(f"{where}: field {name} is missing")
            return default
        return str(doc[name])

    frontier = doc.get("frontier")
    try:
        peaks = [str(p) for p in frontier] if frontier is not None else None
    except TypeError as exc:
        raise StoreError(
            f"{where}: field frontier is not a list: {frontier!r:.40}"
        ) from exc
    return PartitionState(
        next_offset=number("next_offset"),
        size=number("size"),
        entries=number("entries"),
        head=text("head"),
        frontier=peaks,
        sth_size=number("sth_size", 0),
        sths=number("sths", 0),
        sth_head=text("sth_head", GENESIS),
        signed_entries=number("signed_entries", 0),
        unsigned_since_ms=number("unsigned_since_ms", 0),
        stamp=(st.st_mtime_ns, st.st_ino),
    )


def partitions_in(directory: Path) -> list[int]:
    """Partitions that have a ledger file, tree-head file or checkpoint."""
    found = set()
    for path in directory.glob("p*.*"):
        if path.suffix in {".log", ".ckpt", ".sth"} and path.stem[1:].isdigit():
            found.add(int(path.stem[1:]))
    return sorted(found)


def read_tree_heads(directory: Path, partition: int) -> list[TreeHead]:
    """The committed signed checkpoints of a partition, oldest first.

    Raises:
        StoreError: the file cannot be read or holds a line that is not a tree head.
    """
    state = read_state(directory, partition)
    path = sth_path(directory, partition)
    heads: list[TreeHead] = []
    try:
        with path.open("rb") as src:
            for number, line in enumerate(src):
                if number >= state.sths:
                    break
                heads.append(TreeHead.from_dict(json.loads(line)))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StoreError(f"ledger tree heads {path}: {exc}") from exc
    return heads


def entry_line(seq: int, env: Envelope, outcome: Outcome, prev: str) -> bytes:
    """The canonical line of one entry: what ``json.dumps`` with compact
    separators and ASCII escapes gives, built directly because it runs once
    per event. The numbers are ints (the codec checked them), so they need no
    format spec, which would cost a third of the call."""
    event = env.event
    return (
        f'{{"seq":{seq},"partition":{env.partition},"offset":{env.offset},'
        f'"event_id":{_enc(event.event_id)},"tenant":{_enc(event.tenant)},'
        f'"key":{_enc(getattr(event, "key", ""))},"action":{_enc(outcome.action)},'
        f'"version":{outcome.version},"time_ms":{event.time_ms},'
        f'"event_hash":"{env.event_hash.hex()}","prev":"{prev}"}}'
    ).encode()


def scan_frontier(path: Path, size: int) -> tuple[Frontier, str]:
    """The Merkle frontier and chain head of the first ``size`` bytes of a log."""
    frontier = Frontier()
    head = GENESIS
    try:
        with path.open("rb") as src:
            remaining = size
            for raw in src:
                if remaining <= 0:
                    break
                remaining -= len(raw)
                h = leaf_hash(raw.rstrip(b"\n"))
                frontier.append(h)
                head = h.hex()
    except FileNotFoundError:
        pass
    return frontier, head


def iter_entries(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number from 0, line without newline) of a ledger file."""
    with path.open("rb") as src:
        for number, line in enumerate(src):
            yield number, line.rstrip(b"\n")
