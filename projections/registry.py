"""Which durable projections a data dir has, for workers and digests."""

from __future__ import annotations

from projections.base import FollowerProjection
from projections.l2 import L2Reader
from projections.ledger import LedgerProjection, ledger_digest
from strata.paths import StorePaths


def build_followers(paths: StorePaths) -> list[FollowerProjection]:
    """The projections a worker applies after L2, in order."""
    return [LedgerProjection(paths.ledger)]


def digests(paths: StorePaths) -> dict[str, str]:
    """The digest of every durable projection of a data dir."""
    l2 = L2Reader(paths.l2_db)
    try:
        return {"l2": l2.digest(), "ledger": ledger_digest(paths.ledger)}
    finally:
        l2.close()
