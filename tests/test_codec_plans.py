"""Compiled binary plans agree with fastavro, byte for byte, on good and bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from typing import Any

import fastavro
import pytest

from schemas.binary import compile_plan
from schemas.codec import HEADER_SIZE, MARKER, Codec, SchemaVersion
from schemas.events import EVENT_TYPES, Event, MemoryWritten
from strata.errors import MalformedEventError

_CODEC = Codec()
_SCHEMAS = _CODEC.registry.versions()
_LATEST = [s for s in _SCHEMAS if _CODEC.registry.latest(s.name) is s]


def _raw(schema: SchemaVersion) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(schema.path.read_text(encoding="utf-8"))
    return raw


def _text(rng: random.Random) -> str:
    alphabet = "aZ09/._-é✓𝄞 \u00a0"
    return "".join(
        rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 63, 64, 300]))
    )


def _value(kind: Any, rng: random.Random) -> Any:
    if isinstance(kind, list):
        return _value(rng.choice(kind), rng)
    if isinstance(kind, dict):
        if kind["type"] == "map":
            return {
                _text(rng): _value(kind["values"], rng) for _ in range(rng.randrange(4))
            }
        if kind["type"] == "array":
            return [_value(kind["items"], rng) for _ in range(rng.randrange(4))]
    edges = {
        "long": [0, 1, -1, 63, 64, -65, 2**31, 2**63 - 1, -(2**63), 1_700_000_000_000],
        "int": [0, 1, -1, 4095, 4096, 2**31 - 1, -(2**31)],
    }
    if kind in edges:
        return rng.choice(edges[kind])
    if kind == "string":
        return _text(rng)
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 12, 32, 63, 64, 1040, 5000]))
    if kind == "boolean":
        return rng.random() < 0.5
    assert kind == "null"
    return None


def _event(schema: SchemaVersion, rng: random.Random) -> Event:
    values = {f["name"]: _value(f["type"], rng) for f in _raw(schema)["fields"]}
    return EVENT_TYPES[schema.name](**values)


def _fastavro_bytes(schema: SchemaVersion, event: Event) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema.parsed, event.to_record())
    return MARKER + schema.fingerprint + out.getvalue()


def test_every_published_schema_has_a_plan() -> None:
    """The fast path covers every event: a schema it misses would be silently slow."""
    assert all(compile_plan(_raw(s)) is not None for s in _SCHEMAS)


@pytest.mark.parametrize("schema", _LATEST, ids=lambda s: f"{s.name}.v{s.version}")
def test_plan_encoding_equals_fastavro(schema: SchemaVersion) -> None:
    """500 random events per type, edge values included: identical bytes."""
    rng = random.Random(schema.name)
    for _ in range(500):
        event = _event(schema, rng)
        assert _CODEC.encode(event) == _fastavro_bytes(schema, event)


@pytest.mark.parametrize("schema", _SCHEMAS, ids=lambda s: f"{s.name}.v{s.version}")
def test_plan_decoding_equals_fastavro(schema: SchemaVersion) -> None:
    """Bytes written by fastavro under every version read back as fastavro reads them."""
    rng = random.Random(schema.name + str(schema.version))
    latest = _CODEC.registry.latest(schema.name)
    slow = Codec()
    slow._readers = dict.fromkeys((s.fingerprint for s in _SCHEMAS), None)
    for _ in range(300):
        values = {f["name"]: _value(f["type"], rng) for f in _raw(schema)["fields"]}
        body = io.BytesIO()
        fastavro.schemaless_writer(body, schema.parsed, values)
        data = MARKER + schema.fingerprint + body.getvalue()
        expected = slow.decode(data)
        assert _CODEC.decode(data) == expected
        assert type(expected).__name__ == latest.name


def test_damaged_bytes_are_judged_as_fastavro_judges_them() -> None:
    """Flipped, cut and extended messages: same event or the same kind of error."""
    rng = random.Random(7)
    slow = Codec()
    slow._readers = dict.fromkeys((s.fingerprint for s in _SCHEMAS), None)
    schema = _CODEC.registry.latest("MemoryWritten")
    outcomes = {"same event": 0, "both refuse": 0}
    for _ in range(3000):
        data = bytearray(_fastavro_bytes(schema, _event(schema, rng)))
        how = rng.randrange(3)
        if how == 0:
            at = rng.randrange(HEADER_SIZE, len(data))
            data[at] ^= 1 << rng.randrange(8)
        elif how == 1:
            del data[rng.randrange(HEADER_SIZE, len(data)) :]
        else:
            data += rng.randbytes(rng.randrange(1, 4))
        try:
            expected: object = slow.decode(bytes(data))
        except MalformedEventError:
            expected = MalformedEventError
        try:
            got: object = _CODEC.decode(bytes(data))
        except MalformedEventError:
            got = MalformedEventError
        assert got == expected
        outcomes["both refuse" if got is MalformedEventError else "same event"] += 1
    assert outcomes["both refuse"] > 100
    assert outcomes["same event"] > 100


@pytest.mark.parametrize(
    ("field", "value"),
    [("time_ms", "soon"), ("cls", 5), ("metadata", {"a": 1}), ("nonce", "text")],
)
def test_a_wrong_value_is_named_as_before(field: str, value: object) -> None:
    """A value the plan refuses reaches fastavro, whose error names the field."""
    schema = _CODEC.registry.latest("MemoryWritten")
    event = _event(schema, random.Random(1))
    assert isinstance(event, MemoryWritten)
    bad = dataclasses.replace(event, **{field: value})
    with pytest.raises(MalformedEventError, match=field):
        _CODEC.encode(bad)
