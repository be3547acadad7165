"""The aging policy, and the job that applies it by publishing tier moves.

A rule per class says when a record leaves L2 for L3, and when it comes back:

- ``after_age_s``: seconds since the record was last written;
- ``after_idle_s``: seconds since it was last read (or written, if never read);
- ``promote_reads`` within ``promote_window_s``: reads of an archived record
  that bring it back to L2.

A record moves to L3 when every condition its rule sets holds; a rule that
sets neither age nor idleness never moves records. A record read within its
promotion window stays in L2 whatever its age, so a rule of age alone cannot
send a just-promoted record straight back.

Built-in rules, each field overridable per class by ``STRATA_TIER_POLICY``
(JSON, e.g. ``{"chat": {"after_age_s": 86400}}``):

========  ===========  ============  ==========================================
class     after age    after idle    why
========  ===========  ============  ==========================================
default   30 days      7 days
legal     365 days     90 days       matters are reopened long after writing
finance   90 days      30 days       read again at quarter and year end
pii       never        never         an erased tenant's rows leave L2 at once,
                                     while L3 frames wait for compaction
========  ===========  ============  ==========================================

The job reads L2 (which records exist, their class, write time and tier) and
the read statistics, decides, and publishes one MemoryTiered event per move.
It writes no store itself: the projections apply the events, so every move
replays, is in the ledger and survives a rebuild. Running it twice, or again
before the worker applied the first run, is harmless: L2 applies a move only
from the tier the record is in and records the repeat as rejected.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from producers.producer import MemoryProducer
from projections.l2 import L2Reader
from projections.l3 import L3Reader, ReadStats, read_stats_path
from projections.reader import WriteToken
from schemas.events import MemoryTiered
from strata.config import Settings
from strata.errors import ConfigError, NotProjectedError
from strata.keystore import open_keystore
from strata.paths import StorePaths

log = structlog.get_logger(__name__)

#: UTC milliseconds now; tests inject their own to age records.
Clock = Callable[[], int]

DAY_S = 86_400.0


def wall_clock_ms() -> int:
    """The current UTC time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class TierRule:
    """When records of one class move between L2 and L3."""

    after_age_s: float | None = None
    after_idle_s: float | None = None
    promote_reads: int = 3
    promote_window_s: float = 3600.0

    @property
    def ages(self) -> bool:
        """Whether this rule ever moves records to L3."""
        return self.after_age_s is not None or self.after_idle_s is not None


BUILTIN_RULES: Mapping[str, TierRule] = {
    "default": TierRule(after_age_s=30 * DAY_S, after_idle_s=7 * DAY_S),
    "legal": TierRule(after_age_s=365 * DAY_S, after_idle_s=90 * DAY_S),
    "finance": TierRule(after_age_s=90 * DAY_S, after_idle_s=30 * DAY_S),
    "pii": TierRule(),
}


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live record as the job sees it in L2."""

    tenant: str
    key: str
    version: int
    cls: str
    updated_ms: int
    tier: str


@dataclass(frozen=True, slots=True)
class Move:
    """One decided tier move."""

    tenant: str
    key: str
    version: int
    from_tier: str
    to_tier: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "tenant": self.tenant,
            "key": self.key,
            "version": self.version,
            "from": self.from_tier,
            "to": self.to_tier,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class AgingPolicy:
    """Rules per class, with ``default`` for classes without their own."""

    rules: Mapping[str, TierRule] = field(default_factory=lambda: dict(BUILTIN_RULES))

    @classmethod
    def from_settings(cls, settings: Settings) -> AgingPolicy:
        """The built-in rules, overridden field by field by ``tier_policy``.

        Raises:
            ConfigError: an override sets a field to a value it cannot take.
        """
        rules = {
            name: replace(
                rule,
                promote_reads=settings.tier_promote_reads,
                promote_window_s=settings.tier_promote_window_s,
            )
            for name, rule in BUILTIN_RULES.items()
        }
        overrides = settings.tier_policy
        default = _override(rules["default"], overrides.get("default", {}))
        rules["default"] = default
        for name, fields in overrides.items():
            if name != "default":
                rules[name] = _override(rules.get(name, default), fields)
        return cls(rules)

    def rule_for(self, cls: str) -> TierRule:
        """The rule of a class, or the default one."""
        return self.rules.get(cls) or self.rules["default"]

    def decide(
        self,
        record: Candidate,
        *,
        now_ms: int,
        last_read_ms: int | None,
        cold_reads: int,
    ) -> Move | None:
        """The move this record is due, if any.

        ``last_read_ms``: when it was last read (None: never). ``cold_reads``:
        its reads while in L3 within the rule's promotion window.
        """
        rule = self.rule_for(record.cls)
        if record.tier == "l3":
            if cold_reads < rule.promote_reads:
                return None
            reason = (
                f"promoted: {cold_reads} reads within {rule.promote_window_s:g}s "
                f"(class {record.cls})"
            )
            return _move(record, "l2", reason)
        if record.tier != "l2" or not rule.ages:
            return None
        recently_read = (
            last_read_ms is not None
            and now_ms - last_read_ms < rule.promote_window_s * 1000
        )
        if recently_read:
            return None
        age_s = (now_ms - record.updated_ms) / 1000
        idle_s = (now_ms - max(record.updated_ms, last_read_ms or 0)) / 1000
        if rule.after_age_s is not None and age_s < rule.after_age_s:
            return None
        if rule.after_idle_s is not None and idle_s < rule.after_idle_s:
            return None
        reason = (
            f"aged: class {record.cls}, written {age_s:.0f}s ago, idle {idle_s:.0f}s"
        )
        return _move(record, "l3", reason)

    def max_window_ms(self) -> int:
        """The longest promotion window of any rule, in milliseconds."""
        return int(max(r.promote_window_s for r in self.rules.values()) * 1000)


def _move(record: Candidate, to_tier: str, reason: str) -> Move:
    return Move(record.tenant, record.key, record.version, record.tier, to_tier, reason)


def _override(rule: TierRule, fields: Mapping[str, float | None]) -> TierRule:
    changes: dict[str, Any] = dict(fields)
    if "promote_reads" in changes:
        reads = changes["promote_reads"]
        if reads is None or reads < 1 or reads != int(reads):
            raise ConfigError(
                f"STRATA_TIER_POLICY: promote_reads must be a whole number >= 1, got {reads!r}"
            )
        changes["promote_reads"] = int(reads)
    if "promote_window_s" in changes and not changes["promote_window_s"]:
        raise ConfigError("STRATA_TIER_POLICY: promote_window_s must be > 0")
    return replace(rule, **changes)


@dataclass
class TierReport:
    """What one run of the job decided and published."""

    evaluated: int = 0
    demoted: int = 0
    promoted: int = 0
    published: int = 0
    truncated: bool = False
    dry_run: bool = False
    moves: list[Move] = field(default_factory=list)
    #: Per partition, the highest offset this run published to.
    tokens: dict[int, int] = field(default_factory=dict)

    def to_dict(self, *, max_moves: int = 100) -> dict[str, Any]:
        """A JSON-ready form, listing at most ``max_moves`` moves."""
        return {
            "evaluated": self.evaluated,
            "demoted": self.demoted,
            "promoted": self.promoted,
            "published": self.published,
            "truncated": self.truncated,
            "dry_run": self.dry_run,
            "moves": [m.to_dict() for m in self.moves[:max_moves]],
            "tokens": {str(p): o for p, o in sorted(self.tokens.items())},
        }


class TieringJob:
    """Evaluates the aging policy over a data dir and publishes tier moves.

    Args:
        settings: the topic, data dir and policy to use.
        policy: overrides the policy the settings name.
        clock: UTC milliseconds; the policy ages records against it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        policy: AgingPolicy | None = None,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.settings = settings
        self.paths = StorePaths(settings.data_dir)
        self.policy = policy or AgingPolicy.from_settings(settings)
        self.clock = clock

    def plan(self) -> TierReport:
        """Decide the moves due now, without publishing anything.

        At most ``tier_max_moves`` moves are decided per run (``truncated``
        says the limit was reached); the next run picks up the rest.

        Raises:
            StoreError: L2 or the read statistics cannot be read.
        """
        now = self.clock()
        report = TierReport()
        l2_db = self.paths.l2_db
        l2 = L2Reader(l2_db)
        stats = ReadStats(read_stats_path(l2_db))
        try:
            for record in _candidates(l2):
                report.evaluated += 1
                move = self._decide(record, stats, now)
                if move is None:
                    continue
                if len(report.moves) >= self.settings.tier_max_moves:
                    report.truncated = True
                    break
                report.moves.append(move)
        finally:
            l2.close()
            stats.close()
        report.promoted = sum(1 for m in report.moves if m.to_tier == "l2")
        report.demoted = len(report.moves) - report.promoted
        return report

    def _decide(self, record: Candidate, stats: ReadStats, now: int) -> Move | None:
        rule = self.policy.rule_for(record.cls)
        if record.tier == "l3":
            since = now - int(rule.promote_window_s * 1000)
            reads = stats.cold_reads(record.tenant, record.key, since_ms=since)
            return self.policy.decide(
                record, now_ms=now, last_read_ms=None, cold_reads=reads
            )
        if not rule.ages:
            return None
        if (
            rule.after_age_s is not None
            and now - record.updated_ms < rule.after_age_s * 1000
        ):
            # Too young whatever its reads: skip the statistics lookup.
            return None
        last = stats.last_read(record.tenant, record.key)
        return self.policy.decide(record, now_ms=now, last_read_ms=last, cold_reads=0)

    async def run(self, *, dry_run: bool = False) -> TierReport:
        """Plan, then publish one MemoryTiered event per move.

        The cold reads of promoted records are forgotten once their events
        are acknowledged, so the same reads do not promote twice.

        Raises:
            StoreError: L2 or the read statistics cannot be read.
            BrokerError: the broker cannot be reached.
        """
        report = self.plan()
        report.dry_run = dry_run
        if dry_run or not report.moves:
            log.info("tiering.planned", **_summary(report))
            return report
        keystore = open_keystore(self.settings)
        now = self.clock()
        async with MemoryProducer(self.settings, keystore) as producer:
            pending = [
                await producer.publish(_event(move, now)) for move in report.moves
            ]
            tokens: list[WriteToken] = list(await asyncio.gather(*pending))
        for token in tokens:
            report.tokens[token.partition] = max(
                token.offset, report.tokens.get(token.partition, -1)
            )
        report.published = len(tokens)
        self._forget_used_reads(report, now)
        log.info("tiering.published", **_summary(report))
        return report

    def _forget_used_reads(self, report: TierReport, now: int) -> None:
        stats = ReadStats(read_stats_path(self.paths.l2_db))
        try:
            for move in report.moves:
                if move.to_tier == "l2":
                    stats.forget_cold(move.tenant, move.key)
            stats.prune(now - self.policy.max_window_ms())
        finally:
            stats.close()

    async def wait_applied(
        self, report: TierReport, *, timeout_s: float = 60.0
    ) -> None:
        """Wait until L2 and L3 have applied every event the run published.

        Raises:
            NotProjectedError: they did not within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            l2 = L2Reader(self.paths.l2_db)
            l3 = L3Reader(self.paths.l3)
            try:
                behind = [
                    p
                    for p, offset in report.tokens.items()
                    if min(l2.checkpoint(p), l3.checkpoint(p)) <= offset
                ]
            finally:
                l2.close()
                l3.close()
            if not behind:
                return
            if time.monotonic() >= deadline:
                raise NotProjectedError(
                    f"tier moves on partitions {behind} were not applied within "
                    f"{timeout_s:g}s (is a worker running?)"
                )
            await asyncio.sleep(0.1)


def _candidates(l2: L2Reader) -> Iterator[Candidate]:
    for tenant, key, version, cls, updated_ms, tier in l2.tier_candidates():
        yield Candidate(tenant, key, version, cls, updated_ms, tier)


def _event(move: Move, now_ms: int) -> MemoryTiered:
    return MemoryTiered(
        event_id=uuid.uuid4().hex,
        tenant=move.tenant,
        key=move.key,
        version=move.version,
        from_tier=move.from_tier,
        to_tier=move.to_tier,
        reason=move.reason,
        time_ms=now_ms,
    )


def _summary(report: TierReport) -> dict[str, Any]:
    return {
        "evaluated": report.evaluated,
        "demoted": report.demoted,
        "promoted": report.promoted,
        "published": report.published,
        "truncated": report.truncated,
    }
