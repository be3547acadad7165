"""Backfill: import a legacy export of memories as a resumable job.

The export
    ``PATH/records/<key>__<class>.json`` holds one record each. Sub-folders
    of ``records/`` become ``/`` in the key, and percent-escapes in names
    are decoded (``agent-7%2Flikes__chat.json`` is key ``agent-7/likes``).
    Every ``*.jsonl`` file under ``PATH`` holds one record per line, with
    the key in field ``key``. A record is a JSON object with ``payload`` (a
    string, or a JSON object), ``meta`` (an object) and ``cls`` (which must
    agree with the file name's class).

How a record becomes a MemoryWritten event
    - tenant: ``meta.tenant_id``; else the job's default tenant
      (``--tenant``); else the record fails as ``missing_field``.
    - time: ``meta.created_at``, ISO 8601 (no zone means UTC) or a Unix
      time in seconds (a number of 10^11 or more is taken as milliseconds);
      without it, the time of the import.
    - payload: a string as UTF-8; a JSON object as compact JSON with sorted
      keys. It is encrypted like any write.
    - metadata (clear text, as the design says of metadata): every ``meta``
      entry but ``tenant_id``; strings as they are, other values as compact
      JSON (``true``, ``0.5``, ``["a","b"]``).
    - tags ``["backfill"]`` and ``source_ref`` ``SOURCE:PATH[:LINE]``.
    - event id: 32 hex digits of SHA-256 over the source name, tenant, key,
      class, payload and metadata. The same record always gets the same id,
      so a rerun recognises what it already published, and the same record
      listed twice in an export is published once.

The job
    1. A new job records the memory topic's end offsets as its start; a job
       found unfinished in ``<data dir>/jobs`` resumes with its recorded start.
    2. An embedded worker projects what is not yet projected (whatever a
       killed run published lands in L2 before anything is decided).
    3. Each record is looked up in L2 by its event id: found at an offset
       before the job's start, it was there already (skipped); found at or
       after it, this job published it earlier (migrated, to be verified);
       not found, it is published now.
    4. While step 3 publishes, a ``strata worker`` process (group
       ``<prefix>.backfill``, output in ``jobs/backfill-<job>.worker.log``)
       projects the new events on another core; it stops once L2 holds them
       all, and never outlives the job (on Linux the kernel stops it if the
       job is killed). If it cannot start or fails, the embedded worker
       projects instead. Then every migrated record is read back, decrypted
       and compared with its source.

    Counts therefore come from durable state alone: a job killed anywhere
    and rerun ends with the counts of a run that was never interrupted. Once
    a job completes, the next run is a new job, which finds everything
    already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import structlog
from aiokafka.errors import KafkaError

from consumers.replay import JobJournal
from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.l2 import HistoryRow, L2Reader, StoredRecord
from projections.reader import Reader, WriteToken
from strata.children import start_worker, stop_child
from strata.config import Settings
from strata.errors import BrokerError, StoreError, StrataError, UsageError
from strata.kafka import (
    BrokerWatch,
    broker_failure,
    end_offsets,
    ensure_topics,
    pinned,
)
from strata.keystore import LocalKeystore
from strata.locks import exclusive
from strata.paths import StorePaths
from strata.validation import check_agent, check_class, check_key, check_tenant

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Why a record was not imported; ``mismatch`` is a record that was imported
#: but does not read back as its source.
FAILURE_KINDS = (
    "unreadable",
    "permission_denied",
    "invalid_json",
    "missing_field",
    "invalid_field",
    "too_large",
    "rejected",
)
#: Metadata is clear text on every event; a cap keeps events within the
#: broker's message limit (payload limit plus 64 KiB).
METADATA_LIMIT_BYTES = 32 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST_MS = (
    datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH
) // timedelta(milliseconds=1)
_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")
#: Digits beyond which a number is no time a memory can hold (ms up to 9999).
_MAX_DIGITS = 18
_RANGE_TEXT = "1970-01-01 to 9999-12-31, the times a memory can hold"
# Publishing waits for acknowledgements in groups of this many, bounding memory.
_IN_FLIGHT = 1000
#: Records looked up in L2 together, and between progress updates.
_CHUNK = 500
#: How often the wait for the helper worker looks at L2's checkpoints.
_HELPER_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a record came from: a path under the export, and a line for JSONL."""

    path: str
    line: int | None = None

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Failure:
    """A record that could not be imported, and why."""

    where: SourceRef
    kind: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "path": self.where.path,
            "line": self.where.line,
            "kind": self.kind,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class LegacyRecord:
    """One valid record of the export, ready to be sealed."""

    where: SourceRef
    tenant: str
    key: str
    cls: str
    payload: bytes = field(repr=False)
    metadata: dict[str, str]
    time_ms: int | None
    event_id: str


def derive_event_id(
    source: str,
    tenant: str,
    key: str,
    cls: str,
    payload: bytes,
    metadata: dict[str, str],
) -> str:
    """The deterministic event id of an imported record."""
    digest = hashlib.sha256(b"strata/backfill/v1")
    meta = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    for part in (
        source.encode(),
        tenant.encode(),
        key.encode(),
        cls.encode(),
        payload,
        meta,
    ):
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:32]


def parse_time_ms(value: object) -> int | None:
    """``meta.created_at`` as UTC milliseconds; None when absent.

    Raises:
        ValueError: not ISO 8601 text nor a Unix time.
    """
    if value is None:
        return None
    given = value
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        text = value.strip()
        if len(text) > _MAX_DIGITS:
            raise ValueError(f"{_clip(text)} is outside {_RANGE_TEXT}")
        value = float(text) if "." in text else int(text)
    if isinstance(value, bool):
        raise ValueError("expected ISO 8601 text or a Unix time, got a boolean")
    if isinstance(value, int) and abs(value) > 10**_MAX_DIGITS:
        # Larger than any float: checked before anything converts it.
        raise ValueError(f"{_clip(given)} is outside {_RANGE_TEXT}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a time")
        # 10^11 seconds is the year 5138: larger numbers are milliseconds.
        return _in_range(round(value if abs(value) >= 1e11 else value * 1000), value)
    if isinstance(value, str):
        text = value.strip()
        try:
            moment = datetime.fromisoformat(
                text[:-1] + "+00:00" if text.endswith("Z") else text
            )
        except ValueError:
            raise ValueError(f"{value[:64]!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return _in_range((moment - _EPOCH) // timedelta(milliseconds=1), value[:64])
    raise ValueError(f"expected ISO 8601 text or a Unix time, got {_json_type(value)}")


def _in_range(time_ms: int, given: object) -> int:
    if not 0 <= time_ms <= _LATEST_MS:
        raise ValueError(f"{_clip(given)} is outside {_RANGE_TEXT}")
    return time_ms


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _os_failure(where: SourceRef, exc: OSError) -> Failure:
    if isinstance(exc, PermissionError):
        return Failure(where, "permission_denied", "permission denied")
    return Failure(where, "unreadable", exc.strerror or str(exc))


class ExportReader:
    """Reads a legacy export into records and failures, in a stable order.

    Files are visited in sorted order, folder by folder, JSONL lines in
    order; nothing is opened that is not a regular file, so a FIFO in the
    export cannot block the job.

    Args:
        root: the export folder.
        source: the legacy system's name, part of every event id.
        tenant: the tenant of records without ``meta.tenant_id``.
        max_payload_bytes: the payload limit (``STRATA_MAX_PAYLOAD_BYTES``).
    """

    def __init__(
        self, root: Path, *, source: str, tenant: str | None, max_payload_bytes: int
    ) -> None:
        self.root = root
        self._real_root = root.resolve()
        self.records_dir = root / "records"
        self.source = source
        self.tenant = tenant
        self.max_payload_bytes = max_payload_bytes
        # JSON escapes can grow a payload up to six-fold (\\uXXXX); meta adds some.
        self.record_limit = 8 * max_payload_bytes + 64 * 1024

    def files(self) -> Iterator[tuple[Path, str]]:
        """Every candidate as (path, kind): kind is ``json``, ``jsonl``, ``dir``,
        ``linked_dir`` or ``unwalkable``."""
        errors: list[OSError] = []
        for folder, dirnames, filenames in os.walk(self.root, onerror=errors.append):
            here = Path(folder)
            in_records = here == self.records_dir or self.records_dir in here.parents
            dirnames.sort()
            for name in list(dirnames):
                if (here / name).is_symlink():
                    # Not followed (it may lead out of the export, or round in
                    # a loop), and not skipped without a word either.
                    yield here / name, "linked_dir"
                elif in_records and name.endswith(".json"):
                    dirnames.remove(name)
                    yield here / name, "dir"
            for name in sorted(filenames):
                if name.endswith(".jsonl"):
                    yield here / name, "jsonl"
                elif in_records and name.endswith(".json"):
                    yield here / name, "json"
        for exc in errors:
            if exc.filename:
                yield Path(exc.filename), "unwalkable"

    def count(self) -> int:
        """Roughly how many records there are (JSONL lines counted as newlines)."""
        total = 0
        for path, kind in self.files():
            total += self._count_lines(path) if kind == "jsonl" else 1
        return total

    def __iter__(self) -> Iterator[LegacyRecord | Failure]:
        for path, kind in self.files():
            where = SourceRef(self._relative(path))
            if kind == "dir":
                yield Failure(where, "unreadable", "not a regular file (a directory)")
            elif kind == "unwalkable":
                yield Failure(where, "unreadable", "the folder cannot be listed")
            elif kind == "linked_dir":
                yield Failure(
                    where, "unreadable", "a link to a folder (links are not followed)"
                )
            elif kind == "json":
                yield self._read_file(path, where)
            else:
                yield from self._read_lines(path, where)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    @staticmethod
    def _count_lines(path: Path) -> int:
        try:
            with path.open("rb") as fh:
                return max(
                    1,
                    sum(
                        chunk.count(b"\n")
                        for chunk in iter(lambda: fh.read(1 << 20), b"")
                    ),
                )
        except OSError:
            return 1

    def _open_regular(self, path: Path, where: SourceRef) -> Failure | None:
        try:
            st = path.stat()
            inside = path.resolve().is_relative_to(self._real_root)
        except OSError as exc:
            return _os_failure(where, exc)
        if not inside:
            # An export is a folder of records: a link out of it would import
            # whatever file it names (a key, a password file) as a memory.
            return Failure(where, "unreadable", "a link to a file outside the export")
        if not stat.S_ISREG(st.st_mode):
            return Failure(
                where, "unreadable", f"not a regular file ({_file_type(st.st_mode)})"
            )
        if st.st_size > self.record_limit and path.suffix == ".json":
            return Failure(
                where,
                "too_large",
                f"file is {st.st_size} bytes; a record file may hold at most "
                f"{self.record_limit} (8 x STRATA_MAX_PAYLOAD_BYTES + 64 KiB)",
            )
        return None

    def _read_file(self, path: Path, where: SourceRef) -> LegacyRecord | Failure:
        failure = self._open_regular(path, where)
        if failure is not None:
            return failure
        rel = path.relative_to(self.records_dir).as_posix()
        key_part, sep, cls = rel[: -len(".json")].rpartition("__")
        if not sep or not key_part or key_part.endswith("/") or not cls:
            return Failure(
                where,
                "invalid_field",
                "file name: expected records/<key>__<class>.json",
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            return _os_failure(where, exc)
        return self._parse(data, where, unquote(key_part), cls)

    def _read_lines(
        self, path: Path, where: SourceRef
    ) -> Iterator[LegacyRecord | Failure]:
        failure = self._open_regular(path, where)
        if failure is not None:
            yield failure
            return
        try:
            fh = path.open("rb")
        except OSError as exc:
            yield _os_failure(where, exc)
            return
        with fh:
            number = 0
            while True:
                try:
                    raw = fh.readline(self.record_limit + 2)
                except OSError as exc:
                    yield _os_failure(SourceRef(where.path, number + 1), exc)
                    return
                if not raw:
                    return
                number += 1
                line = SourceRef(where.path, number)
                if len(raw.rstrip(b"\r\n")) > self.record_limit:
                    while raw and not raw.endswith(b"\n"):
                        raw = fh.readline(1 << 20)
                    yield Failure(
                        line,
                        "too_large",
                        f"line is longer than {self.record_limit} bytes "
                        "(8 x STRATA_MAX_PAYLOAD_BYTES + 64 KiB)",
                    )
                elif raw.strip():
                    yield self._parse(raw, line, None, None)

    def _parse(
        self, data: bytes, where: SourceRef, key: str | None, cls: str | None
    ) -> LegacyRecord | Failure:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return Failure(
                where,
                "unreadable",
                f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            )
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            # Some of the parser's messages end in " at", meant to be followed
            # by the position its own str() appends.
            reason = exc.msg.removesuffix(" at")
            if where.line is None:
                at = f"line {exc.lineno} column {exc.colno}"
            elif exc.lineno == 1:
                at = f"column {exc.colno}"  # the line is named by where
            else:
                at = "end of line"  # past the record's text, at its newline
            return Failure(where, "invalid_json", f"{at}: {reason}")
        except RecursionError:
            return Failure(where, "invalid_json", "nested too deeply")
        return self._record(obj, where, key, cls)

    def _record(
        self, obj: object, where: SourceRef, name_key: str | None, name_cls: str | None
    ) -> LegacyRecord | Failure:
        if not isinstance(obj, dict):
            return Failure(
                where, "invalid_field", f"expected a JSON object, got {_json_type(obj)}"
            )
        required = ["payload", "meta", "cls"] + (["key"] if name_key is None else [])
        missing = [name for name in required if name not in obj]
        if missing:
            return Failure(
                where, "missing_field", f"missing field {', '.join(missing)}"
            )
        payload, meta, cls = obj["payload"], obj["meta"], obj["cls"]
        key = obj["key"] if name_key is None else name_key
        if isinstance(payload, str):
            data = payload.encode()
        elif isinstance(payload, dict):
            data = _compact(payload).encode()
        else:
            return Failure(
                where,
                "invalid_field",
                f"field payload: expected a string or a JSON object, got {_json_type(payload)}",
            )
        if not isinstance(meta, dict):
            return Failure(
                where,
                "invalid_field",
                f"field meta: expected an object, got {_json_type(meta)}",
            )
        for name, value in (("cls", cls), ("key", key)):
            if not isinstance(value, str):
                return Failure(
                    where,
                    "invalid_field",
                    f"field {name}: expected a string, got {_json_type(value)}",
                )
        if name_key is not None and "key" in obj and obj["key"] != name_key:
            return Failure(
                where,
                "invalid_field",
                f"field key {_clip(obj['key'])} differs from the file name's key "
                f"{name_key!r}",
            )
        if name_cls is not None and cls != name_cls:
            return Failure(
                where,
                "invalid_field",
                f"field cls {cls!r} differs from the file name's class {name_cls!r}",
            )
        return self._mapped(where, key, cls, data, meta)

    def _mapped(
        self, where: SourceRef, key: str, cls: str, payload: bytes, meta: dict[str, Any]
    ) -> LegacyRecord | Failure:
        # A null tenant_id is no tenant_id: the job's default applies.
        tenant = meta.get("tenant_id")
        if tenant is None:
            tenant = self.tenant
        if tenant is None:
            return Failure(
                where,
                "missing_field",
                "missing field meta.tenant_id (and no default tenant: --tenant)",
            )
        if not isinstance(tenant, str):
            return Failure(
                where,
                "invalid_field",
                f"field meta.tenant_id: expected a string, got {_json_type(tenant)}",
            )
        try:
            check_tenant(tenant)
            check_key(key)
            check_class(cls)
            time_ms = parse_time_ms(meta.get("created_at"))
        except UsageError as exc:
            return Failure(where, "invalid_field", str(exc))
        except ValueError as exc:
            return Failure(where, "invalid_field", f"field meta.created_at: {exc}")
        if len(payload) > self.max_payload_bytes:
            return Failure(
                where,
                "too_large",
                f"payload is {len(payload)} bytes; the limit is "
                f"{self.max_payload_bytes} (STRATA_MAX_PAYLOAD_BYTES)",
            )
        metadata = {
            name: value if isinstance(value, str) else _compact(value)
            for name, value in meta.items()
            if name != "tenant_id"
        }
        size = len(_compact(metadata).encode())
        if size > METADATA_LIMIT_BYTES:
            return Failure(
                where,
                "too_large",
                f"field meta is {size} bytes as metadata; the limit is {METADATA_LIMIT_BYTES}",
            )
        return LegacyRecord(
            where=where,
            tenant=tenant,
            key=key,
            cls=cls,
            payload=payload,
            metadata=metadata,
            time_ms=time_ms,
            event_id=derive_event_id(self.source, tenant, key, cls, payload, metadata),
        )


# -- the job ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """Progress of one phase: ``catch-up``, ``publish``, ``project`` or ``verify``."""

    phase: str
    done: int
    total: int


@dataclass
class BackfillReport:
    """What a backfill job did; the counts are those of the whole job."""

    job_id: str
    from_dir: str
    resumed: bool = False
    migrated: int = 0
    skipped: int = 0
    mismatched: int = 0
    failed: int = 0
    published: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    report_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when every record was imported and read back as its source."""
        return not self.failed and not self.mismatched

    def fail(self, failure: Failure) -> None:
        """Count a record that could not be imported."""
        self.failed += 1
        self.errors.append(failure.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: the command's ``--json`` object and the report file."""
        records = self.migrated + self.skipped + self.mismatched + self.failed
        return {
            "job_id": self.job_id,
            "from_dir": self.from_dir,
            "resumed": self.resumed,
            "migrated": self.migrated,
            "skipped": self.skipped,
            "mismatched": self.mismatched,
            "failed": self.failed,
            "published": self.published,
            "errors": self.errors,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "seconds": round(self.seconds, 3),
            "records_per_s": round(records / self.seconds, 1) if self.seconds else 0.0,
            "report_file": self.report_file,
        }


@dataclass(frozen=True, slots=True)
class _Published:
    """What read-back compares a migrated record against (a payload digest, not the payload)."""

    where: SourceRef
    tenant: str
    key: str
    event_id: str
    payload_sha256: bytes
    cls: str
    metadata: dict[str, str]
    time_ms: int | None

    @classmethod
    def of(cls, record: LegacyRecord) -> _Published:
        return cls(
            record.where,
            record.tenant,
            record.key,
            record.event_id,
            hashlib.sha256(record.payload).digest(),
            record.cls,
            record.metadata,
            record.time_ms,
        )


class _Acks:
    """Acknowledgements awaited in groups, bounding memory; a broker that stops
    answering ends the wait with a :class:`BrokerError`."""

    def __init__(self, watch: BrokerWatch) -> None:
        self.watch = watch
        self.pending: list[asyncio.Future[WriteToken]] = []

    async def add(self, future: asyncio.Future[WriteToken]) -> None:
        self.pending.append(future)
        if len(self.pending) >= _IN_FLIGHT:
            await self.wait()

    async def wait(self) -> None:
        """Wait for every pending acknowledgement; raise the first failure."""
        pending, self.pending = self.pending, []
        await self.watch.wait(asyncio.gather(*pending))


class Backfill:
    """Imports a legacy export as MemoryWritten events (see the module docstring).

    Args:
        settings: broker, topics and data dir.
        from_dir: the export folder.
        tenant: the tenant of records whose meta has no ``tenant_id``.
        source: the legacy system's name; part of each event id and ``source_ref``.
        agent: the agent the events name.
        max_rate: publish at most this many records per second (None: no cap).
        report_path: where to write the report (default: the jobs folder).
        on_progress: called with :class:`BackfillProgress` as phases advance.
    """

    def __init__(
        self,
        settings: Settings,
        from_dir: Path,
        *,
        tenant: str | None = None,
        source: str = "legacy",
        agent: str = "backfill",
        keystore: LocalKeystore | None = None,
        max_rate: float | None = None,
        report_path: Path | None = None,
        on_progress: Callable[[BackfillProgress], None] | None = None,
    ) -> None:
        self.settings = settings
        self.root = from_dir.resolve()
        self.tenant = tenant
        self.source = source
        self.agent = agent
        self.paths = StorePaths(settings.data_dir)
        self.keystore = keystore or LocalKeystore(
            self.paths.keys, settings.master_key_path
        )
        self.max_rate = max_rate
        self._on_progress = on_progress or (lambda _p: None)
        job_key = hashlib.sha256(
            f"{source}\0{self.root}\0{tenant or ''}".encode()
        ).hexdigest()[:16]
        self.state_path = self.paths.jobs / f"backfill-{job_key}.json"
        self._helper: asyncio.subprocess.Process | None = None
        self._helper_log: Path | None = None
        self._helper_tried = False
        # Given, or named after the run's job id once the job is open, like
        # the run's worker log: the state file above is per export and
        # options (a rerun finds it), the report is per run.
        self.report_path = report_path

    def _check_input(self) -> None:
        if not self.root.is_dir():
            raise UsageError(f"--from-dir {self.root}: not a folder")
        if not (self.root / "records").is_dir() and not any(self.root.rglob("*.jsonl")):
            raise UsageError(
                f"--from-dir {self.root}: no records/ folder and no .jsonl files"
            )
        if self.tenant is not None:
            check_tenant(self.tenant)
        if not self.source or "\0" in self.source:
            raise UsageError(f"--source {self.source!r}: give a non-empty name")
        check_agent(self.agent)
        if self.max_rate is not None and not (
            math.isfinite(self.max_rate) and self.max_rate > 0
        ):
            raise UsageError(f"--max-rate {self.max_rate}: must be a positive number")
        if self.report_path is not None:
            _check_report_path(self.report_path, self.root)

    async def run(self) -> BackfillReport:
        """Run the job to the end, resuming an unfinished one.

        Raises:
            UsageError: the export folder or an option cannot be used, or
                another backfill of this export is running on the data dir.
            BrokerError: the broker cannot be reached; rerun to resume.
            StoreError: a store or the job state cannot be written; rerun to resume.
        """
        began = time.monotonic()
        self._check_input()
        # One lock per export, whatever --tenant or --source: runs of the same
        # files with other options would publish the same records twice.
        export_key = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        lock = self.paths.jobs / f"backfill-export-{export_key}.lock"
        with exclusive(lock, "backfill of this export"):
            return await self._run(began)

    async def _run(self, began: float) -> BackfillReport:
        self.settings = pinned(self.settings)
        await ensure_topics(self.settings)
        state, resumed = await self._open_job()
        report = BackfillReport(state["job_id"], str(self.root), resumed=resumed)
        if self.report_path is None:
            self.report_path = self.paths.jobs / f"backfill-{report.job_id}.report.json"
        starts = {int(p): int(o) for p, o in state["start_offsets"].items()}
        log.info(
            "backfill.started",
            job_id=report.job_id,
            from_dir=str(self.root),
            resumed=resumed,
        )
        async with JobJournal(
            self.settings, job_id=report.job_id, kind="backfill"
        ) as journal:
            await journal.record(
                "resumed" if resumed else "started",
                from_dir=str(self.root),
                source=self.source,
            )
            try:
                await self._timed(report, "catch-up", self._project("catch-up"))
                self._helper_log = (
                    self.paths.jobs / f"backfill-{report.job_id}.worker.log"
                )
                try:
                    published = await self._timed(
                        report, "publish", self._scan_and_publish(report, starts)
                    )
                    await self._timed(report, "project", self._project_beside())
                finally:
                    helper = self._helper
                    if helper is not None and helper.returncode is None:
                        await stop_child(helper)
                await self._timed(report, "verify", self._verify(report, published))
                report.seconds = time.monotonic() - began
                self._finish(report, state)
            except Exception as exc:
                await journal.record_failure(exc)
                raise
            try:
                await journal.record(
                    "completed",
                    migrated=report.migrated,
                    skipped=report.skipped,
                    mismatched=report.mismatched,
                    failed=report.failed,
                    published=report.published,
                )
            except BrokerError as exc:
                # The job's own state file and report already say it is done.
                log.warning(
                    "backfill.completion_not_journaled",
                    job_id=report.job_id,
                    error=str(exc),
                    consequence=f"the job is complete (see {self.report_path}); "
                    "the jobs topic lacks its last step",
                )
        return report

    async def _timed(self, report: BackfillReport, phase: str, work: Awaitable[T]) -> T:
        began = time.monotonic()
        result = await work
        report.phases[phase] = time.monotonic() - began
        log.info(
            "backfill.phase_done",
            job_id=report.job_id,
            phase=phase,
            seconds=round(report.phases[phase], 3),
        )
        return result

    # -- job state -------------------------------------------------------------

    async def _open_job(self) -> tuple[dict[str, Any], bool]:
        state = self._read_state()
        if state is not None and state.get("state") == "running":
            return state, True
        ends = await end_offsets(self.settings, [self.settings.memory_topic])
        state = {
            "job_id": uuid.uuid4().hex,
            "kind": "backfill",
            "state": "running",
            "from_dir": str(self.root),
            "source": self.source,
            "tenant": self.tenant,
            "start_offsets": {str(tp.partition): off for tp, off in ends.items()},
            "started_ms": time.time_ns() // 1_000_000,
        }
        _write_json(self.state_path, state)
        return state, False

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(
                self.state_path.read_text(encoding="utf-8")
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"backfill job state {self.state_path}: cannot be read ({exc}); "
                "remove it to start the job afresh"
            ) from exc
        if not isinstance(state.get("start_offsets"), dict) or "job_id" not in state:
            raise StoreError(
                f"backfill job state {self.state_path}: fields job_id/start_offsets "
                "missing; remove it to start the job afresh"
            )
        return state

    def _finish(self, report: BackfillReport, state: dict[str, Any]) -> None:
        assert self.report_path is not None, "named when the job opened"
        report.report_file = str(self.report_path)
        _write_json(self.report_path, report.to_dict())
        # Completed only once the report is safe: a crash before this resumes.
        _write_json(
            self.state_path,
            {
                **state,
                "state": "completed",
                "completed_ms": time.time_ns() // 1_000_000,
            },
        )
        if report.failed or report.mismatched:
            log.warning(
                "backfill.incomplete",
                job_id=report.job_id,
                failed=report.failed,
                mismatched=report.mismatched,
                consequence=f"those records are not imported as they are; see {self.report_path}",
            )
        log.info(
            "backfill.completed",
            job_id=report.job_id,
            migrated=report.migrated,
            skipped=report.skipped,
            published=report.published,
        )

    # -- phases ----------------------------------------------------------------

    async def _project(self, phase: str, *, every_projection: bool = False) -> None:
        """Run an embedded worker until L2 holds every event published so far
        (and, with ``every_projection``, until every projection does).

        The worker has a group of its own: live workers may run beside it, and
        each projection's checkpoint makes sure no event applies twice.
        """
        ends = await end_offsets(self.settings, [self.settings.memory_topic])
        targets = {tp.partition: off for tp, off in ends.items()}
        first = self._l2_checkpoints()
        total = sum(max(0, off - first.get(p, 0)) for p, off in targets.items())
        if total == 0 and not every_projection:
            return
        worker = Worker(
            self.settings,
            group=f"{self.settings.topic_prefix}.backfill",
            keystore=self.keystore,
            until_caught_up=True,
        )
        run = asyncio.create_task(worker.run(), name=f"backfill:{phase}")
        watch = asyncio.create_task(
            self._watch_projection(phase, targets, first, total)
        )
        try:
            await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                # It ends only by raising: the broker stopped answering.
                worker.request_stop()
                await asyncio.gather(run, return_exceptions=True)
                watch.result()
            await run
        finally:
            watch.cancel()
            run.cancel()
            await asyncio.gather(run, watch, return_exceptions=True)
        self._on_progress(BackfillProgress(phase, total, total))

    async def _start_helper(self) -> None:
        """Start a ``strata worker`` process to project while this one
        publishes, so the two run on separate cores. Called with the first
        record published, so a run with nothing to publish starts none; if it
        cannot start, the embedded worker does all the projecting."""
        self._helper_tried = True
        assert self._helper_log is not None
        try:
            self._helper = await start_worker(
                self.settings,
                group=f"{self.settings.topic_prefix}.backfill",
                log_path=self._helper_log,
            )
        except OSError as exc:
            log.warning(
                "backfill.helper_not_started",
                error=str(exc),
                consequence="projection starts after publishing, in this process",
            )

    async def _project_beside(self) -> None:
        """Let the helper finish projecting what was published, then stop it;
        if there is none, or it failed, project here instead."""
        helper, log_path = self._helper, self._helper_log
        if helper is not None and log_path is not None:
            await self._projected_by(helper, "project")
            code = await stop_child(helper)
            if code == 0:
                # Stopped cleanly: its followers were drained as well.
                with contextlib.suppress(OSError):
                    if log_path.stat().st_size == 0:
                        log_path.unlink()  # it had nothing to say
                await self._project("project")
                return
            log.warning(
                "backfill.helper_failed",
                exit_status=code,
                log=str(log_path),
                consequence="projecting what it left in this process",
            )
        await self._project("project", every_projection=True)

    async def _projected_by(
        self, helper: asyncio.subprocess.Process, phase: str
    ) -> None:
        """Wait until L2 holds every event on the topic now, or the helper ends."""
        ends = await end_offsets(self.settings, [self.settings.memory_topic])
        targets = {tp.partition: off for tp, off in ends.items()}
        first = self._l2_checkpoints()
        total = sum(max(0, off - first.get(p, 0)) for p, off in targets.items())
        watch = BrokerWatch(self.settings, "projecting the export")
        while helper.returncode is None:
            done = self._projected_since(targets, first)
            self._on_progress(BackfillProgress(phase, done, total))
            if done >= total:
                return
            await watch.progress(done)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(helper.wait(), _HELPER_POLL_S)

    def _projected_since(self, targets: dict[int, int], first: dict[int, int]) -> int:
        """Events L2 has applied since its checkpoints were ``first``, up to
        ``targets``."""
        now = self._l2_checkpoints()
        return sum(
            max(0, min(now.get(p, 0), off) - first.get(p, 0))
            for p, off in targets.items()
        )

    def _l2_checkpoints(self) -> dict[int, int]:
        reader = L2Reader(self.paths.l2_db)
        try:
            return reader.checkpoints()
        finally:
            reader.close()

    async def _watch_projection(
        self, phase: str, targets: dict[int, int], first: dict[int, int], total: int
    ) -> None:
        watch = BrokerWatch(self.settings, "projecting the export")
        while True:
            done = self._projected_since(targets, first)
            self._on_progress(BackfillProgress(phase, done, total))
            await watch.progress(done)
            await asyncio.sleep(0.25)

    async def _scan_and_publish(
        self, report: BackfillReport, starts: dict[int, int]
    ) -> list[_Published]:
        export = ExportReader(
            self.root,
            source=self.source,
            tenant=self.tenant,
            max_payload_bytes=self.settings.max_payload_bytes,
        )
        total = export.count()
        seen: set[str] = set()
        published: list[_Published] = []
        acks = _Acks(BrokerWatch(self.settings, "publishing the export"))
        reader = L2Reader(self.paths.l2_db)
        began = time.monotonic()
        try:
            async with MemoryProducer(self.settings, self.keystore) as producer:
                chunk: list[LegacyRecord] = []
                for done, item in enumerate(export, 1):
                    if isinstance(item, Failure):
                        report.fail(item)
                    elif item.event_id in seen:
                        report.skipped += 1  # the same record listed twice
                    else:
                        seen.add(item.event_id)
                        chunk.append(item)
                    if len(chunk) >= _CHUNK or done == total:
                        self._on_progress(
                            BackfillProgress("publish", done, max(total, done))
                        )
                    if len(chunk) >= _CHUNK:
                        await self._publish_chunk(
                            producer, reader, chunk, starts, report, began,
                            acks, published,
                        )  # fmt: skip
                        chunk = []
                await self._publish_chunk(
                    producer, reader, chunk, starts, report, began, acks, published
                )
                await acks.wait()
                scanned = report.failed + report.skipped + len(published)
                self._on_progress(BackfillProgress("publish", scanned, scanned))
        except KafkaError as exc:
            raise broker_failure(self.settings, "publishing the export", exc) from exc
        finally:
            reader.close()
        return published

    async def _publish_chunk(
        self,
        producer: MemoryProducer,
        reader: L2Reader,
        chunk: list[LegacyRecord],
        starts: dict[int, int],
        report: BackfillReport,
        began: float,
        acks: _Acks,
        published: list[_Published],
    ) -> None:
        """Publish what L2 does not hold yet of a chunk, looked up in one go."""
        firsts = _first_rows(reader, chunk)
        for item in chunk:
            found = firsts.get(item.event_id)
            if found is not None and found[0].offset < starts.get(
                found[0].partition, 0
            ):
                report.skipped += 1
                continue
            if found is None:
                future = await self._publish(producer, item, report, began)
                if future is None:
                    continue
                await acks.add(future)
            published.append(_Published.of(item))

    async def _publish(
        self,
        producer: MemoryProducer,
        item: LegacyRecord,
        report: BackfillReport,
        began: float,
    ) -> asyncio.Future[WriteToken] | None:
        try:
            event = producer.seal_write(
                item.tenant,
                item.key,
                item.payload,
                cls=item.cls,
                agent=self.agent,
                metadata=item.metadata,
                event_id=item.event_id,
                time_ms=item.time_ms,
            )
        except StrataError as exc:  # an erased tenant, chiefly
            report.fail(Failure(item.where, "rejected", str(exc)))
            return None
        event.tags = ["backfill"]
        event.source_ref = f"{self.source}:{item.where}"
        if self.max_rate is not None:
            delay = began + report.published / self.max_rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if not self._helper_tried:
            await self._start_helper()
        report.published += 1
        return await producer.publish(event)

    async def _verify(
        self, report: BackfillReport, published: list[_Published]
    ) -> None:
        reader = Reader(self.paths.l2_db, self.keystore, track_reads=False)
        try:
            firsts: dict[str, tuple[HistoryRow, StoredRecord | None]] = {}
            for done, item in enumerate(published, 1):
                if done % _CHUNK == 1:
                    firsts = _first_rows(
                        reader.l2, published[done - 1 : done - 1 + _CHUNK]
                    )
                problem = _read_back(reader, item, firsts.get(item.event_id))
                if problem is None:
                    report.migrated += 1
                else:
                    report.mismatched += 1
                    report.errors.append(
                        {
                            "path": item.where.path,
                            "line": item.where.line,
                            "kind": "mismatch",
                            "reason": problem,
                            "tenant": item.tenant,
                            "key": item.key,
                            "event_id": item.event_id,
                        }
                    )
                if done % 100 == 0 or done == len(published):
                    self._on_progress(BackfillProgress("verify", done, len(published)))
        finally:
            reader.close()


def _first_rows(
    reader: L2Reader, items: Sequence[LegacyRecord | _Published]
) -> dict[str, tuple[HistoryRow, StoredRecord | None]]:
    """The first history row of each item's event on its own key, with its
    payload (a later row may reject a duplicate), by event id."""
    wanted = {item.event_id: (item.tenant, item.key) for item in items}
    firsts: dict[str, tuple[HistoryRow, StoredRecord | None]] = {}
    for tenant, key, row, stored in reader.event_rows(list(wanted)):
        if wanted.get(row.event_id) != (tenant, key):
            continue
        known = firsts.get(row.event_id)
        if known is None or (row.partition, row.offset) < (
            known[0].partition,
            known[0].offset,
        ):
            firsts[row.event_id] = (row, stored)
    return firsts


def _read_back(
    reader: Reader,
    item: _Published,
    first: tuple[HistoryRow, StoredRecord | None] | None,
) -> str | None:
    """Why the stored record differs from its source; None when it does not.

    ``first`` is the event's first history row and payload. The reason names
    fields, never values: payloads stay out of reports.
    """
    if first is None:
        return "not projected: no history row holds its event"
    row, stored = first
    if row.action != "written":
        return f"the projection recorded it as {row.action} ({row.reason})"
    if stored is None or stored.event_id != item.event_id:
        return f"version {row.version} of the key holds another event"
    try:
        memory = reader.decrypt(stored)
    except StrataError as exc:
        return f"the payload does not decrypt ({type(exc).__name__})"
    fields = []
    if hashlib.sha256(memory.payload).digest() != item.payload_sha256:
        fields.append("payload")
    if memory.cls != item.cls:
        fields.append("cls")
    if memory.metadata != item.metadata:
        fields.append("metadata")
    if item.time_ms is not None and memory.updated_ms != item.time_ms:
        fields.append("created_at")
    return f"read back differs in {', '.join(fields)}" if fields else None


def _check_report_path(path: Path, export: Path) -> None:
    """Refuse a report path that cannot take a report, before the job runs.

    The report replaces its file by rename, so the path must be outside the
    export (it would overwrite a record, or be read as one next time), and a
    regular file that can be replaced (not a device, link or immutable file)
    or nothing yet; its folder must take a new file, which only trying tells.

    Raises:
        UsageError: it cannot.
    """

    def refuse(why: str) -> UsageError:
        return UsageError(f"--report {path}: {why}")

    if path.resolve().is_relative_to(export):
        raise refuse(
            f"is inside the export {export}; the report would overwrite or join "
            "its records"
        )
    try:
        mode: int | None = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise refuse(str(exc.strerror)) from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise refuse("is a folder; give the report file's path")
        if not stat.S_ISREG(mode):
            raise refuse(
                f"is {_file_type(mode)}, not a regular file; the report would replace it"
            )
        try:  # an immutable file refuses this, as it would refuse the report
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise refuse(f"cannot be replaced ({exc.strerror})") from None
    parent = path.parent
    if not parent.is_dir():
        raise refuse(f"folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise refuse(f"folder {parent} cannot take a file ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write a JSON file atomically (temporary file, fsync, rename).

    Raises:
        StoreError: it cannot be written.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise StoreError(f"{path}: cannot be written: {exc}") from exc


async def run_backfill(
    settings: Settings, from_dir: Path, **options: Any
) -> BackfillReport:
    """Run a :class:`Backfill` job; ``options`` are its keyword arguments.

    This is also the function to time when measuring backfill throughput:
    the report's ``seconds``, ``phases`` and ``records_per_s`` give the rate
    of the whole job and of each phase.
    """
    return await Backfill(settings, from_dir, **options).run()
