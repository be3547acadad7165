"""Reading a legacy export: how records map to events, and how bad ones fail.

Pure logic, no broker: the ExportReader turns files into records or failures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from producers.backfill import (
    ExportReader,
    Failure,
    LegacyRecord,
    SourceRef,
    parse_time_ms,
)

LIMIT = 1024
#: 1700000000 in full-width digits: digits to Unicode, not to a Unix time.
FULL_WIDTH_DIGITS = "\uff11\uff17" + "\uff10" * 8


def _write(root: Path, rel: str, doc: Any) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


def _read(
    root: Path, *, tenant: str | None = "fallback", source: str = "legacy"
) -> list[Any]:
    return list(
        ExportReader(root, source=source, tenant=tenant, max_payload_bytes=LIMIT)
    )


def test_key_class_tenant_time_and_metadata_mapping(tmp_path: Path) -> None:
    """Sub-folders and %-escapes form the key; meta becomes string metadata."""
    _write(
        tmp_path,
        "records/agent-7/profile%2Flikes__chat.json",
        {
            "payload": "tea, not coffee",
            "meta": {
                "tenant_id": "acme",
                "created_at": "2024-02-03T04:05:06.789Z",
                "emotion": "calm",
                "score": 0.5,
                "flags": ["a", "b"],
                "seen": True,
                "none": None,
            },
            "cls": "chat",
        },
    )
    [record] = _read(tmp_path)
    assert isinstance(record, LegacyRecord)
    assert (record.tenant, record.key, record.cls) == (
        "acme",
        "agent-7/profile/likes",
        "chat",
    )
    assert record.payload == b"tea, not coffee"
    assert record.time_ms == 1_706_933_106_789
    assert record.metadata == {
        "created_at": "2024-02-03T04:05:06.789Z",
        "emotion": "calm",
        "score": "0.5",
        "flags": '["a","b"]',
        "seen": "true",
        "none": "null",
    }
    assert record.where == SourceRef("records/agent-7/profile%2Flikes__chat.json")


def test_object_payload_is_canonical_json_and_default_tenant_applies(
    tmp_path: Path,
) -> None:
    """Key order in the source does not change the payload or the event id."""
    _write(
        tmp_path,
        "records/a__ops.json",
        {"payload": {"b": 1, "a": "é"}, "meta": {}, "cls": "ops"},
    )
    _write(
        tmp_path,
        "records/b__ops.json",
        '{"cls": "ops", "meta": {}, "payload": {"a": "é", "b": 1}}',
    )
    first, second = _read(tmp_path)
    assert first.payload == '{"a":"é","b":1}'.encode()
    assert first.payload == second.payload
    assert first.tenant == "fallback"
    assert first.time_ms is None
    assert first.event_id != second.event_id  # keys a and b differ


def test_event_id_is_deterministic_and_depends_on_source_and_content(
    tmp_path: Path,
) -> None:
    """Same record, same id wherever it sits; another source name, another id."""
    doc = {"payload": "x", "meta": {"tenant_id": "acme"}, "cls": "chat"}
    _write(tmp_path / "one", "records/k__chat.json", doc)
    _write(tmp_path / "two", "lines.jsonl", json.dumps({**doc, "key": "k"}) + "\n")
    [a] = _read(tmp_path / "one")
    [b] = _read(tmp_path / "two")
    [c] = _read(tmp_path / "one", source="other-system")
    _write(tmp_path / "one", "records/k__chat.json", {**doc, "payload": "y"})
    [d] = _read(tmp_path / "one")
    assert a.event_id == b.event_id
    assert len({a.event_id, c.event_id, d.event_id}) == 3
    assert len(a.event_id) == 32


def test_jsonl_lines_are_numbered_and_blank_lines_skipped(tmp_path: Path) -> None:
    """Each line is a record with its own line number; a bad line fails alone."""
    lines = [
        json.dumps({"key": "a", "payload": "1", "meta": {}, "cls": "chat"}),
        "",
        '{"key": "b", "payload": ',
        json.dumps({"key": "c", "payload": "3", "meta": {}, "cls": "chat"}),
        '{"key": "d", "payload": "a\tb"}',
    ]
    _write(tmp_path, "dump/part.jsonl", "\n".join(lines) + "\n")
    items = _read(tmp_path)
    assert [i.where for i in items] == [
        SourceRef("dump/part.jsonl", 1),
        SourceRef("dump/part.jsonl", 3),
        SourceRef("dump/part.jsonl", 4),
        SourceRef("dump/part.jsonl", 5),
    ]
    assert isinstance(items[1], Failure)
    assert items[1].kind == "invalid_json"
    # The line is in where; the reason says where in it, as one sentence.
    assert items[1].reason == "end of line: Expecting value"
    assert isinstance(items[3], Failure)
    assert items[3].reason == "column 27: Invalid control character"
    assert [i.key for i in items if isinstance(i, LegacyRecord)] == ["a", "c"]


@pytest.mark.parametrize(
    ("doc", "kind", "reason"),
    [
        ([1, 2], "invalid_field", "expected a JSON object, got an array"),
        ({"meta": {}, "cls": "chat"}, "missing_field", "missing field payload"),
        ({"payload": "x"}, "missing_field", "missing field meta, cls"),
        (
            {"payload": 3, "meta": {}, "cls": "chat"},
            "invalid_field",
            "field payload: expected a string or a JSON object, got a number",
        ),
        (
            {"payload": "x", "meta": [], "cls": "chat"},
            "invalid_field",
            "field meta: expected an object, got an array",
        ),
        (
            {"payload": "x", "meta": {}, "cls": "ops"},
            "invalid_field",
            "field cls 'ops' differs from the file name's class 'chat'",
        ),
        (
            {"payload": "x", "meta": {"created_at": "yesterday"}, "cls": "chat"},
            "invalid_field",
            "field meta.created_at: 'yesterday' is not an ISO 8601 time",
        ),
        (
            {"payload": "x", "meta": {"created_at": 1e300}, "cls": "chat"},
            "invalid_field",
            "field meta.created_at: 1e+300 is outside 1970-01-01 to 9999-12-31, "
            "the times a memory can hold",
        ),
        (
            {"payload": "x", "meta": {"created_at": 10**400}, "cls": "chat"},
            "invalid_field",
            f"field meta.created_at: {str(10**400)[:77]}... is outside 1970-01-01 "
            "to 9999-12-31, the times a memory can hold",
        ),
        (
            {
                "payload": "x",
                "meta": {"created_at": FULL_WIDTH_DIGITS},
                "cls": "chat",
            },
            "invalid_field",
            f"field meta.created_at: {FULL_WIDTH_DIGITS!r} is not an ISO 8601 time",
        ),
        (
            {"payload": "x", "meta": {"created_at": -5}, "cls": "chat"},
            "invalid_field",
            "field meta.created_at: -5 is outside 1970-01-01 to 9999-12-31, "
            "the times a memory can hold",
        ),
        (
            {"payload": "x", "meta": {}, "cls": "chat", "key": "other"},
            "invalid_field",
            "field key 'other' differs from the file name's key 'k'",
        ),
        (
            {"payload": "x", "meta": {"tenant_id": "a/b"}, "cls": "chat"},
            "invalid_field",
            "tenant 'a/b': use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit",
        ),
        (
            {"payload": "x" * (LIMIT + 1), "meta": {}, "cls": "chat"},
            "too_large",
            f"payload is {LIMIT + 1} bytes; the limit is {LIMIT} (STRATA_MAX_PAYLOAD_BYTES)",
        ),
    ],
)
def test_bad_records_fail_with_their_reason(
    tmp_path: Path, doc: Any, kind: str, reason: str
) -> None:
    """Each problem is one failure naming the field."""
    _write(tmp_path, "records/k__chat.json", doc)
    assert _read(tmp_path) == [Failure(SourceRef("records/k__chat.json"), kind, reason)]


def test_record_without_tenant_fails_without_a_default(tmp_path: Path) -> None:
    """No meta.tenant_id and no --tenant: the record is not guessed into a tenant."""
    _write(
        tmp_path, "records/k__chat.json", {"payload": "x", "meta": {}, "cls": "chat"}
    )
    [failure] = _read(tmp_path, tenant=None)
    assert failure == Failure(
        SourceRef("records/k__chat.json"),
        "missing_field",
        "missing field meta.tenant_id (and no default tenant: --tenant)",
    )


def test_a_null_tenant_id_takes_the_default_tenant(tmp_path: Path) -> None:
    """``"tenant_id": null`` is no tenant_id: --tenant applies, or it fails as missing."""
    _write(
        tmp_path,
        "records/k__chat.json",
        {"payload": "x", "meta": {"tenant_id": None}, "cls": "chat", "key": "k"},
    )
    [record] = _read(tmp_path, tenant="fallback")
    assert isinstance(record, LegacyRecord)
    assert (record.tenant, record.key, record.metadata) == ("fallback", "k", {})
    [failure] = _read(tmp_path, tenant=None)
    assert isinstance(failure, Failure)
    assert failure.kind == "missing_field"


def test_files_that_are_not_regular_are_never_opened(tmp_path: Path) -> None:
    """A FIFO would block a reader; a folder named like a record is reported."""
    (tmp_path / "records").mkdir()
    os.mkfifo(tmp_path / "records" / "pipe__chat.json")
    (tmp_path / "records" / "folder__chat.json").mkdir()
    (tmp_path / "records" / "bad__chat.json").write_bytes(b'{"payload": "\xff"}')
    assert sorted(_read(tmp_path), key=lambda f: f.where.path) == [
        Failure(
            SourceRef("records/bad__chat.json"),
            "unreadable",
            "not UTF-8 text (byte 0xff at offset 13)",
        ),
        Failure(
            SourceRef("records/folder__chat.json"),
            "unreadable",
            "not a regular file (a directory)",
        ),
        Failure(
            SourceRef("records/pipe__chat.json"),
            "unreadable",
            "not a regular file (a FIFO)",
        ),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("1970-01-01T00:00:01Z", 1000),
        ("1970-01-01T00:00:01", 1000),
        ("1970-01-01T01:00:01+01:00", 1000),
        (1.5, 1500),
        (1_700_000_000, 1_700_000_000_000),
        (1_700_000_000_123, 1_700_000_000_123),
        ("1700000000", 1_700_000_000_000),
    ],
)
def test_created_at_forms(value: object, expected: int | None) -> None:
    """ISO 8601 (no zone is UTC), Unix seconds, or milliseconds from 10^11 up."""
    assert parse_time_ms(value) == expected


def test_a_link_out_of_the_export_is_refused_and_one_inside_is_read(
    tmp_path: Path,
) -> None:
    """A record file that links outside the export would import whatever it
    names; a link between files of the export is an ordinary record."""
    root = tmp_path / "export"
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"payload": "not ours", "meta": {}, "cls": "chat"}))
    _write(
        root, "records/kept__chat.json", {"payload": "ours", "meta": {}, "cls": "chat"}
    )
    (root / "records" / "stolen__chat.json").symlink_to(outside)
    (root / "records" / "alias__chat.json").symlink_to(
        root / "records" / "kept__chat.json"
    )
    items = {str(i.where): i for i in _read(root)}
    stolen = items["records/stolen__chat.json"]
    assert isinstance(stolen, Failure)
    assert (stolen.kind, stolen.reason) == (
        "unreadable",
        "a link to a file outside the export",
    )
    assert isinstance(items["records/alias__chat.json"], LegacyRecord)
    assert isinstance(items["records/kept__chat.json"], LegacyRecord)


def test_a_folder_link_is_reported_not_skipped(tmp_path: Path) -> None:
    """Links to folders are not followed (out of the export, or in a loop),
    and each is a failure in the report rather than records silently missed."""
    outside = tmp_path / "elsewhere"
    _write(outside, "n__chat.json", {"payload": "x", "meta": {}, "cls": "chat"})
    root = tmp_path / "export"
    _write(root, "records/kept__chat.json", {"payload": "y", "meta": {}, "cls": "chat"})
    (root / "records" / "agent-9").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    items = {str(i.where): i for i in _read(root)}
    for linked in ("records/agent-9", "loop"):
        failure = items[linked]
        assert isinstance(failure, Failure), linked
        assert (failure.kind, failure.reason) == (
            "unreadable",
            "a link to a folder (links are not followed)",
        )
    assert isinstance(items["records/kept__chat.json"], LegacyRecord)
    assert len(items) == 3
