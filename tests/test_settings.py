"""Settings from the environment: a misspelt variable is named, not ignored."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

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
