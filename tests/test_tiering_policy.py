"""The aging policy and the read statistics, without a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.tiering import DAY_S, AgingPolicy, Candidate, TierRule
from projections.l3 import ReadStats
from strata.config import load_settings
from strata.errors import ConfigError

NOW = 1_800_000_000_000
DAY_MS = int(DAY_S * 1000)


def record(cls: str = "chat", *, age_days: float = 0, tier: str = "l2") -> Candidate:
    return Candidate("acme", "k", 4, cls, NOW - int(age_days * DAY_MS), tier)


@pytest.fixture
def policy() -> AgingPolicy:
    return AgingPolicy.from_settings(load_settings())


def test_default_rule_needs_both_age_and_idleness(policy: AgingPolicy) -> None:
    """A chat record moves once 30 days old and 7 days unread, not before."""
    decide = policy.decide
    assert (
        decide(record(age_days=29), now_ms=NOW, last_read_ms=None, cold_reads=0) is None
    )
    move = decide(record(age_days=31), now_ms=NOW, last_read_ms=None, cold_reads=0)
    assert move is not None
    assert (move.from_tier, move.to_tier, move.version) == ("l2", "l3", 4)
    assert "class chat" in move.reason
    read_3_days_ago = NOW - 3 * DAY_MS
    assert (
        decide(
            record(age_days=31), now_ms=NOW, last_read_ms=read_3_days_ago, cold_reads=0
        )
        is None
    )
    read_8_days_ago = NOW - 8 * DAY_MS
    assert decide(
        record(age_days=31), now_ms=NOW, last_read_ms=read_8_days_ago, cold_reads=0
    )


def test_regulated_classes_have_their_own_rules(policy: AgingPolicy) -> None:
    """legal and finance stay warm longer; pii never moves by default."""
    for cls, young, old in (("legal", 364, 366), ("finance", 89, 91)):
        assert (
            policy.decide(
                record(cls, age_days=young), now_ms=NOW, last_read_ms=None, cold_reads=0
            )
            is None
        )
        assert policy.decide(
            record(cls, age_days=old), now_ms=NOW, last_read_ms=None, cold_reads=0
        )
    assert (
        policy.decide(
            record("pii", age_days=10_000), now_ms=NOW, last_read_ms=None, cold_reads=0
        )
        is None
    )
    assert policy.rule_for("research") == policy.rule_for("default")


def test_promotion_after_enough_cold_reads(policy: AgingPolicy) -> None:
    """An archived record read promote_reads times comes back to L2."""
    archived = record(age_days=100, tier="l3")
    assert policy.decide(archived, now_ms=NOW, last_read_ms=None, cold_reads=2) is None
    move = policy.decide(archived, now_ms=NOW, last_read_ms=None, cold_reads=3)
    assert move is not None
    assert (move.from_tier, move.to_tier) == ("l3", "l2")
    assert move.reason.startswith("promoted: 3 reads")


def test_recent_read_keeps_an_age_only_rule_from_bouncing() -> None:
    """With age alone configured, a just-promoted (just-read) record stays."""
    policy = AgingPolicy({"default": TierRule(after_age_s=60, promote_window_s=600)})
    old = record(age_days=1)
    assert (
        policy.decide(old, now_ms=NOW, last_read_ms=NOW - 1_000, cold_reads=0) is None
    )
    assert policy.decide(old, now_ms=NOW, last_read_ms=NOW - 700_000, cold_reads=0)


def test_overrides_apply_field_by_field() -> None:
    """STRATA_TIER_POLICY changes the named fields and keeps the rest."""
    settings = load_settings(
        tier_policy={"chat": {"after_age_s": 60}, "pii": {"after_age_s": 5}},
        tier_promote_reads=5,
    )
    policy = AgingPolicy.from_settings(settings)
    chat = policy.rule_for("chat")
    assert (chat.after_age_s, chat.after_idle_s, chat.promote_reads) == (
        60,
        7 * DAY_S,
        5,
    )
    assert policy.rule_for("pii") == TierRule(after_age_s=5, promote_reads=5)
    assert policy.rule_for("legal").after_age_s == 365 * DAY_S


def test_bad_policy_is_a_config_error() -> None:
    """Unknown fields, bad class names and bad counts name the variable."""
    for bad in (
        {"chat": {"after_age": 1}},
        {"Chat!": {"after_age_s": 1}},
        {"chat": {"after_age_s": -1}},
    ):
        with pytest.raises(ConfigError, match="STRATA_TIER_POLICY"):
            load_settings(tier_policy=bad)
    with pytest.raises(ConfigError, match="promote_reads"):
        AgingPolicy.from_settings(
            load_settings(tier_policy={"chat": {"promote_reads": 0.5}})
        )


def test_read_stats_record_last_reads_and_cold_reads(tmp_path: Path) -> None:
    """Last-read times keep the newest; every read of an L3 record is counted."""
    (tmp_path / "l2").mkdir()
    stats = ReadStats(tmp_path / "l2" / "reads.db", refresh_ms=1_000)
    stats.note("acme", "a", tier="l2", at_ms=5_000)
    stats.note("acme", "a", tier="l2", at_ms=5_500)  # within refresh: not written
    assert stats.last_read("acme", "a") == 5_000
    stats.note("acme", "a", tier="l2", at_ms=7_000)
    stats.note("acme", "a", tier="l2", at_ms=6_000)  # an older, slower reader
    assert stats.last_read("acme", "a") == 7_000
    for at in (10_000, 10_100, 10_200):
        stats.note("acme", "b", tier="l3", at_ms=at)
    assert stats.cold_reads("acme", "b", since_ms=10_050) == 2
    assert stats.cold_reads("ACME", "b", since_ms=0) == 0
    stats.prune(10_150)
    assert stats.cold_reads("acme", "b", since_ms=0) == 1
    stats.forget_cold("acme", "b")
    assert stats.cold_reads("acme", "b", since_ms=0) == 0
    assert stats.last_read("other", "a") is None
    stats.close()


def test_read_stats_never_fail_a_read(tmp_path: Path) -> None:
    """An unusable statistics file costs the statistic, not the read."""
    (tmp_path / "l2").mkdir()
    (tmp_path / "l2" / "reads.db").mkdir()  # a folder where the file should be
    stats = ReadStats(tmp_path / "l2" / "reads.db")
    stats.note("acme", "a", tier="l3", at_ms=1)
    missing = ReadStats(tmp_path / "no-such-dir" / "reads.db")
    missing.note("acme", "a", tier="l2", at_ms=1)
    assert missing.last_read("acme", "a") is None
    assert not (tmp_path / "no-such-dir").exists()
