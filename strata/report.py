"""Governance artifacts: what a store holds and whether it is sound, as JSON
and as a Markdown summary for people.

Every input is gathered by a step with its own time limit, and every step
ends as a check that passed or failed with its reason. An input that cannot
be read (a missing folder, an unreachable broker, an unreadable keystore) is
a failed check that says why; its section of the report then says the same,
so no field is ever left empty for a reader to guess at. The report passes
only when every check does.

Checks:

``data_dir``        the data dir exists
``ledger``          `strata ledger verify` finds nothing
``ledger_signed``   no entry has waited unsigned longer than the interval
``keys``            the keystore reads and is whole, each tenant's primary key
                    unwraps through the KMS; key versions and rotation state
``broker``          checkpoints, end offsets and dead letters could be read
``dead_letters``    no dead letter awaits replay
``lag``             every projection is within ``max_lag`` of the end offsets
``stores``          no worker is blocked on a store it cannot write
``tiers``           L2 reads; record counts per tier and class
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from strata.config import Settings
from strata.errors import StoreError, StrataError, UsageError
from strata.paths import StorePaths

if TYPE_CHECKING:
    from strata.keystore import Keyring

log = structlog.get_logger(__name__)

T = TypeVar("T")

FORMAT = "strata-governance-report/v1"
JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
_TIERS = ("l1", "l2", "l3")
_MARKDOWN_ROWS = 50


@dataclass
class Check:
    """One check of the report: its name, verdict and reason."""

    name: str
    ok: bool
    reason: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "name": self.name,
            "ok": self.ok,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Report:
    """The report being assembled: checks, and a section per input."""

    settings: Settings
    checks: list[Check] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    generated_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, reason: str, seconds: float = 0.0) -> None:
        """Record one check's verdict."""
        self.checks.append(Check(name, ok, reason, seconds))

    def unavailable(self, section: str, reason: str) -> None:
        """Mark a section whose input could not be read."""
        self.sections[section] = {"available": False, "reason": reason}

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON object."""
        passed = sum(c.ok for c in self.checks)
        return {
            "format": FORMAT,
            "ok": self.ok,
            "generated_ms": self.generated_ms,
            "generated": _iso(self.generated_ms),
            "data_dir": str(self.settings.data_dir),
            "topic": self.settings.memory_topic,
            "summary": f"{passed} of {len(self.checks)} checks passed",
            "checks": [c.to_dict() for c in self.checks],
            **self.sections,
        }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


async def _in_daemon_thread(fn: Callable[[], T], timeout_s: float) -> T:
    """Run blocking ``fn`` in a daemon thread, waiting at most ``timeout_s``.

    A daemon thread, not the loop's executor: a step stuck in I/O (a hung
    network filesystem) must not keep the process from exiting after the
    report has recorded it as timed out.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(_settle, future, setter, value)
        except RuntimeError:
            log.debug("report.step_finished_late", step=getattr(fn, "__name__", "?"))

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            deliver(future.set_exception, exc)
        else:
            deliver(future.set_result, result)

    threading.Thread(target=work, daemon=True, name="strata-report-step").start()
    return await asyncio.wait_for(future, timeout_s)


def _settle(
    future: asyncio.Future[Any], setter: Callable[[Any], None], value: Any
) -> None:
    if not future.done():
        setter(value)


async def _step(
    report: Report,
    name: str,
    gather: Callable[[], Awaitable[T]],
    timeout_s: float,
) -> T | None:
    """Run one input's gathering under a time limit; on failure, record a
    failed check named ``name`` with the reason and return None."""
    began = time.monotonic()
    try:
        return await asyncio.wait_for(gather(), timeout_s)
    except TimeoutError:
        reason = f"did not finish within {timeout_s:g}s"
    except StrataError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken input must not hide the others
        reason = f"{type(exc).__name__}: {exc}"
    report.check(name, False, reason, time.monotonic() - began)
    log.warning(
        "report.step_failed",
        step=name,
        reason=reason,
        consequence="the report fails; its section says why",
    )
    return None


# -- the keystore ------------------------------------------------------------------


def check_keystore(keystore: Keyring) -> int:
    """Check that the keystore is whole and that its keys work.

    Runs :meth:`~strata.keystore.Keyring.check`, as a worker does at start;
    then each tenant not erased has its primary key version unwrapped
    through the KMS, as :meth:`~strata.keystore.Keyring.data_key` does; the
    material is dropped.

    Returns:
        How many primary key versions were unwrapped.

    Raises:
        StoreError: the keystore is damaged, or lacks an entry the KMS holds
            a key for.
        ConfigError: it has another format, or the master key is unusable.
        KeyUnavailableError: a primary key version does not unwrap
            (:class:`~strata.errors.KmsUnavailableError` when the KMS does
            not answer).
    """
    keystore.check()
    tenants = keystore.tenants()
    unwrapped = 0
    for tenant in tenants:
        version = keystore.primary_version(tenant)
        if version is not None:
            keystore.data_key(tenant, version)
            unwrapped += 1
    log.debug(
        "report.keystore_checked",
        keystore=str(keystore.directory / "keystore.json"),
        tenants=len(tenants),
        unwrapped=unwrapped,
    )
    return unwrapped


# -- the inputs --------------------------------------------------------------------


async def _ledger(report: Report, paths: StorePaths, timeout_s: float) -> None:
    from projections.ledger import (
        VerifyReport,
        partitions_in,
        read_state,
        verify_ledger,
    )

    began = time.monotonic()
    if not paths.ledger.is_dir():
        reason = f"the ledger folder {paths.ledger} does not exist"
        report.check("ledger", False, reason)
        report.check("ledger_signed", False, reason)
        report.unavailable("ledger", reason)
        return

    def verify() -> VerifyReport:
        return verify_ledger(paths.ledger)

    verified = await _step(
        report, "ledger", lambda: _in_daemon_thread(verify, timeout_s), timeout_s
    )
    if verified is None:
        reason = report.checks[-1].reason
        report.check("ledger_signed", False, f"ledger not verified: {reason}")
        report.unavailable("ledger", reason)
        return
    seconds = time.monotonic() - began
    found = verified.findings
    reason = (
        f"{verified.entries} entries in {verified.partitions} partitions verified"
        if verified.ok
        else f"{len(found)} findings; first: partition {found[0].partition}"
        + (f" entry {found[0].entry}" if found[0].entry is not None else "")
        + f": {found[0].problem}"
    )
    report.check("ledger", verified.ok, reason, seconds)
    section = verified.to_dict()
    section["available"] = True
    report.sections["ledger"] = section

    interval = report.settings.ledger_checkpoint_interval_ms
    now = report.generated_ms

    def waiting() -> tuple[list[str], list[str]]:
        late: list[str] = []
        unreadable: list[str] = []
        for partition in partitions_in(paths.ledger):
            try:
                state = read_state(paths.ledger, partition)
            except StoreError as exc:
                unreadable.append(f"partition {partition}: {exc}")
                log.warning(
                    "report.checkpoint_unreadable",
                    partition=partition,
                    error=str(exc),
                    consequence="the ledger_signed check fails",
                )
                continue
            waited = now - state.unsigned_since_ms if state.unsigned_since_ms else 0
            if state.entries > state.signed_entries and waited > interval:
                late.append(
                    f"partition {partition}: {state.entries - state.signed_entries} "
                    f"entries unsigned for {waited / 1000:.0f}s"
                )
        return late, unreadable

    began = time.monotonic()
    waits = await _step(
        report,
        "ledger_signed",
        lambda: _in_daemon_thread(waiting, timeout_s),
        timeout_s,
    )
    if waits is None:
        return
    late, unreadable = waits
    problems: list[str] = []
    if unreadable:
        problems.append(
            "; ".join(unreadable) + " (how long its entries waited unsigned is unknown)"
        )
    if late:
        problems.append("; ".join(late) + " (run `strata ledger sign`)")
    report.check(
        "ledger_signed",
        not problems,
        "; ".join(problems)
        if problems
        else f"no entry waited unsigned longer than {interval / 1000:g}s",
        time.monotonic() - began,
    )


async def _keys(report: Report, paths: StorePaths, timeout_s: float) -> None:
    from strata.keystore import open_keystore
    from strata.signing import load_public_key

    began = time.monotonic()
    keystore_file = paths.keys / "keystore.json"
    if not keystore_file.is_file():
        reason = f"the keystore {keystore_file} does not exist"
        report.check("keys", False, reason)
        report.unavailable("keys", reason)
        return

    def gather() -> dict[str, Any]:
        keystore = open_keystore(report.settings)
        try:
            unwrapped = check_keystore(keystore)
            return {
                "tenants": _tenant_keys(keystore),
                "kms": keystore.kms.describe(),
                "unwrapped": unwrapped,
            }
        finally:
            keystore.close()

    data = await _step(
        report, "keys", lambda: _in_daemon_thread(gather, timeout_s), timeout_s
    )
    if data is None:
        report.unavailable("keys", report.checks[-1].reason)
        return
    tenants = data["tenants"]
    try:
        signing = load_public_key(paths.keys).key_id
    except StrataError as exc:
        signing = f"unavailable: {exc}"
    data.update(
        available=True,
        tenant_count=len(tenants),
        erased=sum(t["erased"] for t in tenants),
        rotating=sum(t["rotation"] == "rotating" for t in tenants),
        ledger_signing_key_id=signing,
    )
    report.sections["keys"] = data
    report.check(
        "keys",
        True,
        f"{len(tenants)} tenants, {data['erased']} erased, "
        f"{data['rotating']} mid-rotation; {data['unwrapped']} primary keys "
        f"unwrap through {data['kms']}",
        time.monotonic() - began,
    )


def _tenant_keys(keystore: Keyring) -> list[dict[str, Any]]:
    """Each tenant's key versions and rotation state, without key material."""
    tenants = []
    for tenant in keystore.tenants():
        versions = keystore.versions(tenant)
        active = [v for v in versions if v.state == "active"]
        primary = next((v.version for v in versions if v.primary), 0)
        erased = keystore.is_erased(tenant)
        if erased:
            rotation = "erased"
        elif len(active) <= 1:
            rotation = "settled"
        elif all(v.cleared_ms is not None for v in active if not v.primary):
            # `keys verify` found nothing needing the old versions any more.
            rotation = "cleared, old versions not retired"
        else:
            rotation = "rotating"
        tenants.append(
            {
                "tenant": tenant,
                "erased": erased,
                "primary_version": primary,
                "active_versions": len(active),
                "retired_versions": sum(v.state == "retired" for v in versions),
                "destroyed_versions": sum(v.state == "destroyed" for v in versions),
                "rotation": rotation,
                "versions": [
                    {
                        "version": v.version,
                        "state": v.state,
                        "primary": v.primary,
                        "created": _iso(v.created_ms),
                    }
                    for v in versions
                ],
            }
        )
    return tenants


async def _status(report: Report, timeout_s: float, max_lag: int) -> None:
    from strata.status import collect_status

    began = time.monotonic()
    status = await _step(
        report, "broker", lambda: collect_status(report.settings), timeout_s
    )
    if status is None:
        reason = report.checks[-1].reason
        for name in ("dead_letters", "lag", "stores"):
            report.check(name, False, f"status unavailable: {reason}")
        report.unavailable("status", reason)
        return
    report.check(
        "broker", True, "status read from the broker", time.monotonic() - began
    )
    dlq, lag = int(status.get("dlq", 0)), int(status.get("lag", 0))
    report.check(
        "dead_letters",
        dlq == 0,
        f"{dlq} dead letters await replay (`strata dlq list`)"
        if dlq
        else "no dead letters",
    )
    report.check(
        "lag",
        lag <= max_lag,
        f"projections are {lag} events behind the topic (at most {max_lag} allowed)",
    )
    blocked = bool(status.get("blocked", False))
    report.check(
        "stores",
        not blocked,
        "a worker is blocked on a store it cannot write"
        if blocked
        else "no worker is blocked",
    )
    report.sections["status"] = {"available": True, **status}


async def _tiers(report: Report, paths: StorePaths, timeout_s: float) -> None:
    from projections.l2 import L2Reader

    began = time.monotonic()
    if not paths.l2_db.is_file():
        reason = f"the L2 database {paths.l2_db} does not exist"
        report.check("tiers", False, reason)
        report.unavailable("tiers", reason)
        return

    def gather() -> dict[str, dict[str, int]]:
        reader = L2Reader(paths.l2_db)
        try:
            return reader.counts_by_tier_and_class()
        finally:
            reader.close()

    counts = await _step(
        report, "tiers", lambda: _in_daemon_thread(gather, timeout_s), timeout_s
    )
    if counts is None:
        report.unavailable("tiers", report.checks[-1].reason)
        return
    by_tier = {tier: counts.get(tier, {}) for tier in sorted({*_TIERS, *counts})}
    totals = {tier: sum(classes.values()) for tier, classes in by_tier.items()}
    by_class: dict[str, int] = {}
    for classes in by_tier.values():
        for cls, n in classes.items():
            by_class[cls] = by_class.get(cls, 0) + n
    report.sections["tiers"] = {
        "available": True,
        "records": by_tier,
        "totals": totals,
        "classes": by_class,
    }
    report.check(
        "tiers",
        True,
        f"{sum(totals.values())} live records",
        time.monotonic() - began,
    )


async def build_report(
    settings: Settings, *, step_timeout_s: float = 60.0, max_lag: int = 0
) -> Report:
    """Gather every input of the governance report and run its checks.

    Args:
        settings: the store to report on.
        step_timeout_s: the time limit of each step.
        max_lag: how many events projections may be behind and still pass.
    """
    paths = StorePaths(settings.data_dir)
    report = Report(settings)
    exists = settings.data_dir.is_dir()
    report.check(
        "data_dir",
        exists,
        f"{settings.data_dir} exists"
        if exists
        else f"the data dir {settings.data_dir} does not exist",
    )
    await _ledger(report, paths, step_timeout_s)
    await _keys(report, paths, step_timeout_s)
    await _status(report, step_timeout_s, max_lag)
    await _tiers(report, paths, step_timeout_s)
    log.info(
        "report.built",
        ok=report.ok,
        failed=[c.name for c in report.checks if not c.ok],
    )
    return report


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out`` (created if needed).

    Raises:
        UsageError: the folder or files cannot be written.
    """
    doc = report.to_dict()
    json_path, md_path = out / JSON_NAME, out / MARKDOWN_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        md_path.write_text(render_markdown(doc))
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}") from exc
    return json_path, md_path


# -- Markdown -------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    if len(rows) > _MARKDOWN_ROWS:
        out = out[: 2 + _MARKDOWN_ROWS]
        out.append(f"\n({len(rows) - _MARKDOWN_ROWS} more rows in {JSON_NAME})")
    return out


def _unavailable(section: dict[str, Any]) -> list[str]:
    return [f"Not available: {section['reason']}"]


def render_markdown(doc: dict[str, Any]) -> str:
    """The readable summary of a report's JSON object."""
    verdict = "PASS" if doc["ok"] else "FAIL"
    lines = [
        "# Strata governance report",
        "",
        f"Generated {doc['generated']} for data dir `{doc['data_dir']}`, "
        f"topic `{doc['topic']}`.",
        "",
        f"**Result: {verdict}** ({doc['summary']}).",
        "",
        "## Checks",
        "",
        *_table(
            ["check", "result", "reason", "seconds"],
            [
                [c["name"], "pass" if c["ok"] else "FAIL", c["reason"], c["seconds"]]
                for c in doc["checks"]
            ],
        ),
        "",
        *_ledger_md(doc["ledger"]),
        *_keys_md(doc["keys"]),
        *_status_md(doc["status"]),
        *_tiers_md(doc["tiers"]),
    ]
    return "\n".join(lines) + "\n"


def _ledger_md(section: dict[str, Any]) -> list[str]:
    lines = ["## Ledger", ""]
    if not section["available"]:
        return [*lines, *_unavailable(section), ""]
    lines += [
        f"{section['entries']} entries in {section['partitions']} partitions; "
        f"signing key `{section['key_id'] or 'none'}`.",
        "",
    ]
    rows = []
    for s in section["summaries"]:
        latest = s.get("latest_checkpoint")
        rows.append(
            [
                s["partition"],
                s["entries"],
                latest["size"] if latest else "none",
                f"`{latest['root']}`" if latest else "none",
                _iso(latest["time_ms"]) if latest else "never",
                s["unsigned_entries"],
                s["uncommitted_entries"],
            ]
        )
    lines += _table(
        [
            "partition",
            "entries",
            "signed size",
            "signed root",
            "signed at",
            "unsigned",
            "past checkpoint",
        ],
        rows,
    )
    if any(s["uncommitted_entries"] for s in section["summaries"]):
        lines += [
            "",
            "Lines past a partition's checkpoint are not part of its ledger: a "
            "worker wrote them and had not recorded its checkpoint, or stopped "
            "before it did; its next start discards them.",
        ]
    if section["findings"]:
        lines += ["", "Findings:", ""]
        lines += [
            f"- partition {f['partition']}, "
            f"{'entry ' + str(f['entry']) if f['entry'] is not None else 'files'} "
            f"[{f['kind']}]: {f['problem']}"
            for f in section["findings"][:_MARKDOWN_ROWS]
        ]
    return [*lines, ""]


def _keys_md(section: dict[str, Any]) -> list[str]:
    lines = ["## Keys", ""]
    if not section["available"]:
        return [*lines, *_unavailable(section), ""]
    lines += [
        f"{section['tenant_count']} tenants, {section['erased']} erased, "
        f"{section['rotating']} mid-rotation; {section['unwrapped']} primary keys "
        f"unwrap through `{section['kms']}`. Ledger signing key "
        f"`{section['ledger_signing_key_id']}`.",
        "",
    ]
    rows = [
        [
            t["tenant"],
            "erased" if t["erased"] else t["primary_version"],
            t["active_versions"],
            t["retired_versions"],
            t["destroyed_versions"],
            t["rotation"],
        ]
        for t in section["tenants"]
    ]
    lines += _table(
        ["tenant", "primary", "active", "retired", "destroyed", "rotation"], rows
    )
    return [*lines, ""]


def _status_md(section: dict[str, Any]) -> list[str]:
    lines = ["## Dead letters and lag", ""]
    if not section["available"]:
        return [*lines, *_unavailable(section), ""]
    lines += [
        f"{section['dlq']} dead letters; {section['lag']} events behind in total.",
        "",
    ]
    rows = [
        [
            p["partition"],
            p["end_offset"],
            ", ".join(f"{k} {v}" for k, v in sorted(p["checkpoints"].items())),
            p["lag"],
        ]
        for p in section["partitions"]
    ]
    lines += _table(["partition", "end offset", "checkpoints", "lag"], rows)
    return [*lines, ""]


def _tiers_md(section: dict[str, Any]) -> list[str]:
    lines = ["## Records per tier and class", ""]
    if not section["available"]:
        return [*lines, *_unavailable(section), ""]
    classes = sorted(section["classes"])
    rows = [
        [tier, *(counts.get(c, 0) for c in classes), section["totals"][tier]]
        for tier, counts in section["records"].items()
    ]
    lines += _table(["tier", *classes, "total"], rows)
    return [*lines, ""]
