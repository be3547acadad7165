"""Every error Strata raises on purpose derives from :class:`StrataError`.

The tree::

    StrataError
    ├── ConfigError            bad setting or environment variable (exit 2)
    ├── UsageError             bad command-line input (exit 2)
    ├── BrokerError            the broker cannot be reached or started (exit 2)
    ├── CodecError             bytes that are not a valid Strata event
    │   ├── UnknownSchemaError     writer fingerprint not in the registry
    │   └── MalformedEventError    truncated bytes, wrong marker or type
    ├── KeyUnavailableError              key missing, destroyed, or unusable
    │   ├── KmsUnavailableError    the KMS gave no answer in time (retriable)
    │   └── DecryptionError        ciphertext rejected by its key (tampered, moved)
    ├── ApplyError             an event a projection refuses (goes to the DLQ)
    ├── StoreError             a store cannot be written now (retriable)
    ├── NotProjectedError      a token was not projected in time (retriable)
    ├── NotFoundError          no such tenant or key
    ├── ErasedError            the tenant was erased
    ├── CheckFailedError            a verification found a problem (exit 1)
    └── OutputError            standard output cannot be written (exit 1)

``retriable`` tells a caller whether trying the same thing again may work;
the worker reads it to decide between backing off and dead-lettering.
"""

from __future__ import annotations


class StrataError(Exception):
    """Root of every error Strata raises on purpose."""

    retriable: bool = False
    exit_code: int = 2


class ConfigError(StrataError):
    """A setting or environment variable holds a value Strata cannot use."""


class UsageError(StrataError):
    """A command was given input it cannot act on."""


class BrokerError(StrataError):
    """The Kafka broker cannot be reached, started or stopped."""

    retriable = True


class CodecError(StrataError):
    """Bytes that do not decode as a Strata event."""


class UnknownSchemaError(CodecError):
    """The writer schema's fingerprint is not in the schema registry."""


class MalformedEventError(CodecError):
    """Truncated bytes, a wrong marker, or a field of the wrong type."""


class KeyUnavailableError(StrataError):
    """A data key is missing, destroyed, or cannot be used."""


class KmsUnavailableError(KeyUnavailableError):
    """The KMS did not answer within its attempts; trying later may work."""

    retriable = True


class DecryptionError(KeyUnavailableError):
    """A ciphertext failed authentication under the key it names."""


class ApplyError(StrataError):
    """An event that decodes but that a projection cannot apply."""


class StoreError(StrataError):
    """A store cannot be written right now (disk full, read-only, locked)."""

    retriable = True


class NotProjectedError(StrataError):
    """A write's token was not projected in the time allowed."""

    exit_code = 1
    retriable = True


class NotFoundError(StrataError):
    """No record for this tenant and key."""

    exit_code = 1


class ErasedError(StrataError):
    """The tenant was erased: its keys are destroyed and records purged."""

    exit_code = 1


class CheckFailedError(StrataError):
    """A verification ran and found a problem."""

    exit_code = 1


class OutputError(StrataError):
    """Standard output cannot be written: a closed pipe, a full disk."""

    exit_code = 1
