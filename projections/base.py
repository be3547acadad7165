"""What every projection shares: the decoded message it applies and the outcome."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from schemas.events import Event

#: Tier names, hottest first.
TIERS = ("l1", "l2", "l3")


@dataclass(slots=True)
class Envelope:
    """One decoded event with its position in the memory topic.

    ``event_hash`` is the SHA-256 of the raw message value: it covers the
    ciphertext and metadata, never plaintext.
    """

    partition: int
    offset: int
    event: Event
    event_hash: bytes
    size: int


class Outcome(NamedTuple):
    """How a projection decided one event.

    ``action`` is one of ``written``, ``deleted``, ``rejected``,
    ``reencrypted``, ``tiered`` and ``erased``; ``version`` is the key's
    version after the event (for a rejection, the version it stayed at).
    A named tuple: L2 makes one per event, and a frozen dataclass cost
    several times as much to construct.
    """

    action: str
    version: int
    reason: str = ""


class FollowerProjection(Protocol):
    """A durable projection applied after L2, following L2's decisions.

    It keeps its own checkpoint per partition, moved atomically with its own
    writes; offsets below it are skipped, so a batch may be offered again.
    """

    name: str

    def checkpoint(self, partition: int) -> int:
        """The next offset of ``partition`` not yet applied."""
        ...

    async def apply(
        self,
        partition: int,
        envelopes: Sequence[Envelope],
        outcomes: Sequence[Outcome | None],
        next_offset: int,
    ) -> int:
        """Apply a batch and move the checkpoint; return how many events it used.

        Raises:
            StoreError: the store cannot be written; nothing was applied.
        """
        ...

    def digest(self) -> str:
        """An order-independent digest of the projection's state."""
        ...
