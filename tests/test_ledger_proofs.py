"""Inclusion and consistency proofs, checked with nothing but the public key."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from projections.base import Outcome
from projections.ledger import LedgerProjection, iter_entries
from projections.ledger_files import read_tree_heads
from projections.ledger_proofs import (
    check_proof,
    consistency_proof_doc,
    inclusion_proof_doc,
    prove_event,
)
from strata.errors import CheckFailedError, NotFoundError, UsageError
from strata.signing import LedgerPublicKey, LedgerSigner
from tests.test_ledger_writer import build_ledger, event_at, ledger_settings

PARTITIONS = 2
COUNT = 45


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LedgerPublicKey]:
    """A data dir with two partitions of 45 entries, every one signed."""
    root = tmp_path_factory.mktemp("proofs")

    async def build() -> LedgerProjection:
        ledger, _ = await build_ledger(
            root, COUNT, partitions=PARTITIONS, batch=8, every=10
        )
        return ledger

    ledger = asyncio.run(build())
    for partition in range(PARTITIONS):
        ledger.sign_now(partition)
    return root, ledger.signer().public_key


def offline(doc: dict[str, Any]) -> Any:
    """The proof as an outsider receives it: bytes of JSON, nothing else."""
    return json.loads(json.dumps(doc))


def test_every_entry_proves_offline(
    store: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """Each entry's inclusion proof checks with the public key alone, after
    the ledger itself is gone."""
    root, key = store
    copy = tmp_path / "ledger"
    shutil.copytree(root / "ledger", copy)
    proofs = [
        offline(inclusion_proof_doc(copy, partition, entry))
        for partition in range(PARTITIONS)
        for entry in range(COUNT)
    ]
    shutil.rmtree(copy)
    for doc in proofs:
        result = check_proof(doc, key)
        assert result.ok, result.problems
        assert result.details["size"] == COUNT


def test_a_proof_for_a_changed_entry_fails(store: tuple[Path, LedgerPublicKey]) -> None:
    """Altering the entry a proof carries, or pointing it at another index,
    makes the check fail."""
    root, key = store
    doc = offline(inclusion_proof_doc(root / "ledger", 1, 17))
    changed = dict(
        doc, line=doc["line"].replace('"tenant":"tenant-', '"tenant":"tenanT-')
    )
    result = check_proof(changed, key)
    assert not result.ok
    assert any("not at 17" in p for p in result.problems)
    moved = dict(doc, entry=18)
    assert not check_proof(moved, key).ok


def test_the_prover_refuses_a_ledger_changed_under_its_checkpoint(
    store: tuple[Path, LedgerPublicKey], tmp_path: Path
) -> None:
    """No proof is issued from entries that no longer give the signed root."""
    root, _ = store
    copy = tmp_path / "ledger"
    shutil.copytree(root / "ledger", copy)
    log = copy / "p00000.log"
    log.write_bytes(log.read_bytes().replace(b'"version":1,', b'"version":9,', 1))
    with pytest.raises(CheckFailedError, match="no longer matches"):
        inclusion_proof_doc(copy, 0, 30)


def test_a_proof_against_a_wrong_key_fails(store: tuple[Path, LedgerPublicKey]) -> None:
    """Another key, or a checkpoint re-signed by it, does not pass."""
    root, key = store
    doc = offline(inclusion_proof_doc(root / "ledger", 0, 3))
    stranger = LedgerSigner(Ed25519PrivateKey.generate())
    result = check_proof(doc, stranger.public_key)
    assert not result.ok
    assert "not the given key" in result.problems[0]

    forged = dict(doc)
    forged["checkpoint"] = dict(doc["checkpoint"], key_id=key.key_id)
    forged["checkpoint"]["root"] = "ab" * 32
    result = check_proof(forged, key)
    assert not result.ok
    assert any("signature does not verify" in p for p in result.problems)


def test_consistency_between_every_pair_of_checkpoints(
    store: tuple[Path, LedgerPublicKey],
) -> None:
    """Every later signed checkpoint provably extends every earlier one, and a
    proof with the checkpoints exchanged does not."""
    root, key = store
    sizes = [h.size for h in read_tree_heads(root / "ledger", 0)]
    assert sizes == [10, 20, 30, 40, 45]
    for i, first in enumerate(sizes):
        for second in sizes[i:]:
            doc = offline(consistency_proof_doc(root / "ledger", 0, first, second))
            result = check_proof(doc, key)
            assert result.ok, (first, second, result.problems)
            if first < second:
                swapped = dict(doc, first=doc["second"], second=doc["first"])
                assert not check_proof(swapped, key).ok
    other = offline(consistency_proof_doc(root / "ledger", 1, 20, 45))
    mixed = dict(
        other, first=consistency_proof_doc(root / "ledger", 0, 20, 45)["first"]
    )
    assert not check_proof(mixed, key).ok


def test_lookup_errors_say_what_is_missing(store: tuple[Path, LedgerPublicKey]) -> None:
    """Unknown events, unsigned sizes and non-proofs are clear errors."""
    root, key = store
    with pytest.raises(NotFoundError, match="no ledger entry"):
        prove_event(root / "ledger", "no-such-event")
    with pytest.raises(NotFoundError, match="no signed checkpoint of size 33"):
        consistency_proof_doc(root / "ledger", 0, 33, 45)
    with pytest.raises(UsageError, match="not a ledger proof"):
        check_proof({"hello": "world"}, key)
    first = next(iter_entries(root / "ledger" / "p00001.log"))[1]
    event_id = json.loads(first)["event_id"]
    assert prove_event(root / "ledger", event_id)["partition"] == 1


def _strata(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_proves_and_checks_with_an_exported_public_key(tmp_path: Path) -> None:
    """`ledger public-key`, `ledger prove` and `ledger check-proof` work from
    the command line; check-proof exits 1 on a bad proof, 2 on a non-proof."""
    root = tmp_path / "data"
    env = dict(
        os.environ, STRATA_DATA_DIR=str(root), STRATA_LEDGER_CHECKPOINT_ENTRIES="5"
    )
    exported = _strata(
        env, "ledger", "public-key", "--json", "--out", str(tmp_path / "k.pem")
    )
    assert exported.returncode == 0, exported.stderr
    key = json.loads(exported.stdout)
    assert key["algorithm"] == "Ed25519"
    assert "BEGIN PUBLIC KEY" in key["pem"]
    assert (tmp_path / "k.pem").read_text() == key["pem"]
    again = _strata(env, "ledger", "public-key", "--out", str(tmp_path / "k2.pem"))
    assert (
        again.stdout
        == f"ledger public key {key['key_id']} written to {tmp_path / 'k2.pem'}\n"
    )
    assert (tmp_path / "k2.pem").read_text() == key["pem"]

    # The data dir's own signing key, the one `public-key` exported.
    ledger = LedgerProjection(root / "ledger", settings=ledger_settings(root, every=5))
    asyncio.run(_fill(ledger))
    event_id = json.loads(next(iter_entries(root / "ledger" / "p00000.log"))[1])[
        "event_id"
    ]
    proved = _strata(
        env, "ledger", "prove", event_id, "--out", str(tmp_path / "p.json")
    )
    assert proved.returncode == 0, proved.stderr

    elsewhere = dict(os.environ, STRATA_DATA_DIR=str(tmp_path / "empty"))
    args = ["ledger", "check-proof", str(tmp_path / "p.json"), "--public-key"]
    checked = _strata(elsewhere, *args, str(tmp_path / "k.pem"), "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

    doc = json.loads((tmp_path / "p.json").read_text())
    doc["line"] = doc["line"].replace('"version":', '"version":1')
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    bad = _strata(
        elsewhere,
        "ledger",
        "check-proof",
        str(tmp_path / "bad.json"),
        "--public-key",
        str(tmp_path / "k.pem"),
        "--json",
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["ok"] is False

    (tmp_path / "junk.json").write_text("not json")
    junk = _strata(
        elsewhere,
        "ledger",
        "check-proof",
        str(tmp_path / "junk.json"),
        "--public-key",
        str(tmp_path / "k.pem"),
    )
    assert junk.returncode == 2
    assert "not JSON" in junk.stderr

    (tmp_path / "not-a-key.pem").write_text("root:x:0:0:root:/root:/bin/bash\n")
    args = ["ledger", "check-proof", str(tmp_path / "p.json"), "--public-key"]
    not_a_key = _strata(elsewhere, *args, str(tmp_path / "not-a-key.pem"))
    assert not_a_key.returncode == 2
    assert not_a_key.stderr == (
        f"strata: --public-key {tmp_path / 'not-a-key.pem'}: not a PEM Ed25519 "
        "public key (export one with `strata ledger public-key --out FILE`)\n"
    )

    # A key file lost after it signed heads is refused, never replaced.
    signing = root / "keys" / "ledger-signing.json"
    signing.unlink()
    lost = _strata(env, "ledger", "public-key")
    assert lost.returncode != 0
    assert "is missing, but the ledger" in lost.stderr, lost.stderr
    assert "restore the file" in lost.stderr
    assert lost.stdout == ""
    assert not signing.exists()


async def _fill(ledger: LedgerProjection) -> None:
    pairs = [event_at(0, i) for i in range(12)]
    await ledger.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 12)


async def test_an_event_published_twice_proves_its_first_entry(tmp_path: Path) -> None:
    """The entry that took effect is proven; the duplicate's place is listed."""
    ledger = LedgerProjection(
        tmp_path / "ledger",
        settings=ledger_settings(tmp_path, every=4),
        signer=LedgerSigner(Ed25519PrivateKey.generate()),
    )
    pairs = [event_at(0, i) for i in range(4)]
    again, _ = event_at(0, 1)
    again.offset = 4
    envelopes = [*(e for e, _ in pairs), again]
    outcomes = [*(o for _, o in pairs), Outcome("rejected", 1, "duplicate event id")]
    await ledger.apply(0, envelopes, outcomes, 5)
    ledger.sign_now(0)
    doc = prove_event(ledger.directory, "ev-0-1")
    assert (doc["entry"], doc["also_at"]) == (1, ["0:4"])
    assert prove_event(ledger.directory, "ev-0-1", at=(0, 4))["entry"] == 4
    with pytest.raises(UsageError, match="no entry at"):
        prove_event(ledger.directory, "ev-0-1", at=(0, 2))
