"""The keyring: per-tenant, versioned data keys, wrapped by a KMS.

Envelope encryption. Each tenant has data keys (AES-256, one per version)
that encrypt its payloads; each data key is stored only wrapped by the
tenant's key-encryption key, which lives in the KMS (:mod:`strata.kms`) and
never leaves it. The KMS key is named after the tenant's opaque key id, so a
remote KMS does not learn tenant names.

Layout inside ``<data dir>/keys``::

    keystore.json    wrapped data keys, versions and their states (atomic writes)
    keystore.lock    serialises writers across processes (flock)
    kms.json         the local KMS's named keys (only with the local KMS)
    master.key       the local KMS's master key, mode 0600 (unless placed elsewhere)

Unwrapped keys live only in this process's memory, for ``cache_ttl_s``.

Usage bound. Every encryption is charged to its key version before the nonce
is drawn. A process reserves encryptions in blocks recorded durably in
``keystore.json`` before using them, so the recorded count is never below the
real one (a process that dies wastes the rest of its block, which only errs
on the safe side). When a primary version's count reaches
``rotate_after`` the keyring creates the next version and makes it primary;
no version ever exceeds :data:`~strata.crypto.MAX_ENCRYPTIONS`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from strata.config import Settings
from strata.crypto import KEY_SIZE, MAX_ENCRYPTIONS, DataKey
from strata.errors import (
    ConfigError,
    ErasedError,
    KeyUnavailableError,
    KmsUnavailableError,
    StoreError,
)
from strata.kms import (
    Kms,
    LocalKms,
    RemoteKms,
    StateFile,
    load_or_create_master_key,
)
from strata.paths import StorePaths
from strata.shapes import Fields, MapOf, shape_problem
from strata.validation import is_tenant

__all__ = [
    "ACTIVE",
    "DESTROYED",
    "RETIRED",
    "Erasure",
    "KeyVersionInfo",
    "Keyring",
    "LocalKeystore",
    "is_key_id_of",
    "key_id_for",
    "tenant_tag",
    "load_or_create_master_key",
    "open_keystore",
]

log = structlog.get_logger(__name__)

ACTIVE = "active"
RETIRED = "retired"
DESTROYED = "destroyed"

FORMAT = 2
_OPTIONAL_INT = (int, type(None))
_OPTIONAL_STR = (str, type(None))
#: What ``keystore.json`` holds; anything else is refused as damaged.
KEYSTORE_SHAPE = Fields(
    {
        "tenants": MapOf(
            Fields(
                {
                    "key_id": str,
                    "primary": int,
                    "versions": MapOf(
                        Fields(
                            {"state": str, "created_ms": int},
                            {
                                "wrapped": str,
                                "encryptions": int,
                                "job_id": _OPTIONAL_STR,
                                "cleared_ms": _OPTIONAL_INT,
                                "retired_ms": int,
                            },
                        ),
                        digit_keys=True,
                    ),
                },
                {"erased": bool, "erasure": dict},
            )
        )
    },
    {"format": int},
)
_STATES = (ACTIVE, RETIRED, DESTROYED)


def keystore_problem(doc: Any) -> str | None:
    """What is wrong with a keystore document, naming the field; None if nothing.

    Beyond :data:`KEYSTORE_SHAPE`: tenant names are valid, states are known,
    counts are not negative, the primary is one of the tenant's versions and
    every active version holds its wrapped key.
    """
    problem = shape_problem(doc, KEYSTORE_SHAPE)
    if problem is not None:
        return problem
    for tenant, entry in doc["tenants"].items():
        where = f"tenants.{tenant}"
        if not is_tenant(tenant):
            return f"{where}: {tenant!r} is not a tenant name"
        versions = entry["versions"]
        for version, info in versions.items():
            at = f"{where}.versions.{version}"
            if info["state"] not in _STATES:
                return (
                    f"{at}.state: {info['state']!r} is not one of {', '.join(_STATES)}"
                )
            if info.get("encryptions", 0) < 0:
                return f"{at}.encryptions: {info['encryptions']} is negative"
            if info.get("encryptions", 0) > MAX_ENCRYPTIONS:
                return (
                    f"{at}.encryptions: {info['encryptions']} is more than a version "
                    f"may ever make ({MAX_ENCRYPTIONS})"
                )
            if info["state"] == ACTIVE and "wrapped" not in info:
                return f"{at}.wrapped: missing, and the version is active"
        if not entry.get("erased") and str(entry["primary"]) not in versions:
            return (
                f"{where}.primary: version {entry['primary']} is not among its versions"
            )
    return None


#: First block of encryptions a process reserves per key version; it doubles
#: up to the maximum, so short-lived processes waste little and busy ones
#: rarely write the keystore.
FIRST_BLOCK = 256
MAX_BLOCK = 65_536
#: Default soft bound: rotate at 2**30 encryptions, a quarter of the cap,
#: where the chance of any repeated 96-bit nonce is below 2**-37.
ROTATE_AFTER = 2**30
#: How long a writer may reuse a tenant's primary key without looking at the
#: keystore file again. A change made through the same keyring is seen at
#: once; a rotation or an erasure made by another process within this time.
PRIMARY_RECHECK_S = 0.1


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """What is known about one key version without unwrapping it."""

    tenant: str
    key_id: str
    version: int
    state: str
    created_ms: int
    primary: bool
    encryptions: int = 0
    cleared_ms: int | None = None
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class Erasure:
    """The record of a tenant's erasure, as the keystore keeps it."""

    tenant: str
    key_id: str
    erasure_id: str
    erased_ms: int
    versions: list[int]
    kms_key_deleted: bool
    markers: dict[int, int] = field(default_factory=dict)
    purged: dict[str, int] = field(default_factory=dict)


def tenant_tag(tenant: str) -> str:
    """The part of a key id that names its tenant: 12 hex digits of a hash,
    revealing nothing beyond equality."""
    return hashlib.sha256(b"strata/key-id/" + tenant.encode()).hexdigest()[:12]


def key_id_for(tenant: str) -> str:
    """A new key id for a tenant: ``tk_``, its :func:`tenant_tag`, and 8 random
    hex digits.

    The random part makes each keystore's key id its own: a write sealed by
    a keystore the workers do not have (another data dir, a lost file started
    afresh) names a key they do not know, and is dead-lettered as such
    instead of projected under a key that cannot open it. Keystores made
    before held the first 20 digits of the same hash; both forms are kept.
    """
    return f"tk_{tenant_tag(tenant)}{secrets.token_hex(4)}"


def is_key_id_of(key_id: str, tenant: str) -> bool:
    """Whether ``key_id`` is a key id :func:`key_id_for` could give ``tenant``."""
    return (
        len(key_id) == 23
        and key_id.startswith(f"tk_{tenant_tag(tenant)}")
        and all(c in "0123456789abcdef" for c in key_id[3:])
    )


_KMS_KEY_PREFIX = "strata-"


def _kms_key_name(key_id: str) -> str:
    return f"{_KMS_KEY_PREFIX}{key_id}"


def _wrap_context(key_id: str, version: int) -> bytes:
    return f"strata/data-key/v2/{key_id}/{version}".encode()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _erased(tenant: str) -> ErasedError:
    return ErasedError(f"tenant {tenant!r} was erased; its keys are destroyed")


class _Meter:
    """Charges encryptions of one key version against durable reservations.

    The encryptions of a reserved block are handed out by one iterator, whose
    ``next`` is a single step under the interpreter lock, so no two callers
    are handed the same one and a write pays no lock of its own; only the
    caller that finds the block used up takes the lock to reserve the next.
    """

    def __init__(self, keyring: Keyring, tenant: str, version: int) -> None:
        self._keyring = keyring
        self._tenant = tenant
        self._version = version
        self._granted: Iterator[int] = iter(())
        self._block = FIRST_BLOCK
        self._lock = threading.Lock()

    def take(self) -> None:
        if next(self._granted, None) is None:
            self._reserve()

    def _reserve(self) -> None:
        with self._lock:
            # Another caller may have reserved a block while this one waited.
            while next(self._granted, None) is None:
                # A block never exceeds 1/64 of the rotation bound, so a
                # rotation wastes little of a version however small the bound.
                wanted = min(self._block, max(1, self._keyring.rotate_after // 64))
                granted = self._keyring._reserve(self._tenant, self._version, wanted)
                self._granted = iter(range(granted))
                self._block = min(self._block * 2, MAX_BLOCK)


class Keyring:
    """Per-tenant data keys in a local file, wrapped by a :class:`~strata.kms.Kms`.

    Safe to share between processes on one machine: every change happens
    under an exclusive lock and is written by atomic rename; readers reload
    when the file changes, so a retirement or erasure made by one process
    takes effect in the others at their next use of the key.

    Args:
        directory: where ``keystore.json`` lives.
        kms: holder of the key-encryption keys.
        cache_ttl_s: how long an unwrapped key is kept in memory.
        rotate_after: encryptions after which a primary version is rotated.
        max_encryptions: encryptions a version may never exceed.
    """

    def __init__(
        self,
        directory: Path,
        kms: Kms,
        *,
        cache_ttl_s: float = 300.0,
        rotate_after: int = ROTATE_AFTER,
        max_encryptions: int = MAX_ENCRYPTIONS,
    ) -> None:
        if not 0 < rotate_after <= max_encryptions <= MAX_ENCRYPTIONS:
            raise ConfigError(
                f"key rotation after {rotate_after} encryptions must be positive "
                f"and at most {max_encryptions} (the cap is {MAX_ENCRYPTIONS})"
            )
        self.directory = directory
        self.kms = kms
        self.cache_ttl_s = cache_ttl_s
        self.rotate_after = rotate_after
        self.max_encryptions = max_encryptions
        self._state = StateFile(
            directory / "keystore.json",
            lambda: {"format": FORMAT, "tenants": {}},
            keystore_problem,
        )
        self._cache: dict[tuple[str, int], tuple[DataKey, float]] = {}
        # tenant -> (primary key, the document it came from, recheck deadline)
        self._primaries: dict[str, tuple[DataKey, dict[str, Any], float]] = {}
        self._mutex = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, kms={self.kms.describe()!r})"

    def close(self) -> None:
        """Forget unwrapped keys and release the KMS's connections."""
        with self._mutex:
            self._cache.clear()
            self._primaries.clear()
        self.kms.close()

    # -- reading -----------------------------------------------------------------

    def _doc(self) -> dict[str, Any]:
        doc = self._state.read()
        if doc.get("format") != FORMAT:
            has = (
                f"format {doc['format']}"
                if "format" in doc
                else "no format field (an older Strata's, or damaged)"
            )
            raise ConfigError(
                f"keystore {self._state.path} has {has}; this Strata reads "
                f"format {FORMAT} (start from a fresh data dir)"
            )
        return doc

    def check(self) -> None:
        """Read the keystore now, so damage or loss is reported before any work
        starts (a worker with nothing to project would otherwise never look).

        Every entry must carry its tenant's key id (an entry renamed or
        altered no longer does), and every tenant key the KMS holds must have
        an entry (a lost file or a lost entry).

        Raises:
            StoreError: the file is damaged, or lacks entries for keys the
                KMS holds.
            ConfigError: it has another format.
        """
        tenants: dict[str, Any] = self._doc()["tenants"]
        for tenant, entry in tenants.items():
            if not is_key_id_of(entry["key_id"], tenant):
                raise StoreError(
                    f"{self._state.path}: damaged: tenants.{tenant}.key_id: "
                    f"{entry['key_id']} is not a key id of tenant {tenant!r} "
                    f"(tk_{tenant_tag(tenant)} then 8 hex digits); the entry was "
                    "renamed or altered: restore the keystore"
                )
        claimed = {_kms_key_name(entry["key_id"]) for entry in tenants.values()}
        held = [n for n in self.kms.key_names() if n.startswith(_KMS_KEY_PREFIX)]
        lost = sorted(set(held) - claimed)
        if lost and not tenants:
            raise self._lost(f"the keys of {len(held)} tenant(s)")
        if lost:
            more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
            raise self._lost(
                f"its key {lost[0]}{more}", lacking="lacks an entry for a tenant"
            )

    def _refuse_lost_entry(self, tenant: str) -> None:
        """Refuse a tenant the keystore does not know while the KMS holds its key.

        Its entry (or the whole file) was lost: making new data keys under the
        same key id would leave every record sealed so far unreadable, without
        a word. A KMS that cannot list its keys gives no such evidence.

        Raises:
            StoreError: the KMS holds the tenant's key.
        """
        prefix = _kms_key_name(f"tk_{tenant_tag(tenant)}")
        held = sorted(n for n in self.kms.key_names() if n.startswith(prefix))
        if held:
            raise self._lost(
                f"the key of tenant {tenant!r} ({held[0]})",
                lacking=f"has no entry for tenant {tenant!r}",
            )

    def _lost(self, held: str, *, lacking: str = "is empty") -> StoreError:
        path = self._state.path
        what = "is missing" if not path.exists() else lacking
        return StoreError(
            f"{path} {what}, but the KMS ({self.kms.describe()}) holds {held}: restore the "
            "keystore; new keys would leave every record sealed so far unreadable "
            "(if none was ever written, delete those KMS keys to start afresh)"
        )

    def _tenant(self, tenant: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = self._doc()["tenants"].get(tenant)
        if entry is None:
            self._refuse_lost_entry(tenant)
        return entry

    def is_erased(self, tenant: str) -> bool:
        """Whether the tenant's keys were destroyed."""
        entry = self._tenant(tenant)
        return bool(entry and entry.get("erased"))

    def erased_tenants(self) -> set[str]:
        """Every tenant whose keys were destroyed."""
        return {t for t, e in self._doc()["tenants"].items() if e.get("erased")}

    def has_version(self, tenant: str, key_id: str, version: int) -> bool:
        """Whether this tenant has this key version (retired ones included)."""
        entry = self._tenant(tenant)
        return bool(
            entry and entry["key_id"] == key_id and str(version) in entry["versions"]
        )

    def versions(self, tenant: str) -> list[KeyVersionInfo]:
        """Every version of a tenant's key, oldest first."""
        entry = self._tenant(tenant)
        if entry is None:
            return []
        return [
            KeyVersionInfo(
                tenant=tenant,
                key_id=entry["key_id"],
                version=int(v),
                state=info["state"],
                created_ms=info["created_ms"],
                primary=int(v) == entry["primary"] and not entry.get("erased"),
                encryptions=int(info.get("encryptions", 0)),
                cleared_ms=info.get("cleared_ms"),
                job_id=info.get("job_id"),
            )
            for v, info in sorted(entry["versions"].items(), key=lambda i: int(i[0]))
        ]

    def primary_version(self, tenant: str) -> int | None:
        """The version new writes use, or None for an unknown or erased tenant."""
        entry = self._tenant(tenant)
        if entry is None or entry.get("erased"):
            return None
        return int(entry["primary"])

    def tenants(self) -> list[str]:
        """Every tenant the keystore knows, erased ones included."""
        return sorted(self._doc()["tenants"])

    def erasure(self, tenant: str) -> Erasure | None:
        """The record of the tenant's erasure, or None if it was not erased."""
        entry = self._tenant(tenant)
        if entry is None or not entry.get("erased"):
            return None
        record = entry["erasure"]
        return Erasure(
            tenant=tenant,
            key_id=entry["key_id"],
            erasure_id=record["erasure_id"],
            erased_ms=record["erased_ms"],
            versions=list(record["versions"]),
            kms_key_deleted=bool(record.get("kms_key_deleted")),
            markers={int(p): int(o) for p, o in record.get("markers", {}).items()},
            purged={str(k): int(v) for k, v in record.get("purged", {}).items()},
        )

    def data_key(self, tenant: str, version: int) -> DataKey:
        """Unwrap one version of a tenant's key (from the cache when fresh).

        Raises:
            ErasedError: the tenant was erased.
            KeyUnavailableError: no such version, it is retired, or the KMS
                cannot unwrap it (:class:`~strata.kms.KmsUnavailableError`
                when the KMS does not answer).
        """
        return self._data_key(tenant, version, self._tenant(tenant))

    def _data_key(
        self, tenant: str, version: int, entry: dict[str, Any] | None
    ) -> DataKey:
        if entry is not None and entry.get("erased"):
            self._forget(tenant)
            raise _erased(tenant)
        info = entry["versions"].get(str(version)) if entry else None
        if entry is None or info is None:
            raise KeyUnavailableError(f"tenant {tenant!r} has no key version {version}")
        if info["state"] != ACTIVE:
            self._cache.pop((tenant, version), None)
            raise KeyUnavailableError(
                f"key version {version} of {tenant!r} is {info['state']}"
            )
        with self._mutex:
            cached = self._cache.get((tenant, version))
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            material = self._unwrap(tenant, entry["key_id"], version, info["wrapped"])
            key = DataKey(
                tenant,
                entry["key_id"],
                version,
                material,
                meter=_Meter(self, tenant, version),
            )
            self._cache[(tenant, version)] = (key, time.monotonic() + self.cache_ttl_s)
            return key

    def primary(self, tenant: str) -> DataKey:
        """The key new writes use, creating version 1 on a tenant's first write.

        Each :func:`~strata.crypto.seal` with the returned key counts against
        the version's usage bound. Writers call this per event, so the answer
        is reused for :data:`PRIMARY_RECHECK_S` unless this keyring changed
        the keystore meanwhile.

        Raises:
            ErasedError: the tenant was erased and may not be written again.
            KeyUnavailableError: the KMS cannot create or unwrap the key.
        """
        hit = self._primaries.get(tenant)
        if (
            hit is not None
            and hit[1] is self._state.current
            and time.monotonic() < hit[2]
        ):
            return hit[0]
        entry = self._tenant(tenant)
        if entry is None:
            with self._state.update() as doc:
                entry = doc["tenants"].get(tenant) or self._new_tenant(doc, tenant)
        if entry.get("erased"):
            raise _erased(tenant)
        key = self._data_key(tenant, int(entry["primary"]), entry)
        self._primaries[tenant] = (
            key,
            self._state.current,
            time.monotonic() + PRIMARY_RECHECK_S,
        )
        return key

    # -- changing ----------------------------------------------------------------

    def rotate(self, tenant: str, *, job_id: str | None = None) -> DataKey:
        """Create a new key version and make it primary for new writes.

        Raises:
            ErasedError: the tenant was erased.
            KeyUnavailableError: the KMS cannot wrap the new key.
        """
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant) or self._new_tenant(doc, tenant)
            if entry.get("erased"):
                raise _erased(tenant)
            version = self._add_version(entry, tenant, job_id=job_id)
        log.info("keys.rotated", tenant=tenant, version=version, job_id=job_id)
        return self.data_key(tenant, version)

    def ensure_version(self, tenant: str, version: int, *, job_id: str) -> bool:
        """Make sure ``version`` exists, creating it as the new primary if it is next.

        Lets a rotation job that was stopped between creating its version and
        recording its start be run again without creating another version.
        Returns True when it created the version.

        Raises:
            ErasedError: the tenant was erased.
            KeyUnavailableError: ``version`` is neither present nor the next one.
        """
        entry = self._tenant(tenant)
        if entry is not None and str(version) in entry["versions"]:
            return False
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant)
            if entry is None:
                raise KeyUnavailableError(f"tenant {tenant!r} has no keys")
            if entry.get("erased"):
                raise _erased(tenant)
            if str(version) in entry["versions"]:
                return False
            latest = max(int(v) for v in entry["versions"])
            if version != latest + 1:
                raise KeyUnavailableError(
                    f"tenant {tenant!r} is at key version {latest}; cannot create {version}"
                )
            self._add_version(entry, tenant, job_id=job_id)
        log.info("keys.rotated", tenant=tenant, version=version, job_id=job_id)
        return True

    def set_primary(self, tenant: str, version: int) -> None:
        """Switch new writes to another active version: a rotation's rollback.

        Raises:
            KeyUnavailableError: no such active version.
        """
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant)
            info = entry["versions"].get(str(version)) if entry else None
            if entry is None or info is None or info["state"] != ACTIVE:
                raise KeyUnavailableError(
                    f"tenant {tenant!r} has no active key version {version}"
                )
            if entry.get("erased"):
                raise _erased(tenant)
            entry["primary"] = version
            # New writes will be sealed under it: an earlier verification
            # that nothing needs it no longer holds.
            info.pop("cleared_ms", None)
        log.info("keys.primary_set", tenant=tenant, version=version)

    def record_clearance(self, tenant: str, version: int) -> None:
        """Note that a verification found no record still needing this version."""
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant)
            info = entry["versions"].get(str(version)) if entry else None
            if info is not None and info["state"] == ACTIVE:
                info["cleared_ms"] = _now_ms()

    def retire(self, tenant: str, version: int) -> None:
        """Destroy one non-primary key version's material; its metadata stays.

        The caller is responsible for checking that nothing needs it (see
        :func:`consumers.rotation.retire_versions`).

        Raises:
            KeyUnavailableError: no such version, or it is the primary.
        """
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant)
            info = entry["versions"].get(str(version)) if entry else None
            if entry is None or info is None:
                raise KeyUnavailableError(
                    f"tenant {tenant!r} has no key version {version}"
                )
            if entry["primary"] == version:
                raise KeyUnavailableError(
                    f"version {version} is the primary of {tenant!r}; rotate first"
                )
            info["state"] = RETIRED
            info["retired_ms"] = _now_ms()
            info.pop("wrapped", None)
        with self._mutex:
            self._cache.pop((tenant, version), None)
        log.info("keys.retired", tenant=tenant, version=version)

    def shred(self, tenant: str, *, purged: dict[str, int] | None = None) -> Erasure:
        """Destroy every version of a tenant's key, here and in the KMS.

        The local copies go first and for good. When the KMS does not
        answer, the record says ``kms_key_deleted=False`` and a later call
        finishes the deletion. Idempotent: for a tenant already erased it
        finishes what is left and returns the first erasure's record.

        Args:
            purged: what the stores held of the tenant, kept for the receipt.

        Raises:
            KeyUnavailableError: the tenant has no keys.
        """
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant)
            if entry is None:
                raise KeyUnavailableError(f"tenant {tenant!r} has no keys to destroy")
            if not entry.get("erased"):
                erased_ms = _now_ms()
                entry["erased"] = True
                entry["erasure"] = {
                    "erasure_id": hashlib.sha256(
                        f"strata/erasure/{tenant}/{erased_ms}".encode()
                    ).hexdigest()[:32],
                    "erased_ms": erased_ms,
                    "versions": sorted(
                        int(v)
                        for v, info in entry["versions"].items()
                        if info["state"] != DESTROYED
                    ),
                    "kms_key_deleted": False,
                    "purged": dict(purged or {}),
                }
                for info in entry["versions"].values():
                    info["state"] = DESTROYED
                    info.pop("wrapped", None)
            key_id = entry["key_id"]
            deleted = entry["erasure"].get("kms_key_deleted")
        self._forget(tenant)
        if not deleted:
            try:
                self.kms.delete_key(_kms_key_name(key_id))
            except KmsUnavailableError as exc:
                log.warning(
                    "keys.kms_key_not_deleted",
                    tenant=tenant,
                    error=str(exc),
                    consequence="local keys are destroyed; the KMS key stays until "
                    "the erasure is run again",
                )
            else:
                with self._state.update() as doc:
                    doc["tenants"][tenant]["erasure"]["kms_key_deleted"] = True
        record = self.erasure(tenant)
        assert record is not None
        log.info(
            "keys.shredded",
            tenant=tenant,
            versions=record.versions,
            erasure_id=record.erasure_id,
        )
        return record

    def note_erasure_markers(self, tenant: str, markers: dict[int, int]) -> None:
        """Record where the TenantErased events landed (partition to offset)."""
        with self._state.update() as doc:
            record = doc["tenants"][tenant]["erasure"]
            record["markers"] = {str(p): o for p, o in sorted(markers.items())}

    # -- internals ---------------------------------------------------------------

    def _reserve(self, tenant: str, version: int, wanted: int) -> int:
        """Durably reserve up to ``wanted`` encryptions; return how many were granted.

        Rotates the tenant when the primary version reaches ``rotate_after``.
        """
        rotated = None
        with self._state.update() as doc:
            entry = doc["tenants"].get(tenant)
            info = entry["versions"].get(str(version)) if entry else None
            if entry is None or entry.get("erased"):
                raise _erased(tenant)
            if info is None or info["state"] != ACTIVE:
                raise KeyUnavailableError(
                    f"key version {version} of {tenant!r} may not encrypt any more"
                )
            used = int(info.get("encryptions", 0))
            granted = min(wanted, self.max_encryptions - used)
            if granted <= 0:
                raise KeyUnavailableError(
                    f"key version {version} of {tenant!r} has used all "
                    f"{self.max_encryptions} encryptions; new writes need a rotation"
                )
            info["encryptions"] = used + granted
            if entry["primary"] == version and used + granted >= self.rotate_after:
                rotated = self._add_version(entry, tenant, job_id=None)
        if rotated is not None:
            log.info(
                "keys.rotated_for_usage",
                tenant=tenant,
                version=rotated,
                previous=version,
                encryptions=used + granted,
                consequence=f"new writes use v{rotated}; v{version} keeps its records",
            )
        return granted

    def _unwrap(self, tenant: str, key_id: str, version: int, wrapped: str) -> bytes:
        try:
            material = self.kms.unwrap(
                _kms_key_name(key_id), wrapped, _wrap_context(key_id, version)
            )
        except KmsUnavailableError:
            raise
        except KeyUnavailableError as exc:
            raise KeyUnavailableError(
                f"key version {version} of {tenant!r} does not unwrap ({self._state.path}: "
                f"tenants.{tenant}.versions.{version}.wrapped): {exc}"
            ) from exc
        if len(material) != KEY_SIZE:
            raise KeyUnavailableError(
                f"key version {version} of {tenant!r} unwraps to the wrong size "
                f"({self._state.path}: tenants.{tenant}.versions.{version}.wrapped)"
            )
        return material

    def _add_version(
        self, entry: dict[str, Any], tenant: str, *, job_id: str | None
    ) -> int:
        version = max((int(v) for v in entry["versions"]), default=0) + 1
        key_id = entry["key_id"]
        material = os.urandom(KEY_SIZE)
        wrapped = self.kms.wrap(
            _kms_key_name(key_id), material, _wrap_context(key_id, version)
        )
        entry["versions"][str(version)] = {
            "wrapped": wrapped,
            "state": ACTIVE,
            "created_ms": _now_ms(),
            "encryptions": 0,
            "job_id": job_id,
        }
        entry["primary"] = version
        return version

    def _new_tenant(self, doc: dict[str, Any], tenant: str) -> dict[str, Any]:
        key_id = key_id_for(tenant)
        name = _kms_key_name(key_id)
        self._refuse_lost_entry(tenant)
        self.kms.create_key(name)
        entry: dict[str, Any] = {"key_id": key_id, "primary": 1, "versions": {}}
        self._add_version(entry, tenant, job_id=None)
        doc["tenants"][tenant] = entry
        log.info("keys.tenant_created", tenant=tenant, key_id=key_id)
        return entry

    def _forget(self, tenant: str) -> None:
        with self._mutex:
            self._primaries.pop(tenant, None)
            for ident in [i for i in self._cache if i[0] == tenant]:
                del self._cache[ident]


class LocalKeystore(Keyring):
    """A keyring whose KMS is local: named keys wrapped by a master key file.

    Args:
        directory: the keystore folder (``<data dir>/keys``).
        master_key_file: the master key, created on first use with mode 0600.
    """

    def __init__(
        self,
        directory: Path,
        master_key_file: Path,
        *,
        cache_ttl_s: float = 300.0,
        rotate_after: int = ROTATE_AFTER,
        max_encryptions: int = MAX_ENCRYPTIONS,
    ) -> None:
        super().__init__(
            directory,
            LocalKms(directory, master_key_file),
            cache_ttl_s=cache_ttl_s,
            rotate_after=rotate_after,
            max_encryptions=max_encryptions,
        )


def open_keystore(settings: Settings) -> Keyring:
    """The keyring the settings choose: the remote KMS when ``STRATA_KMS_URL`` is set.

    Raises:
        ConfigError: the KMS settings are not usable.
    """
    keys = StorePaths(settings.data_dir).keys
    ttl_s = settings.key_cache_ttl_ms / 1000
    rotate_after = settings.key_rotate_after_encryptions
    if not settings.kms_url:
        return LocalKeystore(
            keys, settings.master_key_path, cache_ttl_s=ttl_s, rotate_after=rotate_after
        )
    token = settings.kms_token.get_secret_value() if settings.kms_token else None
    kms = RemoteKms(
        settings.kms_url,
        token=token,
        request_timeout_s=settings.kms_request_timeout_ms / 1000,
        max_attempts=settings.kms_max_attempts,
        retry_backoff_s=settings.kms_retry_backoff_ms / 1000,
        retry_backoff_max_s=settings.kms_retry_backoff_max_ms / 1000,
    )
    return Keyring(keys, kms, cache_ttl_s=ttl_s, rotate_after=rotate_after)
