"""`strata schemas check`: schema changes that would strand an event are refused.

Each test copies the published schemas into a folder of its own, makes one
edit, and checks that the finding names the field at fault.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas.check import (
    check_schemas,
    load_lock,
    lock_new_versions,
    resolution_problems,
)
from schemas.codec import SCHEMA_DIR
from strata.errors import UsageError

STRATA = str(Path(sys.executable).with_name("strata"))


@pytest.fixture
def schema_dir(tmp_path: Path) -> Path:
    """A copy of the published schemas and their lock file."""
    target = tmp_path / "schemas"
    target.mkdir()
    for path in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(path, target / path.name)
    shutil.copy(SCHEMA_DIR / "lock.json", target / "lock.json")
    return target


def _load(folder: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((folder / name).read_text())
    return doc


def _save(folder: Path, name: str, doc: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(doc, indent=2))


def _next_version(folder: Path, edit: Any) -> None:
    """Write MemoryWritten.v3 as v2 changed by ``edit(fields)``."""
    doc = _load(folder, "MemoryWritten.v2.avsc")
    doc["fields"] = edit(doc["fields"])
    _save(folder, "MemoryWritten.v3.avsc", doc)


def _findings(folder: Path) -> list[tuple[str, str, str]]:
    report = check_schemas(folder, folder / "lock.json")
    return [(f.versions, f.field, f.problem) for f in report.findings]


def test_the_published_schemas_pass_and_are_all_locked() -> None:
    """The repository's schemas resolve both ways, match the lock and the classes."""
    report = check_schemas()
    assert report.ok, [str(f) for f in report.findings]
    assert report.unlocked == []
    assert {(v.name, v.version) for v in report.versions} >= {
        ("MemoryWritten", 1),
        ("MemoryWritten", 2),
    }


def test_a_changed_field_type_is_named_in_both_directions(schema_dir: Path) -> None:
    """time_ms as a string would strand every earlier event and confuse old readers."""

    def retype(fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {**f, "type": "string"} if f["name"] == "time_ms" else f for f in fields
        ]

    _next_version(schema_dir, retype)
    found = _findings(schema_dir)
    resolution = [(v, f, p) for v, f, p in found if "->" in v]
    assert ("v1->v3", "time_ms") in {(v, f) for v, f, _ in resolution}
    assert ("v3->v2", "time_ms") in {(v, f) for v, f, _ in resolution}
    assert all(f == "time_ms" for _, f, _ in resolution)
    problem = next(p for v, f, p in resolution if v == "v1->v3")
    assert problem.startswith("type changed from long to string")


def test_a_field_removed_without_default_is_named(schema_dir: Path) -> None:
    """Older readers need `agent` and have no default for it."""
    _next_version(schema_dir, lambda fs: [f for f in fs if f["name"] != "agent"])
    found = [(v, f) for v, f, _ in _findings(schema_dir) if "->" in v]
    assert sorted(found) == [("v3->v1", "agent"), ("v3->v2", "agent")]


def test_a_field_added_without_default_is_named(schema_dir: Path) -> None:
    """A new reader cannot fill `priority` in events written before it existed."""
    _next_version(schema_dir, lambda fs: [*fs, {"name": "priority", "type": "int"}])
    found = [(v, f) for v, f, _ in _findings(schema_dir) if "->" in v]
    assert sorted(found) == [("v1->v3", "priority"), ("v2->v3", "priority")]


def test_a_compatible_version_needs_its_field_in_the_event_class(
    schema_dir: Path,
) -> None:
    """A field added with a default resolves; only the missing class field is found."""
    _next_version(
        schema_dir,
        lambda fs: [*fs, {"name": "priority", "type": "int", "default": 0}],
    )
    assert _findings(schema_dir) == [
        (
            "v3",
            "priority",
            "class MemoryWritten lacks this field: decoding would fail",
        )
    ]
    with pytest.raises(UsageError, match="priority"):
        lock_new_versions(schema_dir, schema_dir / "lock.json")


def test_editing_a_published_version_in_place_is_refused(schema_dir: Path) -> None:
    """Even a promotable change alters the fingerprint that old events carry."""
    doc = _load(schema_dir, "MemoryWritten.v1.avsc")
    for fld in doc["fields"]:
        if fld["name"] == "key_version":
            fld["type"] = "long"
    _save(schema_dir, "MemoryWritten.v1.avsc", doc)
    found = _findings(schema_dir)
    # v2 readers (int) could not read what the edited v1 (long) describes either.
    assert sorted((v, f) for v, f, _ in found) == [
        ("v1", "key_version"),
        ("v1->v2", "key_version"),
    ]
    locked = next(p for v, _, p in found if v == "v1")
    assert locked.startswith("type changed from int to long in a published version")


def test_a_published_version_may_not_disappear(schema_dir: Path) -> None:
    """Deleting v1 would leave its events with a fingerprint no one knows."""
    (schema_dir / "MemoryWritten.v1.avsc").unlink()
    found = _findings(schema_dir)
    assert len(found) == 1
    assert found[0][0] == "v1"
    assert "published version is missing (MemoryWritten.v1.avsc)" in found[0][2]


def test_lock_adds_only_new_versions(schema_dir: Path) -> None:
    """An unlocked but valid version is reported, then locked; old entries stay."""
    lock = schema_dir / "lock.json"
    before = load_lock(lock)
    doc = json.loads(lock.read_text())
    del doc["published"]["MemoryWritten.v2"]
    lock.write_text(json.dumps(doc))
    assert check_schemas(schema_dir, lock).unlocked == ["MemoryWritten.v2"]
    assert lock_new_versions(schema_dir, lock) == ["MemoryWritten.v2"]
    assert load_lock(lock) == before


def test_resolution_follows_avro_promotions_and_unions() -> None:
    """int reads as long but not back; a union must cover every writer branch."""

    def record(kind: Any, **extra: Any) -> dict[str, Any]:
        return {
            "type": "record",
            "name": "R",
            "fields": [{"name": "x", "type": kind, **extra}],
        }

    assert resolution_problems(record("int"), record("long")) == []
    assert resolution_problems(record("long"), record("int")) == [
        ("x", "type changed from long to int")
    ]
    assert (
        resolution_problems(record(["null", "long"]), record(["null", "double"])) == []
    )
    assert resolution_problems(record(["null", "string"]), record("string")) == [
        ("x", "type changed from null to string")
    ]
    nested = {"type": "array", "items": record("int")}
    assert resolution_problems(
        record(nested), record({"type": "array", "items": record("boolean")})
    ) == [("x[].x", "type changed from int to boolean")]


def test_command_exits_1_and_names_the_field(schema_dir: Path) -> None:
    """The command line prints one JSON object and exits 1 on an incompatible edit."""
    _next_version(
        schema_dir,
        lambda fs: [
            {**f, "type": "int"} if f["name"] == "key_version" else f
            for f in fs
            if f["name"] != "content_hash"
        ],
    )
    env = {**os.environ, "STRATA_DATA_DIR": str(schema_dir.parent / "data")}
    done = subprocess.run(
        [STRATA, "schemas", "check", "--dir", str(schema_dir), "--json"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    obj = json.loads(done.stdout)
    assert obj["ok"] is False
    assert {f["field"] for f in obj["findings"]} == {"content_hash"}
    assert all("content_hash" in f["message"] for f in obj["findings"])

    ok = subprocess.run(
        [STRATA, "schemas", "check", "--json"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["ok"] is True


def test_command_exits_2_on_a_missing_folder(tmp_path: Path) -> None:
    """A folder that is not there is bad input, named on one stderr line."""
    done = subprocess.run(
        [STRATA, "schemas", "check", "--dir", str(tmp_path / "nowhere")],
        capture_output=True,
        env={**os.environ, "STRATA_DATA_DIR": str(tmp_path / "data")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines() == [
        f"strata: --dir {tmp_path / 'nowhere'}: not a folder of .avsc files"
    ]
