"""Settings and job journals: what goes wrong is named, not ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from consumers.replay import JobJournal
from strata.children import settings_environment
from strata.config import load_settings
from strata.errors import ConfigError


def test_an_unknown_strata_variable_is_named_once_with_its_likely_meaning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STRATA_MAX_PAYLOAD_BYTEZ", "10")
    with capture_logs() as logs:
        first = load_settings()
        load_settings()
    assert first.max_payload_bytes != 10  # the misspelt value changed nothing
    named = [e for e in logs if e.get("variable") == "STRATA_MAX_PAYLOAD_BYTEZ"]
    assert len(named) == 1
    assert named[0]["log_level"] == "warning"
    assert named[0]["did_you_mean"] == "STRATA_MAX_PAYLOAD_BYTES"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (
            "not json",
            "STRATA_TIER_POLICY: not valid JSON (Expecting value: line 1 column 1 "
            "(char 0))",
        ),
        (
            '{"chat": {"bogus": 1}}',
            "STRATA_TIER_POLICY: chat: unknown field 'bogus'; use after_age_s, "
            "after_idle_s, promote_reads, promote_window_s (got {'chat': {'bogus': 1}})",
        ),
        ("7", "STRATA_TIER_POLICY: Input should be a valid dictionary (got 7)"),
    ],
)
def test_a_bad_variable_is_named_with_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("STRATA_TIER_POLICY", value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == says


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_data_dir_is_refused_not_taken_as_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STRATA_DATA_DIR", value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == f"STRATA_DATA_DIR: is empty (got {value!r})"


async def test_a_job_failure_the_journal_cannot_record_is_reported_not_raised(
    tmp_path: Path,
) -> None:
    """The job's own error is what its caller raises; a journal that cannot
    be written at that moment says so in the log instead of replacing it."""
    journal = JobJournal(load_settings(data_dir=tmp_path), job_id="j-1", kind="test")
    with capture_logs() as logs:
        await journal.record_failure(ValueError("the job's own error"))
    reported = [e for e in logs if e["event"] == "job.failure_not_recorded"]
    assert len(reported) == 1
    assert reported[0]["log_level"] == "warning"
    assert reported[0]["job_id"] == "j-1"
    assert "start() was not awaited" in reported[0]["error"]


def test_a_child_process_reads_exactly_the_settings_it_was_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every setting, the secret and the JSON policy included, survives the
    trip through a child's environment; stray STRATA_ variables do not."""
    monkeypatch.setenv("STRATA_TOPIC_PREFIX", "from-the-parent-environment")
    given = load_settings(
        kafka_bootstrap="127.0.0.1:19092",
        data_dir=tmp_path,
        topic_prefix="child-1",
        partitions=3,
        master_key_file=tmp_path / "m.key",
        kms_token="s3cret-token",
        sqlite_synchronous="normal",
        tier_policy={"legal": {"after_age_s": 86400, "after_idle_s": None}},
        ledger_checkpoint_entries=17,
    )
    env = settings_environment(given)
    assert env["STRATA_TOPIC_PREFIX"] == "child-1"
    assert "STRATA_KMS_URL" not in env  # unset stays unset
    for name in [k for k in os.environ if k.startswith("STRATA_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("STRATA_"):
            monkeypatch.setenv(name, value)
    read = load_settings()
    assert read == given
    assert read.kms_token is not None
    assert read.kms_token.get_secret_value() == "s3cret-token"
