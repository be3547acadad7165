"""Compiled Avro binary plans for the shapes Strata's events use.

fastavro interprets a parsed schema on every call, which costs a fixed few
microseconds plus a share per field: on a 1 KiB event that is a large part
of what publishing and projecting cost. A plan is compiled once per schema
into a tuple of small field readers and writers, and handles the types the
event schemas use: null, boolean, int, long, string, bytes, unions of those,
and maps and arrays of them.

A plan is only a fast path. The codec falls back to fastavro for a schema
with any other type, and for any value or byte string the plan does not
accept, so errors keep fastavro's wording and nothing a plan cannot prove it
read correctly is accepted. Tests check plans against fastavro byte for byte.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

Reader = Callable[[bytes, int], tuple[Any, int]]
Writer = Callable[[Any, list[bytes]], None]

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
# Zig-zag varints of the small non-negative numbers that lengths and counts are.
_SMALL = 1 << 12


class PlanError(ValueError):
    """Bytes or a value a plan does not accept; the caller falls back to fastavro."""


def _varint(n: int) -> bytes:
    """The zig-zag varint of a 64-bit signed integer."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL_VARINTS = [_varint(n) for n in range(_SMALL)]
# Larger values recur too: a writer's timestamps repeat within a millisecond.
_cached_varint = functools.lru_cache(maxsize=1024)(_varint)


def _length(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < _SMALL else _varint(n)


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """Read one zig-zag varint at ``pos``; return it and the next position."""
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        if shift > 63:
            raise PlanError("varint longer than 10 bytes")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    value = (n >> 1) ^ -(n & 1)
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise PlanError("varint out of the long range")
    return value, pos


def _read_int(buf: bytes, pos: int) -> tuple[int, int]:
    value, pos = read_long(buf, pos)
    if not _INT_MIN <= value <= _INT_MAX:
        raise PlanError("varint out of the int range")
    return value, pos


def _read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    size = buf[pos]
    if size < 0x80:  # one byte: a length under 64, the common case
        size = (size >> 1) ^ -(size & 1)
        pos += 1
    else:
        size, pos = read_long(buf, pos)
    end = pos + size
    if size < 0 or end > len(buf):
        raise PlanError("length outside the message")
    return buf[pos:end], end


def _read_string(buf: bytes, pos: int) -> tuple[str, int]:
    size = buf[pos]
    if size < 0x80:
        size = (size >> 1) ^ -(size & 1)
        pos += 1
    else:
        size, pos = read_long(buf, pos)
    end = pos + size
    if size < 0 or end > len(buf):
        raise PlanError("length outside the message")
    return buf[pos:end].decode(), end


def _read_null(buf: bytes, pos: int) -> tuple[None, int]:
    return None, pos


def _read_boolean(buf: bytes, pos: int) -> tuple[bool, int]:
    b = buf[pos]
    if b > 1:
        raise PlanError("boolean byte is neither 0 nor 1")
    return b == 1, pos + 1


def _write_long(value: Any, out: list[bytes]) -> None:
    if type(value) is not int or not _LONG_MIN <= value <= _LONG_MAX:
        raise PlanError("not a long")
    out.append(_length(value) if 0 <= value < _SMALL // 2 else _varint(value))


def _write_int(value: Any, out: list[bytes]) -> None:
    if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
        raise PlanError("not an int")
    out.append(_length(value) if 0 <= value < _SMALL // 2 else _varint(value))


def _write_string(value: Any, out: list[bytes]) -> None:
    if type(value) is not str:
        raise PlanError("not a string")
    raw = value.encode()
    out.append(_length(len(raw)))
    out.append(raw)


def _write_bytes(value: Any, out: list[bytes]) -> None:
    if type(value) is not bytes:
        raise PlanError("not bytes")
    out.append(_length(len(value)))
    out.append(value)


def _write_null(value: Any, out: list[bytes]) -> None:
    if value is not None:
        raise PlanError("not null")


def _write_boolean(value: Any, out: list[bytes]) -> None:
    if type(value) is not bool:
        raise PlanError("not a boolean")
    out.append(b"\x01" if value else b"\x00")


_PRIMITIVES: dict[str, tuple[Reader, Writer, type | None]] = {
    "null": (_read_null, _write_null, type(None)),
    "boolean": (_read_boolean, _write_boolean, bool),
    "int": (_read_int, _write_int, int),
    "long": (read_long, _write_long, int),
    "string": (_read_string, _write_string, str),
    "bytes": (_read_bytes, _write_bytes, bytes),
}


def _union(branches: list[Any]) -> tuple[Reader, Writer] | None:
    parts = [_PRIMITIVES.get(b) if isinstance(b, str) else None for b in branches]
    if any(p is None for p in parts):
        return None
    resolved = [p for p in parts if p is not None]
    readers = [p[0] for p in resolved]
    kinds = [p[2] for p in resolved]
    if len(set(kinds)) != len(kinds):
        return None  # int and long both match an int: leave the choice to fastavro
    tags = [_length(i) for i in range(len(resolved))]

    def read(buf: bytes, pos: int) -> tuple[Any, int]:
        index, pos = read_long(buf, pos)
        if not 0 <= index < len(readers):
            raise PlanError("union branch out of range")
        return readers[index](buf, pos)

    def write(value: Any, out: list[bytes]) -> None:
        kind = type(value)
        for i, (_, writer, expected) in enumerate(resolved):
            if kind is expected:
                out.append(tags[i])
                writer(value, out)
                return
        raise PlanError("no union branch matches")

    return read, write


def _read_blocks(buf: bytes, pos: int, read_one: Callable[[bytes, int], int]) -> int:
    """Read a map's or array's blocks (a count, when negative followed by the
    block's byte size, then the items) up to the empty block; return the end."""
    while True:
        count, pos = read_long(buf, pos)
        if count == 0:
            return pos
        if count < 0:
            count = -count
            _, pos = read_long(buf, pos)
        for _ in range(count):
            pos = read_one(buf, pos)


def _map(values: Any) -> tuple[Reader, Writer] | None:
    item = _field(values)
    if item is None:
        return None
    read_item, write_item = item

    def read(buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}

        def one(buf: bytes, pos: int) -> int:
            key, pos = _read_string(buf, pos)
            result[key], pos = read_item(buf, pos)
            return pos

        return result, _read_blocks(buf, pos, one)

    def write(value: Any, out: list[bytes]) -> None:
        if type(value) is not dict:
            raise PlanError("not a map")
        if value:
            out.append(_length(len(value)))
            for key, item_value in value.items():
                _write_string(key, out)
                write_item(item_value, out)
        out.append(b"\x00")

    return read, write


def _array(items: Any) -> tuple[Reader, Writer] | None:
    item = _field(items)
    if item is None:
        return None
    read_item, write_item = item

    def read(buf: bytes, pos: int) -> tuple[list[Any], int]:
        result: list[Any] = []

        def one(buf: bytes, pos: int) -> int:
            value, pos = read_item(buf, pos)
            result.append(value)
            return pos

        return result, _read_blocks(buf, pos, one)

    def write(value: Any, out: list[bytes]) -> None:
        if type(value) is not list:
            raise PlanError("not an array")
        if value:
            out.append(_length(len(value)))
            for item_value in value:
                write_item(item_value, out)
        out.append(b"\x00")

    return read, write


def _field(schema: Any) -> tuple[Reader, Writer] | None:
    if isinstance(schema, str):
        primitive = _PRIMITIVES.get(schema)
        return primitive[:2] if primitive else None
    if isinstance(schema, list):
        return _union(schema)
    if isinstance(schema, dict):
        kind = schema.get("type")
        if schema.get("logicalType") is not None:
            return None
        if kind == "map":
            return _map(schema["values"])
        if kind == "array":
            return _array(schema["items"])
        if isinstance(kind, str) and kind in _PRIMITIVES:
            return _PRIMITIVES[kind][:2]
    return None


class RecordPlan:
    """Reads and writes one flat record schema without fastavro.

    Args:
        schema: the record schema as JSON (not fastavro's parsed form).

    Raises:
        PlanError: the schema has a type no plan handles.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        if schema.get("type") != "record":
            raise PlanError("not a record")
        names: list[str] = []
        self._types: list[Any] = []
        readers: list[Reader] = []
        writers: list[Writer] = []
        for field in schema["fields"]:
            compiled = _field(field["type"])
            if compiled is None:
                raise PlanError(f"field {field['name']}: no plan for {field['type']!r}")
            names.append(field["name"])
            self._types.append(field["type"])
            readers.append(compiled[0])
            writers.append(compiled[1])
        self.names = tuple(names)
        self._readers = tuple(readers)
        self._steps = tuple(zip(names, writers, strict=True))

    def reader_into(
        self,
        make: Callable[..., Any],
        wanted: tuple[str, ...],
        defaults: dict[str, Any],
    ) -> Callable[[bytes, int], Any]:
        """A function reading one record from ``buf`` at ``pos`` into ``make(...)``.

        ``make`` is called with the values of the fields named by ``wanted``,
        in that order; a name the schema lacks takes a copy of its default.
        The function is generated once, with the common cases inline: a
        call per field would cost more than reading the field.

        Raises:
            PlanError: ``wanted`` names a field that is neither read nor defaulted.
        """
        scope: dict[str, Any] = {
            "PlanError": PlanError,
            "read_long": read_long,
            "make": make,
            "copy": copy.copy,
        }
        lines = ["def read(buf, pos):", "    size_of = len(buf)"]
        for i, (kind, reader) in enumerate(
            zip(self._types, self._readers, strict=True)
        ):
            lines.extend("    " + line for line in _inline(kind, f"f{i}", f"r{i}"))
            scope[f"r{i}"] = reader
        lines += ["    if pos != size_of:", "        raise PlanError('trailing bytes')"]
        args = []
        for name in wanted:
            if name in self.names:
                args.append(f"f{self.names.index(name)}")
            elif name in defaults:
                scope[f"d_{name}"] = defaults[name]
                args.append(f"copy(d_{name})")
            else:
                raise PlanError(f"field {name} is neither read nor defaulted")
        lines.append(f"    return make({', '.join(args)})")
        exec("\n".join(lines), scope)  # noqa: S102 - source built above from the schema
        function: Callable[[bytes, int], Any] = scope["read"]
        return function

    def encoder(self, prefix: bytes) -> Callable[[Any], bytes]:
        """A function encoding ``obj``'s attributes named by the schema after ``prefix``.

        Generated once, like :meth:`reader_into`. The function raises
        PlanError or AttributeError when a value is missing or of a type the
        plan does not write.
        """
        scope: dict[str, Any] = {
            "PlanError": PlanError,
            "varint": _cached_varint,
            "SMALL": _SMALL_VARINTS,
            "LIMIT": _SMALL,
            "prefix": prefix,
            "LONG_MIN": _LONG_MIN,
            "LONG_MAX": _LONG_MAX,
            "INT_MIN": _INT_MIN,
            "INT_MAX": _INT_MAX,
        }
        lines = ["def encode(obj):"]
        parts = ["prefix"]
        for i, (name, writer) in enumerate(self._steps):
            code, names = _write_code(self._types[i], i)
            lines.append(f"    v = obj.{name}")
            lines.extend("    " + line for line in code)
            parts.extend(names)
            scope[f"w{i}"] = writer
        # One join of locals: a list appended to per field costs more.
        lines.append(f"    return b''.join(({', '.join(parts)},))")
        exec("\n".join(lines), scope)  # noqa: S102 - source built above from the schema
        function: Callable[[Any], bytes] = scope["encode"]
        return function


_SIZED = """\
size = buf[pos]
if size < 0x80:
    size = (size >> 1) ^ -(size & 1)
    pos += 1
else:
    size, pos = read_long(buf, pos)
end = pos + size
if size < 0 or end > size_of:
    raise PlanError('length outside the message')
"""


def _write_code(kind: Any, i: int) -> tuple[list[str], list[str]]:
    """Source lines encoding ``v`` into local byte strings, and their names."""
    if kind in ("string", "bytes"):
        check = "str" if kind == "string" else "bytes"
        raw = "v.encode()" if kind == "string" else "v"
        return [
            f"if type(v) is not {check}:",
            f"    raise PlanError('not {kind}')",
            f"b{i} = {raw}",
            f"n = len(b{i})",
            f"a{i} = SMALL[n] if n < LIMIT else varint(n)",
        ], [f"a{i}", f"b{i}"]
    if kind in ("long", "int"):
        low, high = (
            ("LONG_MIN", "LONG_MAX") if kind == "long" else ("INT_MIN", "INT_MAX")
        )
        return [
            f"if type(v) is not int or not {low} <= v <= {high}:",
            f"    raise PlanError('not {kind}')",
            f"a{i} = SMALL[v] if 0 <= v < LIMIT else varint(v)",
        ], [f"a{i}"]
    if isinstance(kind, list) and len(kind) == 2 and kind[0] == "null":
        inner, parts = _write_code(kind[1], i)
        if parts == [f"a{i}"] and inner[-1].startswith(f"a{i} = b''.join"):
            return _closure_code(i)
        return [
            "if v is None:",
            f"    u{i} = b'\\x00'",
            *(f"    {part} = b''" for part in parts),
            "else:",
            f"    u{i} = b'\\x02'",
            *("    " + line for line in inner),
        ], [f"u{i}", *parts]
    return _closure_code(i)


def _closure_code(i: int) -> tuple[list[str], list[str]]:
    # Maps, arrays and unions of several types: the compiled writer, into a
    # list of its own.
    return ["t = []", f"w{i}(v, t)", f"a{i} = b''.join(t)"], [f"a{i}"]


def _inline(kind: Any, target: str, reader: str) -> list[str]:
    """Source lines reading one field into ``target``, advancing ``pos``."""
    if kind == "string":
        return [*_SIZED.splitlines(), f"{target} = buf[pos:end].decode()", "pos = end"]
    if kind == "bytes":
        return [*_SIZED.splitlines(), f"{target} = buf[pos:end]", "pos = end"]
    if kind == "long":
        return [f"{target}, pos = read_long(buf, pos)"]
    if kind == "null":
        return [f"{target} = None"]
    if isinstance(kind, list) and len(kind) == 2 and kind[0] == "null":
        # The optional field: tag 0 is null, tag 1 (varint 2) the value.
        inner = _inline(kind[1], target, reader)
        if inner[0].startswith(f"{target}, pos = {reader}"):
            return [f"{target}, pos = {reader}(buf, pos)"]
        return [
            "tag = buf[pos]",
            "pos += 1",
            "if tag == 0:",
            f"    {target} = None",
            "elif tag == 2:",
            *("    " + line for line in inner),
            "else:",
            "    raise PlanError('union branch out of range')",
        ]
    return [f"{target}, pos = {reader}(buf, pos)"]


def compile_plan(schema: dict[str, Any]) -> RecordPlan | None:
    """The plan of a record schema, or None when fastavro must handle it."""
    try:
        return RecordPlan(schema)
    except (PlanError, KeyError, TypeError):
        return None
