"""What every projection shares: the decoded message it applies and the outcome."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a projection decided one event.

    ``action`` is one of ``written``, ``deleted``, ``rejected``,
    ``reencrypted``, ``tiered`` and ``erased``; ``version`` is the key's
    version after the event (for a rejection, the version it stayed at).
    """

    action: str
    version: int
    reason: str = ""
