"""Payload encryption: AES-256-GCM bound to tenant, key and event id.

The associated data is a length-prefixed encoding of (tenant, key, event id),
so a ciphertext copied onto another record, key or tenant fails to
authenticate. The content hash is an HMAC of the plaintext under a key
derived from the data key: it lets a key holder compare payloads without
exposing a dictionary-attackable plain hash on the topic.

Nonces are 96 random bits, drawn from the operating system's generator
1,024 at a time (a system call per nonce costs half as much as the cipher on
a 1 KiB payload). Each thread hands out nonces from a list of its own, and a
forked child starts with none, so no two encryptions are handed the same
bytes. NIST SP 800-38D (section 8.3) caps a key used
with random nonces at 2**32 encryptions, beyond which a repeated nonce
becomes too likely; a repeated nonce under GCM leaks the XOR of two
plaintexts and the authentication key. Every encryption therefore goes
through the data key's :class:`UsageMeter`, which the keyring backs with a
durable count and which rotates the version long before that cap.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strata.errors import DecryptionError

NONCE_SIZE = 12
KEY_SIZE = 32
#: Encryptions one key version may ever perform (NIST SP 800-38D, random nonces).
MAX_ENCRYPTIONS = 2**32
_MAC_INFO = b"strata/content-hash/v1"
_AAD_LABEL = b"strata/v1"
_SHA256_BLOCK = 64
#: Nonces drawn from the operating system at once, per thread.
_NONCES_PER_DRAW = 1024


class _Nonces(threading.local):
    """The nonces a thread has drawn and not yet handed out.

    Each thread iterates over a list of its own, so no two callers can be
    handed the same item whatever the interpreter's threading.
    """

    unused: Iterator[bytes] = iter(())


_nonces = _Nonces()


def _draw_nonces() -> bytes:
    """Draw this thread's next nonces and hand out the first of them."""
    fresh = os.urandom(NONCE_SIZE * _NONCES_PER_DRAW)
    unused = iter(
        [fresh[at : at + NONCE_SIZE] for at in range(0, len(fresh), NONCE_SIZE)]
    )
    _nonces.unused = unused
    return next(unused)


def _forget_nonces() -> None:
    # A forked child holds a copy of its parent's nonces (of the thread that
    # forked; no other thread lives on in the child): handing them out would
    # repeat the nonces the parent goes on to use.
    _nonces.unused = iter(())


os.register_at_fork(after_in_child=_forget_nonces)


class UsageMeter(Protocol):
    """Counts encryptions under one key version before each nonce is drawn."""

    def take(self) -> None:
        """Account for one encryption.

        Raises:
            KeyUnavailableError: the version may not encrypt any more.
        """
        ...


@dataclass(frozen=True)
class DataKey:
    """One unwrapped version of a tenant's data key.

    Its repr never shows the material. ``meter``, when set, is charged once
    per :func:`seal`; keys handed out by a keyring always carry one.
    """

    tenant: str
    key_id: str
    version: int
    material: bytes = field(repr=False)
    meter: UsageMeter | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_SIZE:
            raise ValueError(f"data keys are {KEY_SIZE} bytes")

    @functools.cached_property
    def mac_key(self) -> bytes:
        """The HMAC key for content hashes, derived so it never equals the AEAD key.

        Derived once per key object: every write of a tenant pays for it otherwise.
        """
        return hmac.new(self.material, _MAC_INFO, hashlib.sha256).digest()

    @functools.cached_property
    def aead(self) -> AESGCM:
        """The AES-GCM cipher of this key, built once per key object."""
        return AESGCM(self.material)

    @functools.cached_property
    def _mac_pads(self) -> tuple[Any, Any]:
        # HMAC's inner and outer hashes after absorbing the padded key
        # (RFC 2104); each content hash (HMAC-SHA256 of the plaintext under
        # mac_key) continues copies of them.
        padded = self.mac_key.ljust(_SHA256_BLOCK, b"\0")
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        return inner, outer

    @functools.cached_property
    def _sealer(self) -> Callable[[bytes, bytes], tuple[bytes, bytes, bytes]]:
        # What seal_parts does for every write, with everything it needs
        # bound once per key object: (plaintext, aad) -> (nonce, ciphertext,
        # content hash), charging the meter first. A write pays for no
        # attribute or method lookups beyond these calls.
        take = self.meter.take if self.meter is not None else None
        encrypt = self.aead.encrypt
        nonces = _nonces
        inner_pad, outer_pad = self._mac_pads

        def sealer(plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
            if take is not None:
                take()
            # A nonce is 12 bytes, never empty, so `or` only draws when
            # this thread has none left.
            nonce = next(nonces.unused, None) or _draw_nonces()
            inner = inner_pad.copy()
            inner.update(plaintext)
            outer = outer_pad.copy()
            outer.update(inner.digest())
            return nonce, encrypt(nonce, plaintext, aad), outer.digest()

        return sealer


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed payload as it travels in an event."""

    key_id: str
    key_version: int
    nonce: bytes
    ciphertext: bytes
    content_hash: bytes

    def __repr__(self) -> str:
        return (
            f"Sealed(key_id={self.key_id!r}, key_version={self.key_version}, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def associated_data(tenant: str, key: str, event_id: str) -> bytes:
    """The AEAD associated data binding a ciphertext to its record and event.

    ``strata/v1``, then each of tenant, key and event id as a 4-byte
    big-endian length and its UTF-8 bytes.
    """
    e = event_id.encode()
    return _record_binding(tenant, key) + _U32(len(e)) + e


@functools.lru_cache(maxsize=8192)
def _record_binding(tenant: str, key: str) -> bytes:
    # The part of the associated data that a record's writes share: a
    # writer's keys repeat, and this is a third of the binding's cost.
    t, k = tenant.encode(), key.encode()
    return b"".join((_AAD_LABEL, _U32(len(t)), t, _U32(len(k)), k))


_U32 = struct.Struct(">I").pack


def seal(
    data_key: DataKey, plaintext: bytes, *, tenant: str, key: str, event_id: str
) -> Sealed:
    """Encrypt a payload for one event of one record.

    Raises:
        KeyUnavailableError: the key version has used up its encryptions.
        ValueError: ``tenant`` is not the data key's tenant.
    """
    return Sealed(
        data_key.key_id,
        data_key.version,
        *seal_parts(
            data_key, plaintext, associated_data(tenant, key, event_id), tenant
        ),
    )


def seal_parts(
    data_key: DataKey, plaintext: bytes, aad: bytes, tenant: str
) -> tuple[bytes, bytes, bytes]:
    """:func:`seal` as (nonce, ciphertext, content hash), for a caller that
    builds its event from them directly and has ``aad`` from
    :func:`associated_data`.

    Raises:
        KeyUnavailableError, ValueError: as :func:`seal`.
    """
    if tenant != data_key.tenant:
        # A key of one tenant must never seal another's data: keys are the
        # unit of erasure, and shredding a tenant has to take all its data.
        raise ValueError("a data key seals only its own tenant's payloads")
    return data_key._sealer(plaintext, aad)


def open_sealed(
    data_key: DataKey,
    nonce: bytes,
    ciphertext: bytes,
    *,
    tenant: str,
    key: str,
    event_id: str,
) -> bytes:
    """Decrypt a payload, checking that it belongs to this tenant, key and event.

    Raises:
        DecryptionError: the ciphertext was altered, or belongs to another
            record, tenant or key version. The message names where, never what.
    """
    aad = associated_data(tenant, key, event_id)
    return _open(data_key, nonce, ciphertext, aad, tenant, key, event_id)


def reseal(
    old: DataKey,
    new: DataKey,
    nonce: bytes,
    ciphertext: bytes,
    *,
    tenant: str,
    key: str,
    event_id: str,
) -> Sealed:
    """Decrypt a payload under ``old`` and seal it under ``new`` for the same
    record and event; the plaintext never leaves this function.

    Raises:
        DecryptionError: as :func:`open_sealed`.
        KeyUnavailableError, ValueError: as :func:`seal`.
    """
    aad = associated_data(tenant, key, event_id)
    plaintext = _open(old, nonce, ciphertext, aad, tenant, key, event_id)
    return Sealed(new.key_id, new.version, *seal_parts(new, plaintext, aad, tenant))


def _open(
    data_key: DataKey,
    nonce: bytes,
    ciphertext: bytes,
    aad: bytes,
    tenant: str,
    key: str,
    event_id: str,
) -> bytes:
    if tenant == data_key.tenant:
        try:
            return data_key.aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            pass
    raise DecryptionError(
        f"ciphertext of event {event_id} does not authenticate for tenant "
        f"{tenant!r} key {key!r} under {data_key.key_id} v{data_key.version}"
    )
