"""Schema evolution rules: no published event may become unreadable.

``strata schemas check`` runs three checks and names the field at fault:

1. **Resolution.** Every two versions of a record resolve both ways under
   Avro's schema resolution rules: newer readers read older events, and
   readers still on an older version (during a rolling deploy) read newer
   events. A field added without a default breaks the first; a field
   removed without a default, or a changed type, breaks one or both.
2. **History.** Every published version is still there, unchanged. The lock
   file records each version's fingerprint and parsing canonical form when
   it is published. The codec finds a writer schema by its fingerprint, so
   editing a published file in place, even compatibly, strands every event
   written with it; deleting the file does the same.
3. **Classes.** Each event class in :mod:`schemas.events` has exactly the
   fields of the newest version of its record, so a decoded record always
   fits its class and no field is silently dropped on encode.

Golden files, the raw bytes of one event of every published version, are
decoded by every reader version in :func:`check_golden`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from schemas.codec import (
    HEADER_SIZE,
    SCHEMA_DIR,
    Codec,
    SchemaRegistry,
    SchemaVersion,
    load_schema_file,
)
from schemas.events import EVENT_TYPES
from strata.errors import CodecError, StoreError, UsageError

#: The lock file of published schema versions, checked in beside the schemas.
LOCK_FILE = SCHEMA_DIR / "lock.json"

_PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
# Avro's promotions: a writer type on the left is readable as any on the right.
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}
_NAMED = frozenset({"record", "error", "enum", "fixed"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: which schema, which versions, which field, what is wrong."""

    schema: str
    versions: str
    field: str
    problem: str

    def __str__(self) -> str:
        where = f" field {self.field}:" if self.field else ""
        return f"{self.schema} {self.versions}:{where} {self.problem}"

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready form, with the one-line message."""
        return {**dataclasses.asdict(self), "message": str(self)}


@dataclass
class CheckReport:
    """What :func:`check_schemas` found."""

    versions: list[SchemaVersion] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unlocked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "schemas": [
                {
                    "name": v.name,
                    "version": v.version,
                    "fingerprint": v.fingerprint_hex,
                    "file": v.path.name,
                }
                for v in self.versions
            ],
            "findings": [f.to_dict() for f in self.findings],
            "unlocked": self.unlocked,
        }


@dataclass(frozen=True, slots=True)
class LockedSchema:
    """A published version as the lock file remembers it."""

    fingerprint: str
    canonical: str


def version_label(name: str, version: int) -> str:
    """``Name.vN``, the key of a version in the lock file."""
    return f"{name}.v{version}"


# -- resolution ----------------------------------------------------------------


class _Names:
    """The named types a schema defines, by full and short name."""

    def __init__(self, schema: Any) -> None:
        self.table: dict[str, Any] = {}
        self._collect(schema, "")

    def _collect(self, schema: Any, namespace: str) -> None:
        if isinstance(schema, list):
            for branch in schema:
                self._collect(branch, namespace)
            return
        if not isinstance(schema, dict):
            return
        kind = schema.get("type")
        if kind in _NAMED:
            name = str(schema["name"])
            space = schema.get("namespace", namespace)
            full = name if "." in name or not space else f"{space}.{name}"
            self.table[full] = schema
            self.table.setdefault(full.rpartition(".")[2], schema)
            if kind in {"record", "error"}:
                for fld in schema.get("fields", []):
                    self._collect(fld.get("type"), full.rpartition(".")[0])
        elif kind == "array":
            self._collect(schema.get("items"), namespace)
        elif kind == "map":
            self._collect(schema.get("values"), namespace)
        elif isinstance(kind, dict | list):
            self._collect(kind, namespace)

    def resolve(self, schema: Any) -> Any:
        """Follow a reference to a named type; unwrap ``{"type": "long"}``."""
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            return self.table.get(schema, self.table.get(schema.rpartition(".")[2]))
        if isinstance(schema, dict):
            kind = schema.get("type")
            if kind in _PRIMITIVES or isinstance(kind, dict | list):
                return self.resolve(kind)
        return schema


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return str(schema.get("type"))
    return "unknown"


def _describe(schema: Any) -> str:
    kind = _kind(schema)
    if kind == "union":
        return "[" + ", ".join(_describe(b) for b in schema) + "]"
    if kind in _NAMED:
        return f"{kind} {str(schema.get('name', '?')).rpartition('.')[2]}"
    if kind == "array":
        return f"array of {_describe(schema.get('items'))}"
    if kind == "map":
        return f"map of {_describe(schema.get('values'))}"
    return kind


def _short(name: object) -> str:
    return str(name).rpartition(".")[2]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Resolver:
    """Avro schema resolution, collecting every problem with its field path."""

    def __init__(self, writer: Any, reader: Any) -> None:
        self._wn = _Names(writer)
        self._rn = _Names(reader)
        self._seen: set[tuple[int, int]] = set()

    def problems(self, writer: Any, reader: Any, path: str) -> list[tuple[str, str]]:
        w = self._wn.resolve(writer)
        r = self._rn.resolve(reader)
        wk, rk = _kind(w), _kind(r)
        if w is None or r is None:
            return [(path, "refers to a named type that is not defined")]
        if wk == "union":
            # Each branch the writer may have used must be readable; a branch
            # that is not strands exactly the events that used it.
            return [p for branch in w for p in self.problems(branch, r, path)]
        if rk == "union":
            if any(not self.problems(w, branch, path) for branch in r):
                return []
            return [(path, f"{_describe(w)} is not among the reader's {_describe(r)}")]
        if wk in _PRIMITIVES and rk in _PRIMITIVES:
            if wk == rk or rk in _PROMOTIONS.get(wk, ()):
                return []
            return [(path, f"type changed from {wk} to {rk}")]
        if wk != rk:
            return [(path, f"type changed from {_describe(w)} to {_describe(r)}")]
        if wk in {"record", "error"}:
            return self._record(w, r, path)
        if wk == "enum":
            return self._enum(w, r, path)
        if wk == "array":
            return self.problems(w.get("items"), r.get("items"), path + "[]")
        if wk == "map":
            return self.problems(w.get("values"), r.get("values"), path + "{}")
        if wk == "fixed":
            if _short(w.get("name")) != _short(r.get("name")):
                return [(path, f"fixed {w.get('name')} became {r.get('name')}")]
            if w.get("size") != r.get("size"):
                return [
                    (
                        path,
                        f"fixed size changed from {w.get('size')} to {r.get('size')}",
                    )
                ]
            return []
        return [(path, f"unsupported type {wk}")]

    def _record(self, w: Any, r: Any, path: str) -> list[tuple[str, str]]:
        names = {_short(r.get("name"))} | {_short(a) for a in r.get("aliases", [])}
        if _short(w.get("name")) not in names:
            return [(path, f"record {w.get('name')} became {r.get('name')}")]
        pair = (id(w), id(r))
        if pair in self._seen:  # a recursive type: already being compared
            return []
        self._seen.add(pair)
        written = {f["name"]: f for f in w.get("fields", [])}
        found: list[tuple[str, str]] = []
        for fld in r.get("fields", []):
            sub = _join(path, fld["name"])
            candidates = [fld["name"], *fld.get("aliases", [])]
            match = next((written[n] for n in candidates if n in written), None)
            if match is not None:
                found += self.problems(match["type"], fld["type"], sub)
            elif "default" not in fld:
                found.append(
                    (sub, "the reader has no default and the writer does not write it")
                )
        return found

    def _enum(self, w: Any, r: Any, path: str) -> list[tuple[str, str]]:
        if _short(w.get("name")) != _short(r.get("name")):
            return [(path, f"enum {w.get('name')} became {r.get('name')}")]
        missing = [s for s in w.get("symbols", []) if s not in r.get("symbols", [])]
        if missing and "default" not in r:
            return [
                (path, f"symbols {missing} are not in the reader and it has no default")
            ]
        return []


def resolution_problems(writer: Any, reader: Any) -> list[tuple[str, str]]:
    """Why data written with ``writer`` would not read with ``reader``.

    Both are schemas as JSON values (as loaded from ``.avsc`` files). Returns
    (field path, problem) pairs; empty when every datum resolves.
    """
    return _Resolver(writer, reader).problems(writer, reader, "")


def _field_changes(old: Any, new: Any) -> list[tuple[str, str]]:
    """How the fields of a record changed, for an edited published version."""
    if _kind(old) not in {"record", "error"} or _kind(new) not in {"record", "error"}:
        return [("", f"{_describe(old)} became {_describe(new)}")]
    before = {f["name"]: f for f in old.get("fields", [])}
    after = {f["name"]: f for f in new.get("fields", [])}
    changes = [(n, "removed") for n in before if n not in after]
    changes += [(n, "added") for n in after if n not in before]
    for name in before.keys() & after.keys():
        if _canonical_type(before[name]["type"]) != _canonical_type(
            after[name]["type"]
        ):
            changes.append(
                (
                    name,
                    f"type changed from {_describe(before[name]['type'])} "
                    f"to {_describe(after[name]['type'])}",
                )
            )
    kept_before = [n for n in before if n in after]
    kept_after = [n for n in after if n in before]
    if kept_before != kept_after:
        # Avro's binary encoding is positional: reordering changes the bytes.
        changes.append((", ".join(kept_after), "fields reordered"))
    return sorted(changes)


def _canonical_type(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True)


# -- the lock file ---------------------------------------------------------------


def load_lock(path: Path) -> dict[str, LockedSchema]:
    """Read the lock file; an absent file is an empty lock.

    Raises:
        UsageError: the file exists but is not a lock file.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable schema lock file: {exc}") from exc
    try:
        return {
            label: LockedSchema(str(entry["fingerprint"]), str(entry["canonical"]))
            for label, entry in doc["published"].items()
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(
            f"{path}: field published must map Name.vN to fingerprint and canonical"
        ) from exc


def write_lock(path: Path, locked: dict[str, LockedSchema]) -> None:
    """Write the lock file atomically, sorted so diffs stay small.

    Raises:
        StoreError: it cannot be written.
    """
    doc = {
        "comment": (
            "Published schema versions. Never edit or remove an entry: events "
            "written with it must stay readable. Add versions with "
            "`strata schemas lock`."
        ),
        "published": {
            label: {"fingerprint": entry.fingerprint, "canonical": entry.canonical}
            for label, entry in sorted(locked.items())
        },
    }
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lock.")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"{path}: cannot be written: {exc}") from exc


def lock_entry(version: SchemaVersion) -> LockedSchema:
    """The lock file entry of a schema version."""
    raw = _raw(version)
    return LockedSchema(version.fingerprint_hex, to_parsing_canonical_form(raw))


# -- the checks ------------------------------------------------------------------


def _raw(version: SchemaVersion) -> Any:
    return json.loads(version.path.read_text(encoding="utf-8"))


def _load_versions(directory: Path, report: CheckReport) -> list[SchemaVersion]:
    if not directory.is_dir():
        raise UsageError(f"--dir {directory}: not a folder of .avsc files")
    versions: list[SchemaVersion] = []
    for path in sorted(directory.glob("*.avsc")):
        try:
            versions.append(load_schema_file(path))
        except CodecError as exc:
            report.findings.append(Finding(path.stem, "", "", str(exc)))
    return sorted(versions, key=lambda v: (v.name, v.version))


def _by_name(versions: Iterable[SchemaVersion]) -> dict[str, list[SchemaVersion]]:
    grouped: dict[str, list[SchemaVersion]] = {}
    for version in versions:
        grouped.setdefault(version.name, []).append(version)
    return grouped


def _check_resolution(versions: list[SchemaVersion]) -> Iterator[Finding]:
    raws = {v.version: _raw(v) for v in versions}
    for older in versions:
        for newer in versions:
            if newer.version <= older.version:
                continue
            old, new = raws[older.version], raws[newer.version]
            for path, problem in resolution_problems(old, new):
                yield Finding(
                    older.name,
                    f"v{older.version}->v{newer.version}",
                    path,
                    f"{problem}: events written with v{older.version} "
                    f"cannot be read by v{newer.version} readers",
                )
            for path, problem in resolution_problems(new, old):
                yield Finding(
                    older.name,
                    f"v{newer.version}->v{older.version}",
                    path,
                    f"{problem}: v{older.version} readers cannot read events "
                    f"written with v{newer.version}",
                )


def _check_history(
    versions: list[SchemaVersion], locked: dict[str, LockedSchema], report: CheckReport
) -> None:
    present = {version_label(v.name, v.version): v for v in versions}
    for label, entry in sorted(locked.items()):
        name, _, number = label.rpartition(".")
        current = present.get(label)
        if current is None:
            report.findings.append(
                Finding(
                    name,
                    number,
                    "",
                    f"published version is missing ({label}.avsc): events written "
                    f"with fingerprint {entry.fingerprint} would no longer decode",
                )
            )
            continue
        if current.fingerprint_hex == entry.fingerprint:
            continue
        old = json.loads(entry.canonical)
        new = json.loads(to_parsing_canonical_form(_raw(current)))
        for path, change in _field_changes(old, new) or [
            ("", "canonical form changed")
        ]:
            report.findings.append(
                Finding(
                    name,
                    number,
                    path,
                    f"{change} in a published version (fingerprint "
                    f"{entry.fingerprint} is now {current.fingerprint_hex}): events "
                    f"written with it would no longer decode; publish a new "
                    f"version instead",
                )
            )
    report.unlocked = sorted(set(present) - set(locked))


def _check_classes(grouped: dict[str, list[SchemaVersion]]) -> Iterator[Finding]:
    for name, versions in sorted(grouped.items()):
        newest = versions[-1]
        cls = EVENT_TYPES.get(name)
        if cls is None:
            yield Finding(
                name, f"v{newest.version}", "", "no event class in schemas/events.py"
            )
            continue
        schema_fields = [f["name"] for f in _raw(newest).get("fields", [])]
        class_fields = {f.name for f in dataclasses.fields(cls)}
        for missing in [n for n in schema_fields if n not in class_fields]:
            yield Finding(
                name,
                f"v{newest.version}",
                missing,
                f"class {cls.__name__} lacks this field: decoding would fail",
            )
        for extra in sorted(class_fields - set(schema_fields)):
            yield Finding(
                name,
                f"v{newest.version}",
                extra,
                f"class {cls.__name__} has a field the newest schema lacks: "
                "it would be dropped on encode",
            )


def check_schemas(
    directory: Path = SCHEMA_DIR, lock_file: Path | None = LOCK_FILE
) -> CheckReport:
    """Run every check over a folder of ``.avsc`` files.

    Args:
        directory: the schema folder.
        lock_file: the lock of published versions; None skips the history check.

    Raises:
        UsageError: the folder or the lock file cannot be used at all.
    """
    report = CheckReport()
    versions = _load_versions(directory, report)
    report.versions = versions
    grouped = _by_name(versions)
    for group in grouped.values():
        report.findings.extend(_check_resolution(group))
    if lock_file is not None:
        _check_history(versions, load_lock(lock_file), report)
    report.findings.extend(_check_classes(grouped))
    return report


def lock_new_versions(
    directory: Path = SCHEMA_DIR, lock_file: Path = LOCK_FILE
) -> list[str]:
    """Add every version not yet in the lock file; return the labels added.

    Existing entries are never changed.

    Raises:
        UsageError: the schemas do not pass :func:`check_schemas`.
        StoreError: the lock file cannot be written.
    """
    report = check_schemas(directory, lock_file)
    if not report.ok:
        raise UsageError(
            f"schemas do not pass the check ({report.findings[0]}); nothing locked"
        )
    locked = load_lock(lock_file)
    added = {
        version_label(v.name, v.version): lock_entry(v)
        for v in report.versions
        if version_label(v.name, v.version) not in locked
    }
    if added:
        write_lock(lock_file, {**locked, **added})
    return sorted(added)


# -- reading raw bytes with a chosen reader -----------------------------------


def read_with(data: bytes, reader: SchemaVersion, registry: SchemaRegistry) -> Any:
    """Decode one message with a reader version of one's choice.

    This is what a consumer built against ``reader`` does: it resolves the
    writer schema by the fingerprint in the header and reads the body into
    its own schema.

    Raises:
        MalformedEventError: the header is wrong or the body does not resolve.
        UnknownSchemaError: the fingerprint names no schema in ``registry``.
    """
    writer = Codec(registry).writer_schema(data)
    body = io.BytesIO(data[HEADER_SIZE:])
    return fastavro.schemaless_reader(body, writer.parsed, reader.parsed)


def golden_name(version: SchemaVersion) -> str:
    """The file name of a version's golden event."""
    return f"{version_label(version.name, version.version)}.bin"


def check_golden(golden_dir: Path, registry: SchemaRegistry) -> list[Finding]:
    """Decode every golden file with every reader version of its record.

    Also reports a version without a golden file, and a golden file whose
    bytes differ from the digest recorded when it was written.
    """
    manifest_path = golden_dir / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{manifest_path}: not a golden manifest: {exc}") from exc
    findings: list[Finding] = []
    grouped = _by_name(registry.versions())
    for _, versions in sorted(grouped.items()):
        for version in versions:
            findings.extend(
                _check_one_golden(golden_dir, manifest, version, versions, registry)
            )
    return findings


def _check_one_golden(
    golden_dir: Path,
    manifest: dict[str, Any],
    version: SchemaVersion,
    readers: list[SchemaVersion],
    registry: SchemaRegistry,
) -> Iterator[Finding]:
    label = f"v{version.version}"
    file_name = golden_name(version)
    path = golden_dir / file_name
    if file_name not in manifest or not path.exists():
        yield Finding(
            version.name,
            label,
            "",
            f"no golden file {file_name}: run tests/golden/make_golden.py",
        )
        return
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest[file_name]["sha256"]:
        yield Finding(
            version.name, label, "", f"{file_name} changed since it was written"
        )
    for reader in readers:
        try:
            read_with(data, reader, registry)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            yield Finding(
                version.name,
                f"v{version.version}->v{reader.version}",
                "",
                f"{file_name} does not decode: {type(exc).__name__}: {exc}",
            )
