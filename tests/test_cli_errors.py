"""Mistakes at the command line: one line on stderr naming what is wrong, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _strata(env: dict[str, str] | None, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--bogus",), "--bogus"),
        (("write", "acme", "k", "v", "--expect-version", "abc"), "--expect-version"),
        (("get", "acme", "k", "--as-of", "-1"), "--as-of"),
        (("nosuchcommand",), "nosuchcommand"),
        (("--log-level", "LOUD", "status"), "--log-level"),
    ],
)
def test_a_usage_mistake_is_one_line_naming_it(
    args: tuple[str, ...], named: str
) -> None:
    done = _strata(None, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert named in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("command", [("dlq", "list"), ("dlq", "replay"), ("status",)])
def test_a_missing_topic_is_named_at_once(
    cli_env: dict[str, str], command: tuple[str, ...]
) -> None:
    """No topics were created for this prefix: say so, instead of waiting or
    showing an empty, caught-up store."""
    done = _strata(cli_env, *command)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "does not exist" in done.stderr
    assert "strata topics ensure" in done.stderr
