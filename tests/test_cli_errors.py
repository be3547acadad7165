"""Mistakes at the command line: one line on stderr naming what is wrong, exit 2."""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from projections.l2 import L2Projection
from strata.config import Settings
from strata.paths import StorePaths


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
        (("get", "acme", "k", "--as-of", "99999999999999999999999"), "--as-of"),
        (
            ("write", "acme", "k", "v", "--expect-version", str(2**63)),
            "--expect-version",
        ),
        (("nosuchcommand",), "nosuchcommand"),
        (("list", "acme", "--cls", "BAD"), "class 'BAD'"),
        (("--log-level", "LOUD", "status"), "--log-level"),
        (("worker", "--group", ""), "--group"),
        (("worker", "--group", "  "), "--group"),
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


@pytest.mark.parametrize(
    "command", ["rotate", "verify", "retire", "rollback", "shred", "list"]
)
@pytest.mark.parametrize("tenant", ["", "bad tenant!", "a/b"])
def test_a_keys_command_names_the_rule_a_tenant_breaks(
    cli_env: dict[str, str], command: str, tenant: str
) -> None:
    """Not 'has no keys', which sends the user looking for a keystore."""
    Path(cli_env["STRATA_DATA_DIR"]).mkdir(parents=True)
    done = _strata(cli_env, "keys", command, "--tenant", tenant)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"strata: tenant {tenant!r}: use 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit\n"
    )


@pytest.mark.parametrize("command", [("dlq", "list"), ("dlq", "replay"), ("status",)])
def test_a_missing_topic_is_named_at_once(
    cli_env: dict[str, str], command: tuple[str, ...]
) -> None:
    """No topics were created for this prefix: say so, instead of waiting or
    showing an empty, caught-up store."""
    Path(cli_env["STRATA_DATA_DIR"]).mkdir(parents=True)
    done = _strata(cli_env, *command)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "does not exist" in done.stderr
    assert "strata topics ensure" in done.stderr


def test_reading_with_another_prefix_than_the_store_holds_is_refused(
    cli_env: dict[str, str],
) -> None:
    """A data dir projected from one topic does not answer for another prefix."""
    paths = StorePaths(Path(cli_env["STRATA_DATA_DIR"]))
    l2 = L2Projection(paths.l2_db)
    l2.bind_topic("someone-else.memory")
    l2.close()
    for command in (("get", "acme", "k"), ("history", "acme", "k"), ("list", "acme")):
        done = _strata(cli_env, *command)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert "someone-else.memory" in done.stderr
        assert "STRATA_TOPIC_PREFIX" in done.stderr


@pytest.mark.parametrize(
    "command", [("status",), ("write", "acme", "k", "v"), ("worker",), ("dlq", "list")]
)
def test_a_broker_nobody_listens_on_is_one_line_at_once(
    cli_env: dict[str, str], command: tuple[str, ...]
) -> None:
    """Connection refused: exit 2 with the address, not a wait or a traceback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**cli_env, "STRATA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}
    done = _strata(env, *command)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr == (
        f"strata: Kafka broker at 127.0.0.1:{port} unreachable: "
        "no address of it accepted a connection\n"
    )
    assert done.stdout == ""


def test_a_worker_with_nothing_to_do_still_reports_a_damaged_or_lost_keystore(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """Damage is named at start, not only once an event needs a key."""
    assert _strata(cli_env, "write", "acme", "k", "v").returncode == 0
    caught_up = _strata(cli_env, "worker", "--until-caught-up")
    assert caught_up.returncode == 0, caught_up.stderr[-2000:]
    keystore = StorePaths(topics.data_dir).keys / "keystore.json"
    kept = keystore.read_bytes()
    keystore.write_bytes(b"\x00junk")
    damaged = _strata(cli_env, "worker", "--until-caught-up")
    keystore.unlink()
    lost = _strata(cli_env, "worker", "--until-caught-up")
    keystore.write_bytes(kept)
    again = _strata(cli_env, "worker", "--until-caught-up")
    for done, says in ((damaged, ": damaged: not JSON"), (lost, " is missing, but")):
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith(f"strata: {keystore}{says}"), done.stderr
        assert done.stderr.count("\n") == 1
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_store_of_another_cluster_or_of_a_recreated_topic_is_refused(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """Checkpoints are offsets of one topic on one cluster: a worker pointed at
    a new broker, or at a topic created again, would skip its events as
    already applied. It refuses, naming what differs and the way out."""
    written = _strata(cli_env, "write", "acme", "k", "v")
    assert written.returncode == 0, written.stderr
    token = written.stdout.strip()
    first = _strata(cli_env, "worker", "--until-caught-up")
    assert first.returncode == 0, first.stderr[-2000:]
    db = StorePaths(topics.data_dir).l2_db
    with sqlite3.connect(db) as conn:
        (cluster,) = conn.execute(
            "SELECT value FROM meta WHERE name = 'cluster'"
        ).fetchone()
        assert cluster
        conn.execute("UPDATE meta SET value = 'another' WHERE name = 'cluster'")
    reads = ("get", "acme", "k", "--wait", token)
    for command in (("worker", "--until-caught-up"), ("status",), reads):
        other = _strata(cli_env, *command)
        assert other.returncode == 2, other.stderr[-2000:]
        assert other.stderr.count("\n") == 1, other.stderr
        assert f"of Kafka cluster another, but the broker is of cluster {cluster}" in (
            other.stderr
        )
        assert "rebuild the stores from it with `strata rebuild`" in other.stderr

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE name = 'cluster'", (cluster,))
        conn.execute("UPDATE checkpoints SET next_offset = next_offset + 1000")
    for command in (("worker", "--until-caught-up"), ("status",)):
        ahead = _strata(cli_env, *command)
        assert ahead.returncode == 2, ahead.stderr[-2000:]
        assert ahead.stderr.count("\n") == 1, ahead.stderr
        assert "but the topic ends at offset" in ahead.stderr
        assert "deleted and created again?" in ahead.stderr

    # The way out the message gives: the stores rebuilt in place, keys kept.
    rebuilt = _strata(cli_env, "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert _strata(cli_env, "status").returncode == 0
    got = _strata(cli_env, "get", "acme", "k")
    assert (got.returncode, got.stdout.strip()) == (0, "v"), got


def test_a_lost_ledger_signing_key_stops_the_worker_and_signing_at_once(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """Not a warning per round while unsigned entries pile up, nor 'nothing to
    sign': the file must be restored, and nothing creates another."""
    assert _strata(cli_env, "write", "acme", "k", "v").returncode == 0
    assert _strata(cli_env, "worker", "--until-caught-up").returncode == 0
    assert _strata(cli_env, "ledger", "sign").returncode == 0
    signing = StorePaths(topics.data_dir).keys / "ledger-signing.json"
    kept = signing.read_bytes()
    signing.unlink()
    for command in (("worker", "--until-caught-up"), ("ledger", "sign")):
        done = _strata(cli_env, *command)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"ledger signing key {signing} is missing, but the ledger" in done.stderr
        assert not signing.exists()
    signing.write_bytes(kept)
    assert _strata(cli_env, "worker", "--until-caught-up").returncode == 0


def test_a_write_sealed_by_another_keystore_is_dead_lettered_not_applied(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A writer pointed at the wrong data dir starts a keystore of its own: its
    key id is its own too, so the workers refuse the event by name instead of
    projecting a ciphertext no key of theirs opens."""
    assert _strata(cli_env, "write", "acme", "k", "v").returncode == 0
    elsewhere = {**cli_env, "STRATA_DATA_DIR": str(tmp_path / "elsewhere")}
    assert _strata(elsewhere, "write", "acme", "k", "stray").returncode == 0
    done = _strata(cli_env, "worker", "--until-caught-up")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(1 dead-lettered)" in done.stdout, done.stdout
    letters = _strata(cli_env, "dlq", "list")
    assert "fields key_id/key_version: tenant 'acme' has no key tk_" in letters.stdout
    got = _strata(cli_env, "get", "acme", "k")
    assert (got.returncode, got.stdout) == (0, "v"), got


def test_a_data_dir_that_does_not_exist_is_refused(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Not 'not found' or an empty list, and no new store or keys: the
    records (and their keys) may be in the data dir meant."""
    nowhere = tmp_path / "nowhere"
    env = {**cli_env, "STRATA_DATA_DIR": str(nowhere)}
    for command in (
        ("get", "acme", "k"),
        ("history", "acme", "k"),
        ("list", "acme"),
        ("status",),
        # Nor may a command start a store or keystore of its own there.
        ("rebuild", "--projection", "ledger"),
        ("rebuild", "--data-dir", str(tmp_path / "rebuilt")),
        ("migrate", "--projection", "l2", "--version", "2"),
        ("keys", "list"),
        ("keys", "rotate", "--tenant", "acme"),
        ("keys", "jobs"),
        ("ledger", "sign"),
        ("tier", "status"),
        ("tier", "verify"),
        ("tier", "run", "--dry-run"),
        ("dlq", "replay"),
    ):
        done = _strata(env, *command)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert done.stderr == (
            f"strata: data dir {nowhere} does not exist: check STRATA_DATA_DIR\n"
        ), command
        assert not nowhere.exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("write", "acme", "bad\udcffkey", "v"), "key 'bad\\udcffkey'"),
        (("get", "acme", "bad\udcffkey"), "key 'bad\\udcffkey'"),
        (("history", "acme", "bad\udcffkey"), "key 'bad\\udcffkey'"),
        (("delete", "acme", "\udcff"), "key '\\udcff'"),
        (("list", "acme", "--prefix", "\udcff"), "--prefix '\\udcff'"),
        (("write", "acme", "k", "v", "--meta", "a=\udcff"), "--meta '\\udcff'"),
        (("write", "acme", "k", "v", "--agent", "\udcff"), "agent '\\udcff'"),
        (("backfill", "--from-dir", ".", "--source", "\udcff"), "--source '\\udcff'"),
    ],
)
def test_bytes_that_are_not_utf8_in_a_name_are_refused_by_name(
    topics: Settings, cli_env: dict[str, str], args: tuple[str, ...], named: str
) -> None:
    """A command line is decoded with surrogate escapes; such text can be
    neither encoded into an event nor stored, and used to end in a traceback."""
    done = _strata(cli_env, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        f"strata: {named}: not valid UTF-8 (bytes the command line could not decode)\n"
    )


def test_a_payload_argument_keeps_the_bytes_given(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """Bytes that are not UTF-8 are the payload as given, not an error."""
    assert _strata(cli_env, "write", "acme", "k", "\udcff\udcfe").returncode == 0
    assert _strata(cli_env, "worker", "--until-caught-up").returncode == 0
    got = _strata(cli_env, "get", "acme", "k", "--json")
    assert got.returncode == 0, got.stderr
    payload = json.loads(got.stdout)["payload"]
    assert base64.b64decode(payload["base64"]) == b"\xff\xfe"


def test_broker_status_exits_1_when_no_broker_answers(tmp_path: Path) -> None:
    """Scripts can wait on it: a closed port or a data dir with no broker is 1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["STRATA_DATA_DIR"] = str(tmp_path)
    configured = _strata({**env, "STRATA_KAFKA_BOOTSTRAP": closed}, "broker", "status")
    assert configured.returncode == 1, configured.stderr[-2000:]
    assert configured.stdout.startswith(f"not running: {closed}")
    local = _strata(env, "broker", "status", "--json")
    assert local.returncode == 1, local.stderr[-2000:]
    assert json.loads(local.stdout)["running"] is False
    said = _strata(env, "broker", "status")
    assert said.returncode == 1
    assert said.stdout == (
        f"not running: no local broker was started in {tmp_path} "
        "(`strata broker up` starts one)\n"
    )
    # A port that accepts connections but never speaks Kafka is no broker.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        listening = _strata({**env, "STRATA_KAFKA_BOOTSTRAP": mute}, "broker", "status")
    assert listening.returncode == 1, listening.stderr[-2000:]
    assert listening.stdout.startswith(f"not running: {mute}")


def test_broker_status_exits_0_when_the_configured_broker_answers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(STRATA_DATA_DIR=str(tmp_path), STRATA_KAFKA_BOOTSTRAP=kafka_bootstrap)
    status = _strata(env, "broker", "status", "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout) == {
        "bootstrap": kafka_bootstrap,
        "running": True,
        "managed": False,
        "pid": None,
    }
    # `broker down` stops only a broker it started, and says so.
    down = _strata(env, "broker", "down")
    assert down.returncode == 0, down.stderr[-2000:]
    assert down.stdout == (
        f"no local broker was running in {tmp_path}; the broker at "
        f"{kafka_bootstrap} (STRATA_KAFKA_BOOTSTRAP) is not managed here\n"
    )
    assert _strata(env, "broker", "status").returncode == 0


def test_get_writes_the_payload_bytes_exactly_when_piped(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """No newline is added to what a pipe or file receives, binary or text."""
    payload = bytes(range(256)) + b"no newline at the end"

    def strata_bytes(*args: str, given: bytes = b"") -> bytes:
        done = subprocess.run(
            [sys.executable, "-m", "strata", *args],
            input=given,
            env=cli_env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    strata_bytes("write", "acme", "blob", "-", given=payload)
    strata_bytes("worker", "--until-caught-up")
    got = strata_bytes("get", "acme", "blob")
    assert got == payload


@pytest.mark.parametrize("args", [(), ("dlq",), ("keys",)])
def test_no_command_prints_the_help_and_says_so(args: tuple[str, ...]) -> None:
    done = _strata(None, *args)
    assert done.returncode == 2
    assert "Usage:" in done.stdout
    assert done.stderr.endswith(
        f"strata{''.join(' ' + a for a in args)}: no command given\n"
    )
    assert done.stderr.count("\n") == 1


def _keys_list_into(
    env: dict[str, str], stdout: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata", "keys", "list", "--json"],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_1(
    tmp_path: Path,
) -> None:
    """A full disk or a closed pipe on stdout: the reason, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["STRATA_DATA_DIR"] = str(tmp_path)
    with open("/dev/full", "w") as full:
        listed = _keys_list_into(env, full)
    assert listed.returncode == 1
    assert listed.stderr == (
        "strata: cannot write to standard output: No space left on device\n"
    )
    # A reader that is gone before the output is written.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        piped = _keys_list_into(env, writer)
    finally:
        os.close(writer)
    assert piped.returncode == 1
    assert piped.stderr == (
        "strata: cannot write to standard output: the reader closed the pipe\n"
    )


def test_a_worker_with_nothing_pending_ends_without_an_error_logged(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """Caught up before its partitions are assigned: exit 0 and no error in
    its log (the assignment callback once ran on a stopped consumer)."""
    assert _strata(cli_env, "write", "acme", "k", "v").returncode == 0
    for _ in range(2):
        done = _strata(cli_env, "--log-level", "INFO", "worker", "--until-caught-up")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "error" not in done.stderr.lower(), done.stderr[-2000:]


def test_a_kms_address_that_cannot_be_bound_is_one_line(tmp_path: Path) -> None:
    """A port in use or a host that does not resolve: exit 2, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["STRATA_DATA_DIR"] = str(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = _strata(env, "kms", "serve", "--port", str(port))
    assert in_use.returncode == 2, in_use.stderr[-2000:]
    assert in_use.stderr == (
        f"strata: KMS address 127.0.0.1:{port}: Address already in use\n"
    )
    unknown = _strata(env, "kms", "serve", "--host", "no-such-host.invalid")
    assert unknown.returncode == 2, unknown.stderr[-2000:]
    assert unknown.stderr.startswith("strata: KMS address no-such-host.invalid:8200: ")
    assert unknown.stderr.count("\n") == 1
