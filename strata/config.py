"""Settings, read once from the environment and validated into a frozen object.

Every variable carries the ``STRATA_`` prefix. A value that does not validate
is a :class:`~strata.errors.ConfigError` naming the variable, so the command
line can exit 2 with one clear line.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import structlog
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from strata.errors import ConfigError

log = structlog.get_logger(__name__)

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
_BOOTSTRAP_RE = re.compile(r"^[^\s,:]+:\d{1,5}(,[^\s,:]+:\d{1,5})*$")
#: How pydantic-settings names the field whose environment value did not parse.
_SETTINGS_FIELD_RE = re.compile(r'field "(\w+)"')
_CLASS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TIER_RULE_FIELDS = frozenset(
    {"after_age_s", "after_idle_s", "promote_reads", "promote_window_s"}
)


class Settings(BaseSettings):
    """Strata's configuration.

    Attributes mirror the environment variables of the design: for example
    ``kafka_bootstrap`` is ``STRATA_KAFKA_BOOTSTRAP``.
    """

    model_config = SettingsConfigDict(env_prefix="STRATA_", frozen=True, extra="ignore")

    kafka_bootstrap: str | None = None
    data_dir: Path = Path(".strata")
    topic_prefix: str = "strata"
    partitions: int = Field(default=6, ge=1, le=1024)
    master_key_file: Path | None = None
    kms_url: str | None = None
    l1_max_entries: int = Field(default=10_000, ge=0)
    l1_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1)
    sqlite_synchronous: str = "FULL"
    l3_segment_max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    l3_compact_dead_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    l3_zstd_level: int = Field(default=3, ge=1, le=19)
    tier_policy: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    tier_promote_reads: int = Field(default=3, ge=1)
    tier_promote_window_s: float = Field(default=3600.0, gt=0.0)
    tier_max_moves: int = Field(default=10_000, ge=1)
    consumer_session_timeout_ms: int = Field(default=10_000, ge=1_000, le=300_000)
    kms_token: SecretStr | None = None
    kms_request_timeout_ms: int = Field(default=5_000, ge=1, le=600_000)
    kms_max_attempts: int = Field(default=5, ge=1, le=100)
    kms_retry_backoff_ms: int = Field(default=200, ge=0, le=600_000)
    kms_retry_backoff_max_ms: int = Field(default=5_000, ge=0, le=600_000)
    key_cache_ttl_ms: int = Field(default=300_000, ge=0)
    key_rotate_after_encryptions: int = Field(default=2**30, ge=1, le=2**31)
    ledger_checkpoint_entries: int = Field(default=1000, ge=1, le=10_000_000)
    ledger_checkpoint_interval_ms: int = Field(default=60_000, ge=1, le=86_400_000)

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.fullmatch(value):
            raise ValueError("letters, digits, '.', '_' and '-' only, at most 101")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is not None and not _BOOTSTRAP_RE.fullmatch(value):
            raise ValueError("expected host:port[,host:port...]")
        for address in (value or "").split(","):
            if address and not 1 <= int(address.rpartition(":")[2]) <= 65535:
                raise ValueError(f"port of {address} is not between 1 and 65535")
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _refuse_empty_data_dir(cls, value: object) -> object:
        # An empty variable would become the working directory, silently.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError("exists and is not a directory")
        return value

    @field_validator("sqlite_synchronous")
    @classmethod
    def _check_sync(cls, value: str) -> str:
        if value.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError("one of OFF, NORMAL, FULL, EXTRA")
        return value.upper()

    @field_validator("tier_policy")
    @classmethod
    def _check_tier_policy(
        cls, value: dict[str, dict[str, float | None]]
    ) -> dict[str, dict[str, float | None]]:
        for name, rule in value.items():
            if name != "default" and not _CLASS_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a class name or 'default'")
            unknown = set(rule) - _TIER_RULE_FIELDS
            if unknown:
                raise ValueError(
                    f"{name}: unknown field {sorted(unknown)[0]!r}; "
                    f"use {', '.join(sorted(_TIER_RULE_FIELDS))}"
                )
            if any(v is not None and v < 0 for v in rule.values()):
                raise ValueError(f"{name}: values must be >= 0 or null")
        return value

    @property
    def memory_topic(self) -> str:
        """The event log topic."""
        return f"{self.topic_prefix}.memory"

    @property
    def dlq_topic(self) -> str:
        """The dead-letter topic."""
        return f"{self.topic_prefix}.memory.dlq"

    @property
    def jobs_topic(self) -> str:
        """The job lifecycle topic."""
        return f"{self.topic_prefix}.jobs"

    @property
    def master_key_path(self) -> Path:
        """Where the local keystore's master key lives."""
        return self.master_key_file or self.data_dir / "keys" / "master.key"


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise :class:`ConfigError` when one is bad.

    Args:
        overrides: values that take precedence over the environment.
    """
    _warn_unknown_variables()
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as exc:
        # A complex value (a JSON policy) that does not parse.
        cause = exc.__cause__ or exc
        named = _SETTINGS_FIELD_RE.search(str(exc))
        if named is None:
            raise ConfigError(f"{exc}: {cause}") from None
        raise ConfigError(
            f"STRATA_{named.group(1).upper()}: not valid JSON ({cause})"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"STRATA_{field.upper()}: {message} (got {first.get('input')!r})"
        ) from None


#: ``STRATA_`` variables read outside :class:`Settings`.
OTHER_VARIABLES = frozenset({"STRATA_KAFKA_JARS_DIR"})
_warned: set[str] = set()


def _warn_unknown_variables() -> None:
    """Say, once per process, which ``STRATA_`` variables nothing reads.

    A misspelt variable would otherwise be ignored without a word, and the
    setting it meant to change would keep its default.
    """
    known = {f"STRATA_{name.upper()}" for name in Settings.model_fields}
    known |= OTHER_VARIABLES
    for name in sorted(os.environ):
        if not name.startswith("STRATA_") or name in known or name in _warned:
            continue
        _warned.add(name)
        close = difflib.get_close_matches(name, sorted(known), n=1)
        log.warning(
            "settings.unknown_variable",
            variable=name,
            did_you_mean=close[0] if close else None,
            consequence="ignored: no setting has this name",
        )
