"""Avro single-object encoding of Strata events.

A message is ``C3 01``, the writer schema's 64-bit CRC-64-AVRO (Rabin)
fingerprint in little-endian order, then the Avro binary body. A reader looks
the writer schema up by that fingerprint in the registry of every schema ever
published (the ``.avsc`` files beside this module) and resolves it against the
newest version of the same record, so old events stay readable.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import validate

from schemas.binary import PlanError, RecordPlan, compile_plan
from schemas.events import EVENT_TYPES, Event
from strata.errors import MalformedEventError, UnknownSchemaError

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
SCHEMA_DIR = Path(__file__).resolve().parent
_FILE_RE = re.compile(r"^(?P<name>[A-Za-z]+)\.v(?P<version>\d+)\.avsc$")


@dataclass(frozen=True)
class SchemaVersion:
    """One published schema: its record name, version and identity."""

    name: str
    version: int
    path: Path
    fingerprint: bytes
    parsed: Any

    @property
    def fingerprint_hex(self) -> str:
        """The fingerprint as 16 hex digits, as it appears on the wire."""
        return self.fingerprint.hex()


def _rabin(schema: Any) -> bytes:
    canonical = to_parsing_canonical_form(schema)
    return int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")


def load_schema_file(path: Path) -> SchemaVersion:
    """Parse one ``Name.vN.avsc`` file.

    Raises:
        MalformedEventError: the file name or its JSON is not a valid schema.
    """
    match = _FILE_RE.match(path.name)
    if match is None:
        raise MalformedEventError(f"{path}: schema files are named Name.vN.avsc")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        parsed = fastavro.parse_schema(raw)
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise MalformedEventError(f"{path}: not a valid Avro schema: {exc}") from exc
    if raw.get("name") != match["name"]:
        raise MalformedEventError(
            f"{path}: record name {raw.get('name')!r} differs from the file name"
        )
    return SchemaVersion(
        name=match["name"],
        version=int(match["version"]),
        path=path,
        fingerprint=_rabin(raw),
        parsed=parsed,
    )


class SchemaRegistry:
    """Every published schema version, by fingerprint and by name."""

    def __init__(self, directory: Path = SCHEMA_DIR) -> None:
        self._by_fp: dict[bytes, SchemaVersion] = {}
        self._latest: dict[str, SchemaVersion] = {}
        for path in sorted(directory.glob("*.avsc")):
            self.add(load_schema_file(path))

    def add(self, schema: SchemaVersion) -> None:
        """Register one schema version; the highest version of a name is its latest."""
        self._by_fp[schema.fingerprint] = schema
        current = self._latest.get(schema.name)
        if current is None or schema.version > current.version:
            self._latest[schema.name] = schema

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        """The schema with this fingerprint, or None."""
        return self._by_fp.get(fp)

    def latest(self, name: str) -> SchemaVersion:
        """The newest version of a record name."""
        return self._latest[name]

    def versions(self) -> list[SchemaVersion]:
        """Every registered schema, by name then version."""
        return sorted(self._by_fp.values(), key=lambda s: (s.name, s.version))


class Codec:
    """Encodes events with their writer fingerprint and decodes them by it."""

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self.registry = registry or SchemaRegistry()
        self._plans: dict[tuple[bytes, bytes], object] = {}
        self._binary: dict[bytes, RecordPlan | None] = {}
        self._readers: dict[bytes, Callable[[bytes, int], Any] | None] = {}
        self._encoders: dict[bytes, Callable[[Any], bytes] | None] = {}

    def _plan(self, schema: SchemaVersion) -> RecordPlan | None:
        if schema.fingerprint not in self._binary:
            raw = json.loads(schema.path.read_text(encoding="utf-8"))
            self._binary[schema.fingerprint] = compile_plan(raw)
        return self._binary[schema.fingerprint]

    def encode(self, event: Event) -> bytes:
        """Encode an event with the newest schema of its type.

        Raises:
            MalformedEventError: a field is missing or of the wrong type.
        """
        schema = self.registry.latest(event.schema_name)
        if schema.fingerprint not in self._encoders:
            plan = self._plan(schema)
            self._encoders[schema.fingerprint] = (
                plan.encoder(MARKER + schema.fingerprint) if plan else None
            )
        fast = self._encoders[schema.fingerprint]
        if fast is not None:
            try:
                return fast(event)
            except (PlanError, AttributeError, TypeError, UnicodeError):
                pass  # fastavro below names what is wrong, or accepts it
        record = event.to_record()
        out = io.BytesIO()
        out.write(MARKER)
        out.write(schema.fingerprint)
        try:
            fastavro.schemaless_writer(out, schema.parsed, record)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise MalformedEventError(
                f"{event.schema_name}: {_explain(schema.parsed, record, exc)}"
            ) from exc
        return out.getvalue()

    def decode(self, data: bytes) -> Event:
        """Decode one message value into its event.

        Raises:
            MalformedEventError: wrong marker, truncated bytes, or a bad field.
            UnknownSchemaError: the fingerprint names no published schema.
        """
        writer = self.writer_schema(data)
        fast = self._fast_reader(writer)
        if fast is not None:
            try:
                event: Event = fast(data, HEADER_SIZE)
            except (PlanError, IndexError, UnicodeDecodeError):
                pass  # fastavro below says what is wrong with the bytes
            else:
                return event
        reader = self.registry.latest(writer.name)
        body = io.BytesIO(memoryview(data)[HEADER_SIZE:])
        added = self._added_defaults(writer, reader)
        try:
            if added is not None:
                record = fastavro.schemaless_reader(body, writer.parsed, None)
                assert isinstance(record, dict)
                for name, default in added.items():
                    record[name] = copy.copy(default)
            else:
                record = fastavro.schemaless_reader(body, writer.parsed, reader.parsed)
        except (EOFError, StopIteration) as exc:
            raise MalformedEventError(
                f"{writer.name} v{writer.version}: body ends early: its "
                f"{len(data) - HEADER_SIZE} bytes do not hold a whole record"
            ) from exc
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise MalformedEventError(
                f"{writer.name} v{writer.version}: body does not decode: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if body.tell() != len(data) - HEADER_SIZE:
            raise MalformedEventError(
                f"{writer.name} v{writer.version}: {len(data) - HEADER_SIZE - body.tell()}"
                " trailing bytes after the record"
            )
        assert isinstance(record, dict)
        return EVENT_TYPES[writer.name](**record)

    def _fast_reader(self, writer: SchemaVersion) -> Callable[[bytes, int], Any] | None:
        """A compiled read of this writer version into the newest event class."""
        if writer.fingerprint in self._readers:
            return self._readers[writer.fingerprint]
        fast = None
        plan = self._plan(writer)
        added = self._added_defaults(writer, self.registry.latest(writer.name))
        cls = EVENT_TYPES[writer.name]
        wanted = tuple(f.name for f in dataclasses.fields(cls))
        if (
            plan is not None
            and added is not None
            and sorted(plan.names + tuple(added)) == sorted(wanted)
        ):
            fast = plan.reader_into(cls, wanted, added)
        self._readers[writer.fingerprint] = fast
        return fast

    def _added_defaults(
        self, writer: SchemaVersion, reader: SchemaVersion
    ) -> dict[str, Any] | None:
        """Defaults of the fields the reader adds, when that is its only change.

        Resolving by fastavro costs several times a plain read. When the newer
        schema only appends fields with defaults (the common evolution), the
        same record comes from reading with the writer schema and adding the
        defaults. None means full resolution is needed.
        """
        plan = self._plans.get((writer.fingerprint, reader.fingerprint), _UNPLANNED)
        if plan is _UNPLANNED:
            plan = _additions_only(writer, reader)
            self._plans[(writer.fingerprint, reader.fingerprint)] = plan
        return plan  # type: ignore[return-value]

    def writer_schema(self, data: bytes) -> SchemaVersion:
        """The writer schema a message names in its header.

        Raises:
            MalformedEventError: the header is missing or not single-object encoding.
            UnknownSchemaError: the fingerprint names no published schema.
        """
        if len(data) < HEADER_SIZE:
            raise MalformedEventError(
                f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header"
            )
        if data[:2] != MARKER:
            raise MalformedEventError(
                f"marker {bytes(data[:2]).hex()} is not Avro single-object encoding (c301)"
            )
        fp = bytes(data[2:HEADER_SIZE])
        schema = self.registry.by_fingerprint(fp)
        if schema is None:
            raise UnknownSchemaError(f"no published schema has fingerprint {fp.hex()}")
        return schema


_UNPLANNED = object()


def _additions_only(
    writer: SchemaVersion, reader: SchemaVersion
) -> dict[str, Any] | None:
    """The reader's added fields and defaults if it only adds defaulted fields."""
    if writer is reader:
        return {}
    w_raw = json.loads(writer.path.read_text(encoding="utf-8"))
    r_raw = json.loads(reader.path.read_text(encoding="utf-8"))
    w_fields = {f["name"]: f for f in w_raw["fields"]}
    r_fields = {f["name"]: f for f in r_raw["fields"]}
    if [f["name"] for f in r_raw["fields"]][: len(w_fields)] != list(w_fields):
        return None
    for name, field in w_fields.items():
        if r_fields[name].get("type") != field.get("type"):
            return None
    added = {n: f for n, f in r_fields.items() if n not in w_fields}
    if any("default" not in f for f in added.values()):
        return None
    return {n: f["default"] for n, f in added.items()}


def _explain(schema: Any, record: dict[str, Any], exc: Exception) -> str:
    """Name the offending field, which fastavro's writer errors often omit."""
    try:
        validate(record, schema, raise_errors=True, strict=True)
    except fastavro.validation.ValidationError as verr:
        return "; ".join(str(e) for e in verr.errors)
    except Exception as verr:  # noqa: BLE001 - fall back to the writer's own message
        return f"{type(exc).__name__}: {exc} (validation failed too: {verr})"
    return f"{type(exc).__name__}: {exc}"
