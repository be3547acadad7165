"""Malformed proof files: refused as bad input, naming the field, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from projections.ledger_proofs import (
    check_proof,
    consistency_proof_doc,
    inclusion_proof_doc,
)
from strata.errors import UsageError
from strata.signing import LedgerPublicKey
from tests.test_ledger_writer import build_ledger

MISSING = object()
BIG = 10**30


@pytest.fixture(scope="module")
def proofs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], dict[str, Any], LedgerPublicKey]:
    """An inclusion proof (entry 5 of 20) and a consistency proof (6 -> 20)
    of partition 0, as an outsider receives them, and the public key."""
    root = tmp_path_factory.mktemp("proof-input")
    ledger, signer = asyncio.run(build_ledger(root, 20, every=6))
    ledger.sign_now(0)
    inclusion = json.loads(json.dumps(inclusion_proof_doc(root / "ledger", 0, 5)))
    consistency = json.loads(
        json.dumps(consistency_proof_doc(root / "ledger", 0, 6, 20))
    )
    return inclusion, consistency, signer.public_key


def corrupted(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> Any:
    """A copy of ``doc`` with the field at ``path`` set to ``value``, or
    removed if ``value`` is :data:`MISSING`."""
    copy = json.loads(json.dumps(doc))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if value is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


def case_id(path: tuple[str | int, ...], value: Any) -> str:
    """A short test id: the field and the value put there."""
    shown = "missing" if value is MISSING else repr(value)
    return f"{'.'.join(map(str, path))}={shown[:16]}"


def test_untouched_proofs_hold(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
) -> None:
    """The proofs the cases below corrupt hold as they are."""
    inclusion, consistency, key = proofs
    for doc in (inclusion, consistency):
        result = check_proof(doc, key)
        assert (result.ok, result.problems) == (True, [])


INCLUSION_CASES: list[tuple[tuple[str | int, ...], Any, str]] = [
    (("entry",), float("inf"), "entry: expected a non-negative integer, got Infinity"),
    (("entry",), float("nan"), "entry: expected a non-negative integer, got NaN"),
    (("entry",), "0", 'entry: expected a non-negative integer, got "0"'),
    (("entry",), "5", 'entry: expected a non-negative integer, got "5"'),
    (("entry",), 1.5, "entry: expected a non-negative integer, got 1.5"),
    (("entry",), 5.0, "entry: expected a non-negative integer, got 5.0"),
    (("entry",), True, "entry: expected a non-negative integer, got true"),
    (("entry",), -1, "entry: expected a non-negative integer, got -1"),
    (("entry",), None, "entry: expected a non-negative integer, got null"),
    (("entry",), MISSING, "entry: missing"),
    (("entry",), BIG, f"entry: expected an integer below 2**64, got {BIG}"),
    (
        ("entry",),
        10**4000,
        "entry: expected an integer below 2**64, got an integer of 13288 bits",
    ),
    (("partition",), "0", 'partition: expected a non-negative integer, got "0"'),
    (
        ("partition",),
        float("inf"),
        "partition: expected a non-negative integer, got Infinity",
    ),
    (("partition",), 2**32, f"partition: expected an integer below 2**32, got {2**32}"),
    (("partition",), MISSING, "partition: missing"),
    (
        ("checkpoint", "size"),
        BIG,
        f"checkpoint.size: expected an integer below 2**64, got {BIG}",
    ),
    (
        ("checkpoint", "size"),
        2**64,
        f"checkpoint.size: expected an integer below 2**64, got {2**64}",
    ),
    (
        ("checkpoint", "size"),
        "20",
        'checkpoint.size: expected a non-negative integer, got "20"',
    ),
    (
        ("checkpoint", "time_ms"),
        BIG,
        f"checkpoint.time_ms: expected an integer below 2**64, got {BIG}",
    ),
    (
        ("checkpoint", "partition"),
        2**32,
        f"checkpoint.partition: expected an integer below 2**32, got {2**32}",
    ),
    (
        ("checkpoint", "root"),
        None,
        "checkpoint.root: expected 64 hex digits (a SHA-256 hash), got null",
    ),
    (
        ("checkpoint", "root"),
        " " + "ab" * 32,
        f'checkpoint.root: expected 64 hex digits (a SHA-256 hash), got " {"ab" * 19}...',
    ),
    (("checkpoint", "key_id"), 7, "checkpoint.key_id: expected a string, got 7"),
    (
        ("checkpoint", "signature"),
        "AAAA",
        'checkpoint.signature: expected base64 of 64 bytes, got "AAAA"',
    ),
    (("checkpoint", "prev"), MISSING, "checkpoint.prev: missing"),
    (("checkpoint",), None, "checkpoint: expected an object, got null"),
    (("checkpoint",), [1, 2], "checkpoint: expected an object, got an array"),
    (("checkpoint",), MISSING, "checkpoint: missing"),
    (("audit_path",), "abc", 'audit_path: expected an array of hashes, got "abc"'),
    (("audit_path",), None, "audit_path: expected an array of hashes, got null"),
    (
        ("audit_path", 0),
        5,
        "audit_path[0]: expected 64 hex digits (a SHA-256 hash), got 5",
    ),
    (("line",), 5, "line: expected a string, got 5"),
    (("line",), None, "line: expected a string, got null"),
    (("line",), "[1]", 'line: expected the entry\'s line, a JSON object, got "[1]"'),
    (("line",), "{", 'line: expected the entry\'s line, a JSON object, got "{"'),
    (
        ("line",),
        "[" * 100_000,
        f"line: expected the entry's line, a JSON object, got \"{'[' * 39}...",
    ),
    (("event_id",), 5, "event_id: expected a string, got 5"),
    (("event_id",), None, "event_id: expected a string, got null"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    INCLUSION_CASES,
    ids=[case_id(p, v) for p, v, _ in INCLUSION_CASES],
)
def test_a_malformed_inclusion_proof_names_its_field(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
    path: tuple[str | int, ...],
    value: Any,
    message: str,
) -> None:
    """Each wrong field is a UsageError naming it, not a traceback and not a verdict."""
    inclusion, _, key = proofs
    with pytest.raises(UsageError) as info:
        check_proof(corrupted(inclusion, path, value), key)
    assert str(info.value) == f"malformed ledger proof: field {message}"


CONSISTENCY_CASES: list[tuple[tuple[str | int, ...], Any, str]] = [
    (
        ("second", "size"),
        BIG,
        f"second.size: expected an integer below 2**64, got {BIG}",
    ),
    (
        ("first", "size"),
        BIG,
        f"first.size: expected an integer below 2**64, got {BIG}",
    ),
    (
        ("first", "size"),
        float("inf"),
        "first.size: expected a non-negative integer, got Infinity",
    ),
    (("first", "size"), "6", 'first.size: expected a non-negative integer, got "6"'),
    (
        ("second", "size"),
        True,
        "second.size: expected a non-negative integer, got true",
    ),
    (("second",), None, "second: expected an object, got null"),
    (("first",), MISSING, "first: missing"),
    (("partition",), "0", 'partition: expected a non-negative integer, got "0"'),
    (("partition",), None, "partition: expected a non-negative integer, got null"),
    (("partition",), MISSING, "partition: missing"),
    (("proof",), None, "proof: expected an array of hashes, got null"),
    (("proof",), {"a": 1}, "proof: expected an array of hashes, got an object"),
    (
        ("proof", 0),
        "ab" * 16,
        f'proof[0]: expected 64 hex digits (a SHA-256 hash), got "{"ab" * 16}"',
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    CONSISTENCY_CASES,
    ids=[case_id(p, v) for p, v, _ in CONSISTENCY_CASES],
)
def test_a_malformed_consistency_proof_names_its_field(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
    path: tuple[str | int, ...],
    value: Any,
    message: str,
) -> None:
    """Each wrong field is a UsageError naming it, not a traceback and not a verdict."""
    _, consistency, key = proofs
    with pytest.raises(UsageError) as info:
        check_proof(corrupted(consistency, path, value), key)
    assert str(info.value) == f"malformed ledger proof: field {message}"


def test_a_format_of_the_wrong_type_is_not_a_proof(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
) -> None:
    """A format that is an array or object is refused like an unknown one."""
    inclusion, _, key = proofs
    for value in ([], {}, None):
        with pytest.raises(UsageError, match="not a ledger proof"):
            check_proof(corrupted(inclusion, ("format",), value), key)


def test_another_partition_fails_either_proof(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
) -> None:
    """A top-level partition that is not its checkpoints' makes either kind of
    proof fail, with the same problem."""
    inclusion, consistency, key = proofs
    result = check_proof(corrupted(inclusion, ("partition",), 1), key)
    assert (result.ok, result.problems) == (
        False,
        ["the proof names another partition than its checkpoint"],
    )
    result = check_proof(corrupted(consistency, ("partition",), 1), key)
    assert (result.ok, result.problems) == (
        False,
        ["the proof names another partition than its checkpoints"],
    )


def test_another_event_id_fails_naming_both(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
) -> None:
    inclusion, _, key = proofs
    result = check_proof(corrupted(inclusion, ("event_id",), "ffff"), key)
    entry = json.loads(inclusion["line"])["event_id"]
    assert (result.ok, result.problems) == (
        False,
        [f'the entry is event "{entry}", not the "ffff" the proof names'],
    )


def _check_cli(
    tmp_path: Path, doc: Any, key: LedgerPublicKey
) -> subprocess.CompletedProcess[str]:
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps(doc))
    pem = tmp_path / "key.pem"
    pem.write_text(key.pem())
    env = dict(os.environ, STRATA_DATA_DIR=str(tmp_path / "empty"))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "strata",
            "ledger",
            "check-proof",
            str(proof),
            "--public-key",
            str(pem),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"),
    [
        (
            "inclusion",
            ("entry",),
            float("inf"),
            "field entry: expected a non-negative integer, got Infinity",
        ),
        (
            "inclusion",
            ("checkpoint", "size"),
            BIG,
            "field checkpoint.size: expected an integer below 2**64",
        ),
        (
            "consistency",
            ("second", "size"),
            BIG,
            "field second.size: expected an integer below 2**64",
        ),
        (
            "inclusion",
            ("entry",),
            "0",
            'field entry: expected a non-negative integer, got "0"',
        ),
    ],
    ids=["entry-infinity", "checkpoint-size-huge", "second-size-huge", "entry-string"],
)
def test_check_proof_cli_exits_2_with_one_line(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey],
    tmp_path: Path,
    kind: str,
    path: tuple[str | int, ...],
    value: Any,
    message: str,
) -> None:
    """`strata ledger check-proof` on a malformed file: exit 2, one line on
    stderr naming the field, nothing on stdout."""
    inclusion, consistency, key = proofs
    doc = inclusion if kind == "inclusion" else consistency
    done = _check_cli(tmp_path, corrupted(doc, path, value), key)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"strata: malformed ledger proof: {message}")


def test_check_proof_cli_exits_1_for_another_partition(
    proofs: tuple[dict[str, Any], dict[str, Any], LedgerPublicKey], tmp_path: Path
) -> None:
    """A well-formed consistency proof naming another partition fails: exit 1."""
    _, consistency, key = proofs
    done = _check_cli(tmp_path, corrupted(consistency, ("partition",), 1), key)
    assert done.returncode == 1, done.stderr
    assert "another partition" in done.stdout
