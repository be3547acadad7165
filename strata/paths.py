"""Where each store lives inside the data dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StorePaths:
    """The layout of a Strata data dir."""

    root: Path

    @property
    def l2_db(self) -> Path:
        """The SQLite file of L2."""
        return self.root / "l2" / "strata.db"

    @property
    def ledger(self) -> Path:
        """The ledger folder."""
        return self.root / "ledger"

    @property
    def l3(self) -> Path:
        """The L3 archive folder."""
        return self.root / "l3"

    @property
    def keys(self) -> Path:
        """The local keystore folder."""
        return self.root / "keys"

    @property
    def workers(self) -> Path:
        """State files of running workers, read by `strata status`."""
        return self.root / "workers"
