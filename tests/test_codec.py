"""The Avro single-object codec: round trips and every way bytes can be wrong."""

from __future__ import annotations

import pytest

from schemas.codec import HEADER_SIZE, MARKER, Codec
from schemas.events import (
    MemoryDeleted,
    MemoryReencrypted,
    MemoryTiered,
    MemoryWritten,
    TenantErased,
)
from strata.errors import MalformedEventError, UnknownSchemaError

WRITTEN = MemoryWritten(
    event_id="e-1",
    tenant="acme",
    key="agent-7/profile/likes",
    cls="chat",
    agent="agent-7",
    time_ms=1_700_000_000_000,
    key_id="tk_x",
    key_version=3,
    nonce=b"\x01" * 12,
    ciphertext=b"\x02" * 64,
    content_hash=b"\x03" * 32,
    expected_version=4,
    metadata={"source": "unit"},
)

EVENTS = [
    WRITTEN,
    MemoryDeleted("e-2", "acme", "k", "agent", 1, expected_version=None),
    MemoryReencrypted(
        "e-3", "acme", "k", 2, "e-1", "tk_x", 4, b"n" * 12, b"c", b"h", 5, "job"
    ),
    MemoryTiered("e-4", "acme", "k", 2, "l2", "l3", "age", 6),
    TenantErased("e-5", "acme", 7, [1, 2]),
]


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_type_round_trips(codec: Codec, event: object) -> None:
    """Encoding then decoding gives back an equal event."""
    data = codec.encode(event)  # type: ignore[arg-type]
    assert data[:2] == MARKER
    assert codec.decode(data) == event


def test_message_names_its_writer_schema_by_fingerprint(codec: Codec) -> None:
    """Bytes 2-10 are the writer schema's Rabin fingerprint."""
    data = codec.encode(WRITTEN)
    schema = codec.writer_schema(data)
    assert schema.name == "MemoryWritten"
    assert data[2:HEADER_SIZE] == schema.fingerprint


def test_unknown_fingerprint_is_named(codec: Codec) -> None:
    data = bytearray(codec.encode(WRITTEN))
    data[2:10] = b"\xde\xad\xbe\xef\x00\x11\x22\x33"
    with pytest.raises(UnknownSchemaError, match="deadbeef00112233"):
        codec.decode(bytes(data))


def test_wrong_marker_is_refused(codec: Codec) -> None:
    data = b"\x00\x01" + codec.encode(WRITTEN)[2:]
    with pytest.raises(MalformedEventError, match="marker 0001"):
        codec.decode(data)


def test_shorter_than_header(codec: Codec) -> None:
    with pytest.raises(MalformedEventError, match="shorter than the 10-byte header"):
        codec.decode(MARKER + b"\x00")


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_truncated_body_is_refused(codec: Codec, cut: int) -> None:
    data = codec.encode(WRITTEN)
    with pytest.raises(
        MalformedEventError, match=r"MemoryWritten v\d+: body ends early"
    ):
        codec.decode(data[:-cut])


def test_trailing_bytes_are_refused(codec: Codec) -> None:
    with pytest.raises(MalformedEventError, match="trailing bytes"):
        codec.decode(codec.encode(WRITTEN) + b"\x00")


def test_wrong_field_type_on_encode_names_the_field(codec: Codec) -> None:
    bad = MemoryWritten(**{**WRITTEN.to_record(), "key_version": "three"})  # type: ignore[arg-type]
    with pytest.raises(MalformedEventError, match="key_version"):
        codec.encode(bad)


def test_garbage_body_is_refused(codec: Codec) -> None:
    data = codec.encode(WRITTEN)
    garbage = data[:HEADER_SIZE] + b"\xff" * (len(data) - HEADER_SIZE)
    with pytest.raises(MalformedEventError):
        codec.decode(garbage)
