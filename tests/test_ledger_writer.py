"""The ledger writer: entries, signed checkpoints, exactly-once, without a broker.

``build_ledger`` here is also what the tamper and proof tests build on.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from projections.base import Envelope, Outcome
from projections.ledger import (
    LedgerProjection,
    iter_entries,
    ledger_digest,
    read_state,
    verify_ledger,
)
from projections.ledger_files import read_tree_heads
from projections.merkle import leaf_hash, root_of
from schemas.events import (
    Event,
    MemoryDeleted,
    MemoryTiered,
    MemoryWritten,
    TenantErased,
)
from strata.config import Settings, load_settings
from strata.errors import StoreError
from strata.signing import LedgerSigner, load_or_create_signer, load_public_key

_ACTIONS = ("written", "deleted", "rejected", "tiered", "written", "erased")


def event_at(partition: int, offset: int) -> tuple[Envelope, Outcome]:
    """A synthetic applied event; kinds, tenants and keys vary with the offset."""
    i = offset
    tenant = f"tenant-{i % 3}"
    key = f"agent-{i % 7}/notes/{i % 11}" if i % 13 else 'odd "key" ünïcødé'
    kind = _ACTIONS[i % len(_ACTIONS)]
    event: Event
    if kind == "deleted":
        event = MemoryDeleted(
            f"ev-{partition}-{i}", tenant, key, "agent", 1_700_000 + i
        )
    elif kind == "tiered":
        event = MemoryTiered(
            f"ev-{partition}-{i}", tenant, key, 2, "l2", "l3", "aged", 1_700_000 + i
        )
    elif kind == "erased":
        event = TenantErased(f"ev-{partition}-{i}", "tenant-gone", 1_700_000 + i)
    else:
        event = MemoryWritten(
            event_id=f"ev-{partition}-{i}",
            tenant=tenant,
            key=key,
            cls="chat",
            agent="agent",
            time_ms=1_700_000 + i,
            key_id="tk_test",
            key_version=1,
            nonce=b"n" * 12,
            ciphertext=b"ciphertext %d" % i,
            content_hash=b"h" * 32,
        )
    raw = f"message {partition}/{offset}".encode()
    envelope = Envelope(
        partition, offset, event, hashlib.sha256(raw).digest(), len(raw)
    )
    return envelope, Outcome(kind, i % 5)


def ledger_settings(root: Path, every: int, interval_ms: int = 3_600_000) -> Settings:
    """Settings of a data dir at ``root`` signing every ``every`` entries."""
    return load_settings(
        data_dir=root,
        ledger_checkpoint_entries=every,
        ledger_checkpoint_interval_ms=interval_ms,
    )


async def build_ledger(
    root: Path,
    count: int,
    *,
    partitions: int = 1,
    batch: int = 100,
    every: int = 100,
    signer: LedgerSigner | None = None,
) -> tuple[LedgerProjection, LedgerSigner]:
    """A ledger of ``count`` entries per partition in ``root/ledger``, applied
    in batches as a worker would, offsets spaced so gaps stay visible."""
    signer = signer or LedgerSigner(Ed25519PrivateKey.generate())
    ledger = LedgerProjection(
        root / "ledger", settings=ledger_settings(root, every), signer=signer
    )
    for partition in range(partitions):
        for start in range(0, count, batch):
            pairs = [
                event_at(partition, 2 * i)
                for i in range(start, min(count, start + batch))
            ]
            await ledger.apply(
                partition,
                [e for e, _ in pairs],
                [o for _, o in pairs],
                pairs[-1][0].offset + 1,
            )
    return ledger, signer


async def test_entries_are_canonical_json_chained_by_leaf_hash(tmp_path: Path) -> None:
    """Each line is compact ASCII JSON with the documented keys in order, and
    its ``prev`` is the RFC 6962 leaf hash of the line before it."""
    ledger, signer = await build_ledger(tmp_path, 30, batch=7, every=10)
    prev = "0" * 64
    for number, line in iter_entries(ledger.directory / "p00000.log"):
        doc = json.loads(line)
        assert list(doc) == [
            "seq",
            "partition",
            "offset",
            "event_id",
            "tenant",
            "key",
            "action",
            "version",
            "time_ms",
            "event_hash",
            "prev",
        ]
        assert line == json.dumps(doc, separators=(",", ":")).encode()
        assert doc["seq"] == number
        assert doc["prev"] == prev
        assert b"ciphertext" not in line
        prev = leaf_hash(line).hex()
    assert read_state(ledger.directory, 0).head == prev
    assert verify_ledger(ledger.directory, signer.public_key).ok


async def test_count_trigger_signs_the_same_sizes_and_roots_however_batched(
    tmp_path: Path,
) -> None:
    """Tree heads at multiples of the interval do not depend on batch sizes,
    and neither does the digest."""
    a, _ = await build_ledger(tmp_path / "a", 95, batch=7, every=10)
    b, _ = await build_ledger(tmp_path / "b", 95, batch=40, every=10)
    heads_a = read_tree_heads(a.directory, 0)
    heads_b = read_tree_heads(b.directory, 0)
    assert [h.size for h in heads_a] == list(range(10, 91, 10))
    assert [(h.size, h.root) for h in heads_a] == [(h.size, h.root) for h in heads_b]
    assert (a.directory / "p00000.log").read_bytes() == (
        b.directory / "p00000.log"
    ).read_bytes()
    assert ledger_digest(a.directory) == ledger_digest(b.directory)
    leaves = [leaf_hash(line) for _, line in iter_entries(a.directory / "p00000.log")]
    for head in heads_a:
        assert head.root == root_of(leaves[: head.size])


async def test_interval_trigger_signs_entries_that_waited(tmp_path: Path) -> None:
    """With a short interval, entries left unsigned by the count trigger are
    signed at the next batch once the interval has passed."""
    settings = ledger_settings(tmp_path, every=1000, interval_ms=30)
    signer = LedgerSigner(Ed25519PrivateKey.generate())
    ledger = LedgerProjection(tmp_path / "ledger", settings=settings, signer=signer)
    first = [event_at(0, i) for i in range(5)]
    await ledger.apply(0, [e for e, _ in first], [o for _, o in first], 5)
    assert read_state(ledger.directory, 0).signed_entries == 0
    time.sleep(0.05)
    second = [event_at(0, i) for i in range(5, 8)]
    await ledger.apply(0, [e for e, _ in second], [o for _, o in second], 8)
    state = read_state(ledger.directory, 0)
    assert (state.signed_entries, state.unsigned_since_ms) == (8, 0)
    assert [h.size for h in read_tree_heads(ledger.directory, 0)] == [8]


async def test_a_batch_offered_again_appends_nothing(tmp_path: Path) -> None:
    """Offsets below the checkpoint, and events without an outcome, make no entry."""
    ledger, signer = await build_ledger(tmp_path, 20, batch=20, every=10)
    pairs = [event_at(0, 2 * i) for i in range(20)]
    again = await ledger.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 39)
    assert again == 0
    more = [event_at(0, 40), event_at(0, 41)]
    used = await ledger.apply(0, [e for e, _ in more], [more[0][1], None], 42)
    assert used == 1
    state = read_state(ledger.directory, 0)
    assert (state.entries, state.next_offset) == (21, 42)
    assert verify_ledger(ledger.directory, signer.public_key).ok


async def test_a_crash_before_the_checkpoint_is_cut_and_replayed_once(
    tmp_path: Path,
) -> None:
    """Entries and tree heads written past the checkpoint by a worker that died
    are cut off on the next batch and written again: the result equals a run
    that never stopped."""
    steady, signer = await build_ledger(tmp_path / "steady", 60, batch=30, every=10)
    crashed, _ = await build_ledger(
        tmp_path / "crashed", 30, batch=30, every=10, signer=signer
    )
    ckpt = crashed.directory / "p00000.ckpt"
    before = ckpt.read_bytes()
    pairs = [event_at(0, 2 * i) for i in range(30, 60)]
    await crashed.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 119)
    ckpt.write_bytes(before)  # the replace never happened
    assert verify_ledger(crashed.directory, signer.public_key).ok  # a pending tail
    log_bytes = (crashed.directory / "p00000.log").read_bytes()
    cut_at = read_state(crashed.directory, 0).size

    fresh = LedgerProjection(
        crashed.directory, settings=ledger_settings(tmp_path, 10), signer=signer
    )
    used = await fresh.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 119)
    assert used == 30
    # What was cut is kept aside, byte for byte, for whoever audits the crash.
    (kept,) = (crashed.directory / "discarded").glob("p00000.log.*")
    assert kept.read_bytes() == log_bytes[cut_at:]
    assert (crashed.directory / "p00000.log").read_bytes() == (
        steady.directory / "p00000.log"
    ).read_bytes()
    heads = read_tree_heads(crashed.directory, 0)
    assert [h.size for h in heads] == [10, 20, 30, 40, 50, 60]
    assert ledger_digest(crashed.directory) == ledger_digest(steady.directory)
    report = verify_ledger(crashed.directory, signer.public_key)
    assert report.ok
    assert report.entries == 60


async def test_a_log_without_its_checkpoint_is_not_cut(tmp_path: Path) -> None:
    """Losing the checkpoint file never makes the writer wipe the audit trail."""
    ledger, _ = await build_ledger(tmp_path, 10, every=5)
    (ledger.directory / "p00000.ckpt").unlink()
    size = (ledger.directory / "p00000.log").stat().st_size
    pairs = [event_at(0, 100)]
    with pytest.raises(StoreError, match="checkpoint file is missing"):
        await ledger.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 101)
    assert (ledger.directory / "p00000.log").stat().st_size == size


async def test_sign_now_covers_every_entry_once(tmp_path: Path) -> None:
    """`strata ledger sign` signs the unsigned tail, and is a no-op after."""
    ledger, signer = await build_ledger(tmp_path, 25, batch=25, every=10)
    head = ledger.sign_now(0)
    assert head is not None
    assert head.size == 25
    assert ledger.sign_now(0) is None
    assert [h.size for h in read_tree_heads(ledger.directory, 0)] == [10, 20, 25]
    assert verify_ledger(ledger.directory, signer.public_key).ok


async def test_sign_due_signs_an_idle_tail_only_once_it_has_waited(
    tmp_path: Path,
) -> None:
    """Entries no later append will sign are signed by `sign_due` once they
    have waited the interval, and not before."""
    settings = ledger_settings(tmp_path, every=1000, interval_ms=200)
    signer = LedgerSigner(Ed25519PrivateKey.generate())
    ledger = LedgerProjection(tmp_path / "ledger", settings=settings, signer=signer)
    pairs = [event_at(0, i) for i in range(7)]
    await ledger.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 7)
    assert ledger.sign_due(0) is None
    assert read_tree_heads(ledger.directory, 0) == []
    time.sleep(0.25)
    head = ledger.sign_due(0)
    assert head is not None
    assert head.size == 7
    assert ledger.sign_due(0) is None
    assert verify_ledger(ledger.directory, signer.public_key).ok


async def test_a_checkpoint_removed_under_a_running_writer_is_refused(
    tmp_path: Path,
) -> None:
    """The ledger's files vanishing while a writer appends must not start a
    new chain at the current offset: the entries before it would be gone
    without a finding."""
    ledger, _ = await build_ledger(tmp_path, 20, batch=10, every=5)
    for path in ledger.directory.glob("p00000.*"):
        path.unlink()
    pairs = [event_at(0, 100)]
    with pytest.raises(StoreError, match="went back from offset 39 to 0"):
        await ledger.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 101)
    assert not (ledger.directory / "p00000.log").exists()
    # A writer started afresh (a restarted worker) rebuilds from offset 0.
    fresh = LedgerProjection(ledger.directory, settings=ledger.settings)
    assert fresh.checkpoint(0) == 0


async def test_a_lost_signing_key_is_not_replaced_while_heads_exist(
    tmp_path: Path,
) -> None:
    """A new signing key would fail every earlier head: refused, naming the file."""
    settings = ledger_settings(tmp_path, every=5)
    ledger = LedgerProjection(tmp_path / "ledger", settings=settings)
    pairs = [event_at(0, i) for i in range(10)]
    await ledger.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 10)
    key_file = tmp_path / "keys" / "ledger-signing.json"
    assert key_file.exists()
    key_file.unlink()
    again = LedgerProjection(tmp_path / "ledger", settings=settings)
    with pytest.raises(StoreError, match=r"ledger-signing\.json is missing"):
        again.signer()
    assert not key_file.exists()


def test_the_signing_key_is_wrapped_and_its_public_half_readable(
    tmp_path: Path,
) -> None:
    """The private key is stored only wrapped under the master key; verifiers
    read the public key without it; the repr shows no key material."""
    keys = tmp_path / "keys"
    signer = load_or_create_signer(keys, keys / "master.key")
    again = load_or_create_signer(keys, keys / "master.key")
    assert again.key_id == signer.key_id
    stored = json.loads((keys / "ledger-signing.json").read_text())
    assert set(stored) == {
        "format",
        "key_id",
        "public_key",
        "wrapped_private_key",
        "created_ms",
    }
    assert (keys / "ledger-signing.json").stat().st_mode & 0o077 == 0
    assert load_public_key(keys) == signer.public_key
    assert "key_id=" in repr(signer)
    assert stored["wrapped_private_key"] not in repr(signer)
    message = b"a tree head"
    assert signer.public_key.verify(message, signer.sign(message))
    assert not signer.public_key.verify(message + b"!", signer.sign(message))


async def test_a_crash_in_a_partitions_first_batch_is_cut_and_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the first entries reached the log but before their
    checkpoint: the next writer finds the empty checkpoint written before
    them, keeps the tail aside and writes it again (it used to refuse the
    partition for ever, as if its checkpoint file had been lost)."""
    steady, signer = await build_ledger(tmp_path / "steady", 30, batch=30, every=10)
    directory = tmp_path / "crashed" / "ledger"
    crashed = LedgerProjection(
        directory, settings=ledger_settings(tmp_path / "crashed", 10), signer=signer
    )
    pairs = [event_at(0, 2 * i) for i in range(30)]
    writes = LedgerProjection._write_state

    def killed_at_the_second(self: LedgerProjection, *args: object) -> None:
        if (directory / "p00000.ckpt").exists():
            raise KeyboardInterrupt  # the process dies before the checkpoint
        writes(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LedgerProjection, "_write_state", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        await crashed.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 59)
    monkeypatch.undo()
    assert (directory / "p00000.log").stat().st_size > 0
    assert read_state(directory, 0).entries == 0

    fresh = LedgerProjection(
        directory, settings=ledger_settings(tmp_path / "crashed", 10), signer=signer
    )
    assert await fresh.apply(0, [e for e, _ in pairs], [o for _, o in pairs], 59) == 30
    assert (directory / "p00000.log").read_bytes() == (
        steady.directory / "p00000.log"
    ).read_bytes()
    assert verify_ledger(directory, signer.public_key).ok
