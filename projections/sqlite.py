"""Opening the SQLite databases the projections keep (L2, the L3 index)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from strata.errors import StoreError

#: Seconds a connection waits for another writer (another worker of the data dir).
_BUSY_TIMEOUT_S = 30


def open_database(
    path: Path,
    schema: str,
    *,
    what: str,
    synchronous: str = "FULL",
    readonly: bool = False,
) -> sqlite3.Connection:
    """Open a projection's database in autocommit mode, WAL and a busy timeout.

    A writer creates the folder and the schema; a reader opens the file
    read-only, so it can never create an empty database by looking.

    Args:
        schema: the ``CREATE ... IF NOT EXISTS`` script a writer runs.
        what: how errors name the store, e.g. ``"L2 database"``.

    Raises:
        StoreError: the database cannot be opened or created.
    """
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=_BUSY_TIMEOUT_S,
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            # One transaction, so a reader never sees half of the tables.
            conn.executescript(f"BEGIN;\n{schema}\nCOMMIT;")
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"{what} {path}: {exc}") from exc
    return conn
