"""Golden events: the checked-in bytes of every published version still decode.

The files in tests/golden were written once by make_golden.py and are never
rewritten; these tests fail when a schema or codec change would make any of
them unreadable, by the newest reader or by an older one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from schemas.check import check_golden, golden_name, read_with
from schemas.codec import Codec, SchemaRegistry
from schemas.events import EVENT_TYPES, MemoryWritten

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFEST: dict[str, Any] = json.loads((GOLDEN / "MANIFEST.json").read_text())["files"]


def _value(value: Any) -> Any:
    """Undo the manifest's JSON form (bytes are {"hex": ...})."""
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if isinstance(value, dict):
        return {k: _value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


def test_every_published_version_has_an_unchanged_golden_file() -> None:
    """No version lacks its golden file, and no golden file was rewritten."""
    registry = SchemaRegistry()
    assert {golden_name(v) for v in registry.versions()} <= set(MANIFEST)
    for name, entry in MANIFEST.items():
        data = (GOLDEN / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert data[2:10].hex() == entry["fingerprint"], name


def test_every_golden_file_decodes_under_every_reader_version() -> None:
    """Old events for new readers, new events for old readers: all resolve."""
    assert check_golden(GOLDEN, SchemaRegistry()) == []


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_golden_event_decodes_to_its_values(name: str) -> None:
    """The current codec reads each golden event into its class, value for value;
    fields its writer did not have take their defaults."""
    entry = MANIFEST[name]
    event = Codec().decode((GOLDEN / name).read_bytes())
    assert type(event) is EVENT_TYPES[entry["schema"]]
    written = _value(entry["record"])
    for fld in dataclasses.fields(event):
        actual = getattr(event, fld.name)
        if fld.name in written:
            assert actual == written[fld.name], fld.name
        elif fld.default_factory is not dataclasses.MISSING:
            assert actual == fld.default_factory(), fld.name
        else:
            assert actual == fld.default, fld.name


def test_v1_memory_written_reads_as_v2_with_defaults() -> None:
    """A v1 event gets the v2 fields' defaults and keeps every v1 value."""
    event = Codec().decode((GOLDEN / "MemoryWritten.v1.bin").read_bytes())
    assert isinstance(event, MemoryWritten)
    assert event.tags == []
    assert event.source_ref is None
    assert event.metadata == {"emotion": "calm", "source": "golden"}
    assert event.ciphertext == bytes(range(64, 112))


def test_v2_event_is_read_by_a_v1_reader() -> None:
    """A consumer still on v1 resolves a v2 event by its writer fingerprint and
    skips the fields it does not know."""
    registry = SchemaRegistry()
    v1 = next(
        v for v in registry.versions() if (v.name, v.version) == ("MemoryWritten", 1)
    )
    record = read_with((GOLDEN / "MemoryWritten.v2.bin").read_bytes(), v1, registry)
    written = _value(MANIFEST["MemoryWritten.v2.bin"]["record"])
    assert "tags" not in record
    assert "source_ref" not in record
    assert record == {
        k: v for k, v in written.items() if k not in {"tags", "source_ref"}
    }
    assert MemoryWritten(**record).tags == []


def test_new_events_are_written_with_v2_and_old_readers_still_read_them() -> None:
    """Encoding uses the newest version; the v1 reader reads the result."""
    registry = SchemaRegistry()
    v1, v2 = (v for v in registry.versions() if v.name == "MemoryWritten")
    event = MemoryWritten(
        event_id="e1",
        tenant="acme",
        key="k",
        cls="chat",
        agent="a",
        time_ms=1,
        key_id="tk",
        key_version=1,
        nonce=b"n" * 12,
        ciphertext=b"c" * 20,
        content_hash=b"h" * 32,
        tags=["backfill"],
        source_ref="legacy:records/k__chat.json",
    )
    data = Codec(registry).encode(event)
    assert data[2:10] == v2.fingerprint
    assert Codec(registry).decode(data) == event
    old = read_with(data, v1, registry)
    assert old["event_id"] == "e1"
    assert "tags" not in old
