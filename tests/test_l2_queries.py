"""L2's per-batch queries stay index lookups however large the store grows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from projections.base import Envelope
from projections.l2 import L2Projection, L2Reader, key_states_sql
from schemas.events import MemoryWritten, TenantErased


def test_reading_a_batch_of_keys_searches_the_primary_key(tmp_path: Path) -> None:
    """A batch costs lookups for its own keys, never a scan of every record."""
    l2 = L2Projection(tmp_path / "l2.db")
    try:
        plan = l2._conn.execute(
            "EXPLAIN QUERY PLAN " + key_states_sql(3), ["t", "k"] * 3
        ).fetchall()
    finally:
        l2.close()
    steps = [row[3] for row in plan]
    assert any("SEARCH r USING PRIMARY KEY" in step for step in steps), steps
    assert not any(
        step.startswith("SCAN records") or step == "SCAN r" for step in steps
    )


def test_a_reader_of_a_database_without_tables_sees_nothing_yet(tmp_path: Path) -> None:
    """Opened between a worker creating the file and committing its tables, a
    reader answers 'nothing projected', not 'no such table'."""
    path = tmp_path / "l2.db"
    sqlite3.connect(path).close()  # the file exists, empty
    reader = L2Reader(path)
    try:
        assert reader.checkpoints() == {}
        assert reader.checkpoint(0) == 0
        L2Projection(path).close()  # the worker commits its tables
        assert reader.checkpoints() == {}
        assert reader.checkpoint(3) == 0
    finally:
        reader.close()


def test_events_of_an_erased_tenant_offered_again_keep_their_outcomes(
    tmp_path: Path,
) -> None:
    """An erasure purges the tenant's history, but a batch offered again (a
    ledger rebuilt beside a live L2) still gets the outcome each event had,
    so it records what the live ledger did."""
    l2 = L2Projection(tmp_path / "l2.db")
    try:
        writes = [
            Envelope(0, n, _written(f"e{n}", "gone", f"k{n % 2}"), bytes(32), 10)
            for n in range(3)
        ]
        kept = Envelope(0, 3, _written("e3", "stays", "k"), bytes(32), 10)
        erased = Envelope(0, 4, TenantErased("x", "gone", 5), bytes(32), 10)
        batch = [*writes, kept, erased]
        first = l2.apply(0, batch, 5)
        assert [o.action if o else None for o in first] == [
            "written",
            "written",
            "written",
            "written",
            "erased",
        ]
        assert l2.apply(0, batch, 5) == first
    finally:
        l2.close()


def _written(event_id: str, tenant: str, key: str) -> MemoryWritten:
    return MemoryWritten(
        event_id=event_id,
        tenant=tenant,
        key=key,
        cls="chat",
        agent="a",
        time_ms=1,
        key_id="tk",
        key_version=1,
        nonce=bytes(12),
        ciphertext=b"c",
        content_hash=bytes(32),
    )
