"""Checks an event must pass before any projection applies it.

An event that decodes but fails here goes to the dead-letter topic with the
reason, naming the field. The same checks run when `strata dlq replay` decides
whether a dead letter now applies.
"""

from __future__ import annotations

from schemas.codec import Codec
from schemas.events import Event, TenantErased
from strata.config import Settings
from strata.errors import ApplyError, CodecError, ConfigError
from strata.kafka import key_partition
from strata.keystore import Keyring

#: AES-GCM appends a 16-byte tag to the plaintext.
GCM_TAG_BYTES = 16


def validate_event(
    event: Event,
    message_key: bytes | None,
    settings: Settings,
    keystore: Keyring,
    known_keys: dict[tuple[str, str, int], bool] | None = None,
    where: tuple[int, int] | None = None,
) -> None:
    """Refuse an event that decodes but cannot be applied.

    Args:
        known_keys: a cache of key-version checks, shared across one batch so
            the keystore is consulted once per (tenant, key id, version).
        where: (partition, partition count) the message was read from, to
            check it sits in its key's partition.

    Raises:
        ApplyError: naming the field that is wrong.
        ConfigError: the keystore holds no tenant at all, so the event's key
            is missing because the data dir is the wrong one.
    """
    if not event.tenant:
        raise ApplyError("field tenant is empty")
    # The message key decides the partition, and the partition decides the
    # order of a key's events: a copy outside its key's partition would race
    # the original, and a live store and its rebuild could disagree.
    if message_key != event.message_key:
        own_key = event.message_key.decode(errors="backslashreplace")
        if message_key is None:
            raise ApplyError(
                f"message has no key; the event's tenant/key is '{own_key}'"
            )
        shown = message_key[:200].decode(errors="backslashreplace")
        raise ApplyError(
            f"message key '{shown}' does not match the event's tenant/key '{own_key}'"
        )
    if isinstance(event, TenantErased):
        return
    if not event.key:
        raise ApplyError("field key is empty")
    if where is not None:
        partition, partitions = where
        expected = key_partition(message_key, partitions)
        if partition != expected:
            raise ApplyError(
                f"partition {partition}: the key's events belong to partition {expected}"
            )
    ciphertext = getattr(event, "ciphertext", None)
    if ciphertext is None:
        return
    limit = settings.max_payload_bytes + GCM_TAG_BYTES
    if len(ciphertext) > limit:
        raise ApplyError(
            f"field ciphertext is {len(ciphertext)} bytes; the limit is {limit}"
        )
    key_id: str = getattr(event, "key_id")  # noqa: B009 - present with ciphertext
    version: int = getattr(event, "key_version")  # noqa: B009
    ident = (event.tenant, key_id, version)
    usable = known_keys.get(ident) if known_keys is not None else None
    if usable is None:
        usable = keystore.is_erased(event.tenant) or keystore.has_version(*ident)
        if known_keys is not None:
            known_keys[ident] = usable
    if not usable:
        if not keystore.tenants():
            # No key of any tenant: not a bad event but the wrong data dir (or
            # a lost keystore). Dead-lettering would throw away every event.
            raise ConfigError(
                f"data dir {settings.data_dir} has no tenant keys, yet an event "
                f"of tenant {event.tenant!r} is sealed under {key_id} v{version}: "
                "this is not the data dir the writers use (check STRATA_DATA_DIR), "
                "or its keystore was lost; this event was neither applied nor "
                "dead-lettered"
            )
        raise ApplyError(
            f"fields key_id/key_version: tenant {event.tenant!r} has no key {key_id} v{version}"
        )


def decode_and_validate(
    codec: Codec,
    value: bytes | None,
    message_key: bytes | None,
    settings: Settings,
    keystore: Keyring,
    known_keys: dict[tuple[str, str, int], bool] | None = None,
    where: tuple[int, int] | None = None,
) -> Event:
    """Decode a message value and validate the event.

    Raises:
        CodecError: the bytes are not a valid event.
        ApplyError: the event cannot be applied.
        ConfigError: as :func:`validate_event`.
    """
    if value is None:
        raise CodecError("message has no value (a tombstone)")
    event = codec.decode(value)
    validate_event(event, message_key, settings, keystore, known_keys, where)
    return event
