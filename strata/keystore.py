"""The local keystore: per-tenant, versioned data keys wrapped by a master key.

Layout inside ``<data dir>/keys``::

    master.key       32 random bytes, mode 0600, created on first use
    keystore.json    wrapped data keys and their states, written atomically
    keystore.lock    serialises writers across processes (flock)

A data key is wrapped with AES-256-GCM under the master key, with the tenant
and version as associated data, so a wrapped key moved to another tenant or
version does not unwrap. Unwrapped keys live only in this process's memory.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strata.crypto import KEY_SIZE, NONCE_SIZE, DataKey
from strata.errors import ConfigError, ErasedError, KeyUnavailableError, StoreError

ACTIVE = "active"
RETIRED = "retired"


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """What is known about one key version without unwrapping it."""

    tenant: str
    key_id: str
    version: int
    state: str
    created_ms: int
    primary: bool


def key_id_for(tenant: str) -> str:
    """A tenant's opaque key id: stable, and reveals nothing beyond equality."""
    return "tk_" + hashlib.sha256(b"strata/key-id/" + tenant.encode()).hexdigest()[:20]


def _wrap_aad(tenant: str, version: int) -> bytes:
    return f"strata/wrap/v1/{tenant}/{version}".encode()


def load_or_create_master_key(path: Path) -> bytes:
    """Read the master key, creating it (mode 0600) on first use.

    Raises:
        ConfigError: the file exists but is not 32 bytes, or is readable by others.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"master key file {path}: {exc.strerror}") from exc
    else:
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(KEY_SIZE))
            out.flush()
            os.fsync(out.fileno())
    try:
        mode = path.stat().st_mode & 0o777
        material = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"master key file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"master key file {path} has mode {mode:o}; it must be 0600 (chmod 600)"
        )
    if len(material) != KEY_SIZE:
        raise ConfigError(
            f"master key file {path} holds {len(material)} bytes; expected {KEY_SIZE}"
        )
    return material


class LocalKeystore:
    """Data keys in a local file, wrapped by a master key in another file.

    Safe to share between processes on one machine: every change happens
    under an exclusive lock and is written by atomic rename; readers reload
    when the file changes.
    """

    def __init__(self, directory: Path, master_key_file: Path) -> None:
        self._dir = directory
        self._master_key_file = master_key_file
        self._master: bytes | None = None
        self._file = directory / "keystore.json"
        self._doc: dict[str, Any] = {"tenants": {}}
        self._stamp: tuple[int, int] | None = None
        self._cache: dict[tuple[str, int], DataKey] = {}

    def __repr__(self) -> str:
        return f"LocalKeystore({str(self._dir)!r})"

    # -- reading ---------------------------------------------------------

    def _refresh(self) -> None:
        try:
            st = self._file.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            self._doc = json.loads(self._file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"keystore {self._file}: cannot be read: {exc}") from exc
        self._stamp = stamp

    def _tenant(self, tenant: str) -> dict[str, Any] | None:
        self._refresh()
        entry: dict[str, Any] | None = self._doc["tenants"].get(tenant)
        return entry

    def is_erased(self, tenant: str) -> bool:
        """Whether the tenant's keys were destroyed."""
        entry = self._tenant(tenant)
        return bool(entry and entry.get("erased"))

    def erased_tenants(self) -> set[str]:
        """Every tenant whose keys were destroyed."""
        self._refresh()
        return {t for t, e in self._doc["tenants"].items() if e.get("erased")}

    def has_version(self, tenant: str, key_id: str, version: int) -> bool:
        """Whether this tenant has this key version (retired versions included)."""
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
                primary=int(v) == entry["primary"],
            )
            for v, info in sorted(entry["versions"].items(), key=lambda i: int(i[0]))
        ]

    def tenants(self) -> list[str]:
        """Every tenant the keystore knows, erased ones included."""
        self._refresh()
        return sorted(self._doc["tenants"])

    def data_key(self, tenant: str, version: int) -> DataKey:
        """Unwrap one version of a tenant's key.

        Raises:
            ErasedError: the tenant was erased.
            KeyUnavailableError: no such version, or it does not unwrap.
        """
        cached = self._cache.get((tenant, version))
        if cached is not None:
            return cached
        entry = self._tenant(tenant)
        if entry is not None and entry.get("erased"):
            raise ErasedError(f"tenant {tenant!r} was erased; its keys are destroyed")
        info = entry["versions"].get(str(version)) if entry else None
        if entry is None or info is None:
            raise KeyUnavailableError(f"tenant {tenant!r} has no key version {version}")
        dk = DataKey(
            tenant, entry["key_id"], version, self._unwrap(tenant, version, info)
        )
        self._cache[(tenant, version)] = dk
        return dk

    def primary(self, tenant: str) -> DataKey:
        """The key version new writes use, creating version 1 on a tenant's first write.

        Raises:
            ErasedError: the tenant was erased and may not be written again.
        """
        entry = self._tenant(tenant)
        if entry is None:
            with self._locked() as doc:
                entry = doc["tenants"].get(tenant) or self._new_tenant(doc, tenant)
        if entry.get("erased"):
            raise ErasedError(f"tenant {tenant!r} was erased; its keys are destroyed")
        return self.data_key(tenant, int(entry["primary"]))

    # -- changing --------------------------------------------------------

    def rotate(self, tenant: str) -> DataKey:
        """Create a new key version and make it primary for new writes."""
        with self._locked() as doc:
            entry = doc["tenants"].get(tenant) or self._new_tenant(doc, tenant)
            if entry.get("erased"):
                raise ErasedError(
                    f"tenant {tenant!r} was erased; its keys are destroyed"
                )
            version = max(int(v) for v in entry["versions"]) + 1
            entry["versions"][str(version)] = self._wrapped_new(tenant, version)
            entry["primary"] = version
        return self.data_key(tenant, version)

    def set_primary(self, tenant: str, version: int) -> None:
        """Switch new writes to another (active) version: a rotation's rollback."""
        with self._locked() as doc:
            entry = doc["tenants"].get(tenant)
            info = entry["versions"].get(str(version)) if entry else None
            if entry is None or info is None or info["state"] != ACTIVE:
                raise KeyUnavailableError(
                    f"tenant {tenant!r} has no active key version {version}"
                )
            entry["primary"] = version

    def retire(self, tenant: str, version: int) -> None:
        """Destroy one non-primary key version's material."""
        with self._locked() as doc:
            entry = doc["tenants"].get(tenant)
            info = entry["versions"].get(str(version)) if entry else None
            if entry is None or info is None:
                raise KeyUnavailableError(
                    f"tenant {tenant!r} has no key version {version}"
                )
            if entry["primary"] == version:
                raise KeyUnavailableError(
                    f"version {version} is the primary of {tenant!r}"
                )
            info["state"] = RETIRED
            info.pop("wrapped", None)
        self._cache.pop((tenant, version), None)

    def shred(self, tenant: str) -> list[int]:
        """Destroy every version of a tenant's key; return the versions destroyed."""
        with self._locked() as doc:
            entry = doc["tenants"].get(tenant) or self._new_tenant(doc, tenant)
            destroyed = sorted(int(v) for v in entry["versions"])
            entry["versions"] = {}
            entry["erased"] = True
            entry["erased_ms"] = int(time.time() * 1000)
        for version in destroyed:
            self._cache.pop((tenant, version), None)
        return destroyed

    # -- internals -------------------------------------------------------

    def _master_key(self) -> bytes:
        if self._master is None:
            self._master = load_or_create_master_key(self._master_key_file)
        return self._master

    def _wrapped_new(self, tenant: str, version: int) -> dict[str, Any]:
        nonce = os.urandom(NONCE_SIZE)
        material = os.urandom(KEY_SIZE)
        wrapped = nonce + AESGCM(self._master_key()).encrypt(
            nonce, material, _wrap_aad(tenant, version)
        )
        return {
            "wrapped": base64.b64encode(wrapped).decode(),
            "state": ACTIVE,
            "created_ms": int(time.time() * 1000),
        }

    def _unwrap(self, tenant: str, version: int, info: dict[str, Any]) -> bytes:
        if "wrapped" not in info:
            raise KeyUnavailableError(f"key version {version} of {tenant!r} is retired")
        blob = base64.b64decode(info["wrapped"])
        try:
            return AESGCM(self._master_key()).decrypt(
                blob[:NONCE_SIZE], blob[NONCE_SIZE:], _wrap_aad(tenant, version)
            )
        except InvalidTag:
            raise KeyUnavailableError(
                f"key version {version} of {tenant!r} does not unwrap under the "
                f"master key in {self._master_key_file}"
            ) from None

    def _new_tenant(self, doc: dict[str, Any], tenant: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "key_id": key_id_for(tenant),
            "primary": 1,
            "versions": {"1": self._wrapped_new(tenant, 1)},
        }
        doc["tenants"][tenant] = entry
        return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the cross-process lock, yield the fresh document, write it back."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = os.open(self._dir / "keystore.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"keystore {self._dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = None
            self._refresh()
            yield self._doc
            self._write(self._doc)
        finally:
            os.close(lock)

    def _write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".keystore.")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self._file)
        except OSError as exc:
            raise StoreError(
                f"keystore {self._file}: cannot be written: {exc}"
            ) from exc
        self._stamp = None
