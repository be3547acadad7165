"""Which durable projections a data dir has, for workers and digests."""

from __future__ import annotations

from projections.base import FollowerProjection
from projections.l2 import L2Reader
from projections.l3 import L3Options, L3Projection, l3_digest
from projections.ledger import LedgerProjection, ledger_digest
from strata.config import Settings
from strata.paths import StorePaths


def build_followers(
    paths: StorePaths, settings: Settings | None = None
) -> list[FollowerProjection]:
    """The projections a worker applies after L2, in order.

    ``settings`` sets how L3 writes (segment size, compaction, compression);
    without it L3 uses its defaults.
    """
    options = L3Options.from_settings(settings) if settings else L3Options()
    return [
        LedgerProjection(paths.ledger, settings=settings),
        L3Projection(paths, options),
    ]


def digests(paths: StorePaths) -> dict[str, str]:
    """The digest of every durable projection of a data dir."""
    l2 = L2Reader(paths.l2_db)
    try:
        return {
            "l2": l2.digest(),
            "ledger": ledger_digest(paths.ledger),
            "l3": l3_digest(paths.l3),
        }
    finally:
        l2.close()
