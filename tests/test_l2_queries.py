"""L2's per-batch queries stay index lookups however large the store grows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from projections.l2 import L2Projection, L2Reader, key_states_sql


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
