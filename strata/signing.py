"""The ledger signing key and the tree heads it signs.

The key is Ed25519 (RFC 8032). Its private half is stored wrapped by the
master key, in its own file beside the keystore::

    <data dir>/keys/ledger-signing.json    mode 0600
        format, key_id, public_key (base64, raw 32 bytes),
        wrapped_private_key (base64: 12-byte nonce || AES-256-GCM ciphertext),
        created_ms

The key id is the SHA-256 of the raw public key, as RFC 6962 section 3.2
names a log by the hash of its key. The public key is stored in clear so
verifiers need nothing secret; the private key is unwrapped only in the
process that signs, and never logged or printed.

A signed tree head (:class:`TreeHead`) commits to one partition's ledger at
one size: its Merkle root, when it was signed, and the hash of the tree head
before it. The signed bytes are a fixed binary layout with a domain label,
so a signature over anything else can never pass for one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import string
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strata.errors import ConfigError, KeyUnavailableError, StoreError
from strata.keystore import load_or_create_master_key

log = structlog.get_logger(__name__)

SIGNING_KEY_FILE = "ledger-signing.json"
_FORMAT = "strata-ledger-signing-key/v1"
_NONCE = 12
_TREE_HEAD_LABEL = b"strata-ledger-tree-head/v1\x00"
_TREE_HEAD_LAYOUT = ">IQQ"
#: Bits of the partition, and of a size or time, in the bytes a tree head's
#: signature covers.
PARTITION_BITS = 32
COUNT_BITS = 64
_SIGNATURE_SIZE = 64


def _wrap_aad(key_id: str) -> bytes:
    return f"strata/ledger-signing/v1/{key_id}".encode()


def key_id_of(public_raw: bytes) -> str:
    """The key id of a raw Ed25519 public key: its SHA-256, in hex."""
    return hashlib.sha256(public_raw).hexdigest()


class LedgerPublicKey:
    """The public half of the ledger signing key: all a verifier needs."""

    __slots__ = ("_key", "key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        """Wrap a raw 32-byte Ed25519 public key.

        Raises:
            ValueError: ``raw`` is not an Ed25519 public key.
        """
        self._key = Ed25519PublicKey.from_public_bytes(raw)
        self.raw = raw
        self.key_id = key_id_of(raw)

    def __repr__(self) -> str:
        return f"LedgerPublicKey(key_id={self.key_id[:16]}...)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LedgerPublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> str:
        """The key as PEM (SubjectPublicKeyInfo), the form other tools read."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @classmethod
    def from_pem(cls, data: bytes) -> LedgerPublicKey:
        """Read a PEM public key, as :meth:`pem` writes it.

        Raises:
            ValueError: the data is not a PEM Ed25519 public key.
        """
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return cls(key.public_bytes_raw())


class LedgerSigner:
    """The unwrapped ledger signing key. Its repr shows the key id only."""

    __slots__ = ("_private", "public_key")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = LedgerPublicKey(private.public_key().public_bytes_raw())

    def __repr__(self) -> str:
        return f"LedgerSigner(key_id={self.key_id[:16]}...)"

    @property
    def key_id(self) -> str:
        """The id of the key pair (SHA-256 of the public key)."""
        return self.public_key.key_id

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of ``message``."""
        return self._private.sign(message)


def signing_key_path(keys_dir: Path) -> Path:
    """Where the ledger signing key of a keys folder lives."""
    return keys_dir / SIGNING_KEY_FILE


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise KeyUnavailableError(
            f"no ledger signing key at {path} (a worker creates it for a ledger "
            "that has signed nothing yet; where checkpoints were signed, the "
            "file was lost and must be restored)"
        ) from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"ledger signing key {path}: cannot be read: {exc}") from exc
    if doc.get("format") != _FORMAT:
        raise ConfigError(
            f"ledger signing key {path}: unknown format {doc.get('format')!r}"
        )
    return doc


def load_public_key(keys_dir: Path) -> LedgerPublicKey:
    """The ledger's public key, read without the master key.

    Raises:
        KeyUnavailableError: there is no signing key yet.
        StoreError: the key file cannot be read.
        ConfigError: the key file is not a ledger signing key.
    """
    path = signing_key_path(keys_dir)
    doc = _read_doc(path)
    try:
        key = LedgerPublicKey(base64.b64decode(doc["public_key"], validate=True))
    except (KeyError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"ledger signing key {path}: bad public key") from exc
    if key.key_id != doc.get("key_id"):
        raise ConfigError(f"ledger signing key {path}: key id does not match the key")
    return key


def load_or_create_signer(keys_dir: Path, master_key_path: Path) -> LedgerSigner:
    """Unwrap the ledger signing key, creating it on first use.

    Two processes creating it at once end up with the same key: the file is
    published by a hard link, which fails if another process got there first.

    Raises:
        ConfigError: the master key cannot be used, or the file is not a key.
        KeyUnavailableError: the key does not unwrap under the master key.
        StoreError: the key file cannot be read or written.
    """
    path = signing_key_path(keys_dir)
    master = load_or_create_master_key(master_key_path, create=not path.exists())
    if not path.exists():
        _create(path, master)
    doc = _read_doc(path)
    try:
        blob = base64.b64decode(doc["wrapped_private_key"], validate=True)
        key_id = str(doc["key_id"])
    except (KeyError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"ledger signing key {path}: malformed") from exc
    try:
        raw = AESGCM(master).decrypt(blob[:_NONCE], blob[_NONCE:], _wrap_aad(key_id))
    except InvalidTag:
        raise KeyUnavailableError(
            f"ledger signing key {path} does not unwrap under the master key "
            f"in {master_key_path}"
        ) from None
    signer = LedgerSigner(Ed25519PrivateKey.from_private_bytes(raw))
    if signer.key_id != key_id:
        raise ConfigError(f"ledger signing key {path}: key id does not match the key")
    return signer


def _create(path: Path, master: bytes) -> None:
    private = Ed25519PrivateKey.generate()
    public_raw = private.public_key().public_bytes_raw()
    key_id = key_id_of(public_raw)
    nonce = os.urandom(_NONCE)
    wrapped = nonce + AESGCM(master).encrypt(
        nonce, private.private_bytes_raw(), _wrap_aad(key_id)
    )
    doc = {
        "format": _FORMAT,
        "key_id": key_id,
        "public_key": base64.b64encode(public_raw).decode(),
        "wrapped_private_key": base64.b64encode(wrapped).decode(),
        "created_ms": time.time_ns() // 1_000_000,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ledger-signing.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(doc, indent=1).encode())
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(
            f"ledger signing key {path}: cannot be written: {exc}"
        ) from exc
    log.info("signing.key_created", key_id=key_id, path=str(path))


# -- signed tree heads ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A signed commitment to one partition's ledger at one size.

    ``prev`` is the hash of the tree head signed before it (32 zero bytes for
    the first), so removing or reordering tree heads breaks their chain.
    """

    partition: int
    size: int
    root: bytes
    time_ms: int
    prev: bytes
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        """The exact bytes the signature covers."""
        return signed_message(
            self.partition, self.size, self.root, self.time_ms, self.prev
        )

    def verify(self, key: LedgerPublicKey) -> bool:
        """Whether the signature is ``key``'s over this head."""
        return self.key_id == key.key_id and key.verify(self.message(), self.signature)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as stored and as carried in proofs."""
        return {
            "partition": self.partition,
            "size": self.size,
            "root": self.root.hex(),
            "time_ms": self.time_ms,
            "prev": self.prev.hex(),
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }

    def line(self) -> bytes:
        """One line of a tree-head file, without the newline."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, doc: Any) -> TreeHead:
        """Read the JSON form.

        Every field is checked against the binary layout the signature
        covers, so a head read here can always be signed or verified.

        Raises:
            TreeHeadError: a field is missing or of the wrong type, length or range.
        """
        if not isinstance(doc, dict):
            raise TreeHeadError(None, f"expected an object, got {json_preview(doc)}")
        return cls(
            partition=_count(doc, "partition", PARTITION_BITS),
            size=_count(doc, "size", COUNT_BITS),
            root=_hash(doc, "root"),
            time_ms=_count(doc, "time_ms", COUNT_BITS),
            prev=_hash(doc, "prev"),
            key_id=_text(doc, "key_id"),
            signature=_signature(doc, "signature"),
        )


class TreeHeadError(ValueError):
    """A tree head's JSON form with a field missing or of the wrong type.

    ``field`` names the field (None when the form is not an object at all);
    ``problem`` says what is wrong with it.
    """

    def __init__(self, field: str | None, problem: str) -> None:
        where = "" if field is None else f"field {field}: "
        super().__init__(f"not a tree head: {where}{problem}")
        self.field = field
        self.problem = problem


def json_preview(value: Any) -> str:
    """A short JSON rendering of a value, for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _field(doc: dict[str, Any], name: str) -> Any:
    if name not in doc:
        raise TreeHeadError(name, "missing")
    return doc[name]


def _count(doc: dict[str, Any], name: str, bits: int) -> int:
    value = _field(doc, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TreeHeadError(
            name, f"expected a non-negative integer, got {json_preview(value)}"
        )
    if value >= 1 << bits:
        raise TreeHeadError(
            name, f"expected an integer below 2**{bits}, got {json_preview(value)}"
        )
    return value


def _hash(doc: dict[str, Any], name: str) -> bytes:
    value = _field(doc, name)
    if not is_hex_hash(value):
        raise TreeHeadError(
            name, f"expected 64 hex digits (a SHA-256 hash), got {json_preview(value)}"
        )
    return bytes.fromhex(value)


def is_hex_hash(value: Any) -> bool:
    """Whether ``value`` is a SHA-256 hash written as 64 hex digits, nothing else."""
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in string.hexdigits for c in value)
    )


def _text(doc: dict[str, Any], name: str) -> str:
    value = _field(doc, name)
    if not isinstance(value, str):
        raise TreeHeadError(name, f"expected a string, got {json_preview(value)}")
    return value


def _signature(doc: dict[str, Any], name: str) -> bytes:
    value = _field(doc, name)
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != _SIGNATURE_SIZE:
        raise TreeHeadError(
            name,
            f"expected base64 of {_SIGNATURE_SIZE} bytes, got {json_preview(value)}",
        )
    return raw


def signed_message(
    partition: int, size: int, root: bytes, time_ms: int, prev: bytes
) -> bytes:
    """The bytes a tree head's signature covers: label, then fixed-width fields."""
    return (
        _TREE_HEAD_LABEL
        + struct.pack(_TREE_HEAD_LAYOUT, partition, size, time_ms)
        + root
        + prev
    )


def sign_tree_head(
    signer: LedgerSigner,
    partition: int,
    size: int,
    root: bytes,
    prev: bytes,
    time_ms: int | None = None,
) -> TreeHead:
    """Sign the head of one partition's tree at ``size``."""
    when = time.time_ns() // 1_000_000 if time_ms is None else time_ms
    signature = signer.sign(signed_message(partition, size, root, when, prev))
    return TreeHead(partition, size, root, when, prev, signer.key_id, signature)
