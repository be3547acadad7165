"""Settings and job journals: what goes wrong is named, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from consumers.replay import JobJournal
from strata.config import load_settings


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
