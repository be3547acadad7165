"""The read API: L1, then L2; plaintext only after decryption in this process.

Reads are scoped by tenant at every step: a record is looked up by the pair
(tenant, key) and checked to belong to the tenant asked for.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from projections.l1 import L1Cache
from projections.l2 import HistoryRow, L2Reader, StoredRecord
from strata.crypto import open_sealed
from strata.errors import ErasedError, NotFoundError, StrataError
from strata.keystore import LocalKeystore


@dataclass(frozen=True, slots=True)
class WriteToken:
    """Where a write landed: read it back once this offset is projected."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> WriteToken:
        """Parse ``PARTITION:OFFSET``.

        Raises:
            ValueError: the text is not two non-negative integers.
        """
        partition, _, offset = text.partition(":")
        token = cls(int(partition), int(offset))
        if token.partition < 0 or token.offset < 0:
            raise ValueError("negative partition or offset")
        return token


@dataclass(frozen=True, slots=True)
class Memory:
    """A record as a reader sees it, payload decrypted."""

    tenant: str
    key: str
    version: int
    cls: str
    agent: str
    payload: bytes
    metadata: dict[str, str]
    updated_ms: int
    tier: str
    partition: int
    offset: int

    def __repr__(self) -> str:
        return (
            f"Memory(tenant={self.tenant!r}, key={self.key!r}, version={self.version}, "
            f"cls={self.cls!r}, payload=<{len(self.payload)} bytes>)"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; the payload as text when it is UTF-8."""
        try:
            payload: Any = self.payload.decode()
        except UnicodeDecodeError:
            payload = {"base64": base64.b64encode(self.payload).decode()}
        return {
            "tenant": self.tenant,
            "key": self.key,
            "version": self.version,
            "cls": self.cls,
            "agent": self.agent,
            "payload": payload,
            "metadata": self.metadata,
            "updated_ms": self.updated_ms,
            "tier": self.tier,
            "token": f"{self.partition}:{self.offset}",
        }


class Reader:
    """Reads memories through the tiers and decrypts them."""

    def __init__(
        self,
        l2_path: Path,
        keystore: LocalKeystore,
        *,
        l1: L1Cache | None = None,
    ) -> None:
        self.l2 = L2Reader(l2_path)
        self.l1 = l1
        self.keystore = keystore

    def close(self) -> None:
        """Release the database connection."""
        self.l2.close()

    async def wait_for(self, token: WriteToken, *, timeout_s: float = 30.0) -> None:
        """Wait until L2 has projected the token's offset.

        Raises:
            TimeoutError: it was not projected within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while self.l2.checkpoint(token.partition) <= token.offset:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"offset {token.offset} of partition {token.partition} was not "
                    f"projected within {timeout_s:g}s (is a worker running?)"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def record(self, tenant: str, key: str) -> StoredRecord:
        """The current stored (encrypted) record of a key.

        Raises:
            ErasedError: the tenant was erased.
            NotFoundError: no live record.
        """
        record = self.l1.get(tenant, key) if self.l1 is not None else None
        if record is None:
            record = self.l2.get(tenant, key)
            if record is not None and self.l1 is not None and not record.deleted:
                self.l1.put(record)
        if record is None or record.deleted:
            self._raise_missing(tenant, key, deleted=record is not None)
        assert record is not None
        if record.tenant != tenant or record.key != key:
            raise StrataError(
                f"store returned {record.tenant!r}/{record.key!r} for {tenant!r}/{key!r}"
            )
        return record

    def get(self, tenant: str, key: str, *, as_of: int | None = None) -> Memory:
        """Read and decrypt a key's current value, or its value at an offset.

        Raises:
            ErasedError: the tenant was erased.
            NotFoundError: no such key (or not yet written at ``as_of``).
            DecryptionError: the stored ciphertext does not authenticate.
        """
        if as_of is None:
            record = self.record(tenant, key)
        else:
            found = self.l2.get_as_of(tenant, key, as_of)
            if found is None or found.deleted:
                self._raise_missing(tenant, key, deleted=found is not None, as_of=as_of)
            assert found is not None
            record = found
        return self.decrypt(record)

    def decrypt(self, record: StoredRecord) -> Memory:
        """Decrypt a stored record under the key version it names."""
        assert record.nonce is not None
        assert record.ciphertext is not None
        assert record.key_version is not None
        data_key = self.keystore.data_key(record.tenant, record.key_version)
        payload = open_sealed(
            data_key,
            record.nonce,
            record.ciphertext,
            tenant=record.tenant,
            key=record.key,
            event_id=record.event_id,
        )
        return Memory(
            tenant=record.tenant,
            key=record.key,
            version=record.version,
            cls=record.cls,
            agent=record.agent,
            payload=payload,
            metadata=record.metadata,
            updated_ms=record.updated_ms,
            tier=record.tier,
            partition=record.partition,
            offset=record.offset,
        )

    def history(self, tenant: str, key: str) -> list[HistoryRow]:
        """Every event that touched a key, rejected ones included.

        Raises:
            ErasedError: the tenant was erased.
            NotFoundError: no event ever touched the key.
        """
        rows = self.l2.history(tenant, key)
        if not rows:
            self._raise_missing(tenant, key, deleted=False)
        return rows

    def list(
        self, tenant: str, *, prefix: str | None = None, cls: str | None = None
    ) -> list[tuple[str, int, str, int]]:
        """Live keys of a tenant as (key, version, class, updated_ms)."""
        if self.l2.is_erased(tenant):
            raise ErasedError(f"tenant {tenant!r} was erased")
        return self.l2.list(tenant, prefix=prefix, cls=cls)

    def _raise_missing(
        self, tenant: str, key: str, *, deleted: bool, as_of: int | None = None
    ) -> None:
        if self.l2.is_erased(tenant) or self.keystore.is_erased(tenant):
            raise ErasedError(f"tenant {tenant!r} was erased; its memories are gone")
        where = f" at offset {as_of}" if as_of is not None else ""
        state = "was deleted" if deleted else "not found"
        raise NotFoundError(f"{tenant}/{key}: {state}{where}")


def history_to_dict(row: HistoryRow) -> dict[str, Any]:
    """A JSON-ready form of one history row."""
    return dataclasses.asdict(row)
