"""Write the golden event of every schema version that has none yet.

Run from the repository root after adding a schema version::

    .venv/bin/python tests/golden/make_golden.py

Each golden file is the raw message value (single-object encoding: marker,
writer fingerprint, Avro body) of one event with the fixed values below,
written with that version's own schema. A file is written once and checked
in; this script never rewrites one, and records each file's SHA-256 and the
values it holds in MANIFEST.json. Every build decodes every golden file
(tests/test_codec_golden.py), so no published version can become unreadable
unnoticed.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import fastavro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from schemas.check import golden_name  # noqa: E402
from schemas.codec import MARKER, SchemaRegistry, SchemaVersion  # noqa: E402

#: The fixed input of every golden event, by field name. Byte strings stand
#: in for ciphertext, nonce and hash: the codec does not care what they hold.
FIXED: dict[str, Any] = {
    "event_id": "golden-event-0001",
    "tenant": "acme",
    "key": "agent-7/profile/likes",
    "cls": "chat",
    "agent": "golden",
    "time_ms": 1_700_000_000_123,
    "expected_version": 3,
    "key_id": "tk_0123456789abcdef0123",
    "key_version": 2,
    "nonce": bytes(range(12)),
    "ciphertext": bytes(range(64, 112)),
    "content_hash": bytes(range(160, 192)),
    "metadata": {"emotion": "calm", "source": "golden"},
    "tags": ["golden", "imported"],
    "source_ref": "golden:records/likes__chat.json",
    "version": 4,
    "source_event_id": "golden-event-0000",
    "job_id": "job-golden",
    "from_tier": "l2",
    "to_tier": "l3",
    "reason": "aged",
    "key_versions": [1, 2],
}


def sample(schema: Any, name: str) -> Any:
    """A fixed value for a field this script has no entry for (a newer field)."""
    kind = schema
    if isinstance(kind, list):
        branches = [b for b in kind if b != "null"]
        return sample(branches[0], name) if branches else None
    if isinstance(kind, dict):
        inner = kind.get("type")
        if inner == "array":
            return [sample(kind["items"], name)]
        if inner == "map":
            return {"golden": sample(kind["values"], name)}
        return sample(inner, name)
    return {
        "string": f"golden-{name}",
        "bytes": f"golden-{name}".encode(),
        "int": 7,
        "long": 7,
        "float": 0.5,
        "double": 0.5,
        "boolean": True,
        "null": None,
    }[kind]


def record_for(version: SchemaVersion) -> dict[str, Any]:
    """The golden record of one version: its own fields, fixed values."""
    raw = json.loads(version.path.read_text(encoding="utf-8"))
    return {
        f["name"]: FIXED[f["name"]]
        if f["name"] in FIXED
        else sample(f["type"], f["name"])
        for f in raw["fields"]
    }


def encode(version: SchemaVersion, record: dict[str, Any]) -> bytes:
    """Single-object encoding of a record with this version as the writer."""
    out = io.BytesIO()
    out.write(MARKER)
    out.write(version.fingerprint)
    fastavro.schemaless_writer(out, version.parsed, record)
    return out.getvalue()


def to_json(value: Any) -> Any:
    """JSON form of a record: bytes as {"hex": ...}."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def main() -> int:
    manifest_path = HERE / "MANIFEST.json"
    manifest: dict[str, Any] = (
        json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest_path.exists()
        else {"files": {}}
    )
    written = []
    for version in SchemaRegistry().versions():
        name = golden_name(version)
        path = HERE / name
        if path.exists() or name in manifest["files"]:
            continue
        record = record_for(version)
        data = encode(version, record)
        path.write_bytes(data)
        manifest["files"][name] = {
            "schema": version.name,
            "version": version.version,
            "fingerprint": version.fingerprint_hex,
            "sha256": hashlib.sha256(data).hexdigest(),
            "record": to_json(record),
        }
        written.append(name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(
        "\n".join(f"wrote {n}" for n in written) or "every version has its golden file"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
