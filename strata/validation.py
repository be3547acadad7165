"""Checks on names users pass in: tenants, keys, classes, agents."""

from __future__ import annotations

import re

from strata.errors import UsageError

_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CLASS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_KEY_CHARS = 1024
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


_UNDECODED_RE = re.compile(r"[\ud800-\udfff]")


def check_text(what: str, value: str) -> str:
    """Refuse text holding bytes that were not UTF-8 (a command line or file
    name decoded with ``surrogateescape``): they can be neither encoded for an
    event nor stored.
    """
    if _UNDECODED_RE.search(value):
        raise UsageError(
            f"{what} {value!r}: not valid UTF-8 (bytes the command line could "
            "not decode)"
        )
    return value


def is_tenant(name: str) -> bool:
    """Whether ``name`` is a valid tenant name (see :func:`check_tenant`)."""
    return _TENANT_RE.fullmatch(name) is not None


def check_tenant(tenant: str) -> str:
    """A tenant is 1-128 letters, digits, '.', '_' or '-', starting alphanumeric.

    '/' is excluded because the message key is ``tenant/key``.
    """
    if not is_tenant(tenant):
        raise UsageError(
            f"tenant {tenant!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


def check_key(key: str) -> str:
    """A key is 1-1024 characters of any text but control characters."""
    if not key or len(key) > MAX_KEY_CHARS:
        raise UsageError(f"key: must be 1-{MAX_KEY_CHARS} characters, got {len(key)}")
    if _CONTROL_RE.search(key):
        raise UsageError(f"key {key!r}: control characters are not allowed")
    return check_text("key", key)


def check_class(cls: str) -> str:
    """A class is a short lower-case word such as ``chat`` or ``pii``."""
    if not _CLASS_RE.fullmatch(cls):
        raise UsageError(
            f"class {cls!r}: use 1-32 lower-case letters, digits, '_' or '-'"
        )
    return cls


def check_agent(agent: str) -> str:
    """An agent name is 1-256 characters without control characters."""
    if not agent.strip() or len(agent) > 256 or any(ord(ch) < 0x20 for ch in agent):
        raise UsageError(
            f"agent {agent!r}: use 1-256 printable characters, not only spaces"
        )
    return check_text("agent", agent)
