"""`strata backfill` against a real broker: exact counts, reruns, kills.

The export holds 500 good records (450 JSON files, 50 JSON Lines) and one
record of each failure kind. Tests run as root here, and root reads a file
of mode 000; so the command runs with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped from its capability bounding set, which makes
the kernel refuse that file as it would for any user. Where capabilities
cannot be dropped, the permission test is skipped rather than faked.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiokafka import AIOKafkaConsumer

from projections.reader import Reader
from schemas.codec import Codec
from schemas.events import MemoryWritten
from strata.broker import broker_down, broker_up
from strata.config import Settings
from strata.kafka import end_offsets
from strata.keystore import LocalKeystore
from strata.paths import StorePaths
from tests.helpers import history_duplicates

STRATA = str(Path(sys.executable).with_name("strata"))
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
CLASSES = ("chat", "ops", "research")
LIMIT = 1024 * 1024  # the default STRATA_MAX_PAYLOAD_BYTES


def _drop_dac() -> None:
    """In the child, before exec: lose the right to ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _restricted() -> Callable[[], None] | None:
    """How to make a mode-000 file unreadable for the command, or skip."""
    if os.geteuid() != 0:
        return None
    status = dict(
        line.split(":\t", 1)
        for line in Path("/proc/self/status").read_text().splitlines()
        if ":\t" in line
    )
    bounding = int(status["CapBnd"], 16)
    effective = int(status["CapEff"], 16)
    if not effective & (1 << 8):  # CAP_SETPCAP, needed to drop from the bounding set
        pytest.skip(
            "running as root without CAP_SETPCAP: cannot produce permission denied"
        )
    assert bounding & (1 << CAP_DAC_OVERRIDE)
    return _drop_dac


def _good(i: int) -> tuple[str, dict[str, Any]]:
    cls = CLASSES[i % 3]
    meta: dict[str, Any] = {"emotion": ("calm", "curious", "tired")[i % 3], "n": i}
    if i % 3:
        meta["tenant_id"] = ("acme", "globex")[i % 2]
    if i % 4 == 0:
        meta["created_at"] = f"2023-05-{1 + i % 28:02d}T10:00:00Z"
    elif i % 4 == 1:
        meta["created_at"] = 1_690_000_000 + i
    payload: Any = {"text": f"note {i}", "n": i} if i % 10 == 0 else f"café note {i} ✓"
    return f"records/agent-{i % 5}/note-{i:03d}__{cls}.json", {
        "payload": payload,
        "meta": meta,
        "cls": cls,
    }


def make_export(root: Path) -> dict[str, tuple[str, str]]:
    """500 good records and one of each failure (six); returns the expected failures."""
    for i in range(450):
        rel, doc = _good(i)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, ensure_ascii=False))
    lines = []
    for j in range(50):
        _, doc = _good(1000 + j)
        lines.append(json.dumps({**doc, "key": f"jsonl/item-{j:02d}"}))
    (root / "exports").mkdir()
    (root / "exports" / "batch-1.jsonl").write_text("\n".join(lines) + "\n\n")

    records = root / "records"
    (records / "broken__chat.json").write_bytes(b'{"payload": "caf\xe9"}')
    (records / "truncated__chat.json").write_text('{"payload": "x", "meta": {')
    (records / "no-payload__chat.json").write_text(
        json.dumps({"meta": {"tenant_id": "acme"}, "cls": "chat"})
    )
    locked = records / "locked__chat.json"
    locked.write_text(json.dumps({"payload": "secret", "meta": {}, "cls": "chat"}))
    locked.chmod(0)
    (records / "huge__chat.json").write_text(
        json.dumps({"payload": "x" * (LIMIT + 1), "meta": {}, "cls": "chat"})
    )
    # A sub-folder and a class, but no name for the key inside the folder.
    (records / "agent-0" / "__chat.json").write_text(
        json.dumps({"payload": "x", "meta": {}, "cls": "chat"})
    )
    return {
        "records/agent-0/__chat.json": (
            "invalid_field",
            "file name: expected records/<key>__<class>.json",
        ),
        "records/broken__chat.json": (
            "unreadable",
            "not UTF-8 text (byte 0xe9 at offset 16)",
        ),
        "records/truncated__chat.json": (
            "invalid_json",
            "line 1 column 27: Expecting property name enclosed in double quotes",
        ),
        "records/no-payload__chat.json": ("missing_field", "missing field payload"),
        "records/locked__chat.json": ("permission_denied", "permission denied"),
        "records/huge__chat.json": (
            "too_large",
            f"payload is {LIMIT + 1} bytes; the limit is {LIMIT} (STRATA_MAX_PAYLOAD_BYTES)",
        ),
    }


def _command(export: Path, *extra: str) -> list[str]:
    return [
        STRATA,
        "backfill",
        "--from-dir",
        str(export),
        "--tenant",
        "legacy-default",
        "--json",
        *extra,
    ]


def run_cli(
    env: dict[str, str], export: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    """Run the command to the end; return its exit status and JSON object."""
    done = subprocess.run(
        _command(export, *extra),
        env=env,
        capture_output=True,
        timeout=120,
        preexec_fn=_restricted(),
        check=False,
    )
    assert done.stdout.count(b"\n") == 1, done.stderr.decode()[-2000:]
    return done.returncode, json.loads(done.stdout)


def refused(env: dict[str, str], command: list[str]) -> list[str]:
    """Run a command that must be refused (exit 2, nothing on stdout); its stderr lines."""
    done = subprocess.run(
        command, env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert done.stdout == b""
    return done.stderr.decode().strip().splitlines()


def start_slow_backfill(
    env: dict[str, str], export: Path, *, stderr: int
) -> subprocess.Popen[bytes]:
    """A backfill publishing 150 records a second, slow enough to interrupt."""
    return subprocess.Popen(
        _command(export, "--max-rate", "150"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        preexec_fn=_restricted(),
    )


async def wait_published(
    proc: subprocess.Popen[bytes], settings: Settings, at_least: int
) -> None:
    """Wait until the memory topic holds ``at_least`` events, the run still going."""
    deadline = time.monotonic() + 60
    while (
        sum((await end_offsets(settings, [settings.memory_topic])).values()) < at_least
    ):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def memory_events(settings: Settings) -> list[MemoryWritten]:
    """Every event on the memory topic."""
    ends = await end_offsets(settings, [settings.memory_topic])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    events: list[MemoryWritten] = []
    codec = Codec()
    try:
        consumer.assign(list(ends))
        for tp in ends:
            consumer.seek(tp, 0)
        while len(events) < sum(ends.values()):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    event = codec.decode(record.value)
                    assert isinstance(event, MemoryWritten)
                    events.append(event)
    finally:
        await consumer.stop()
    return events


def _errors(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {e["path"]: (e["kind"], e["reason"]) for e in result["errors"]}


def _counts(result: dict[str, Any]) -> tuple[int, int, int, int]:
    return result["migrated"], result["skipped"], result["mismatched"], result["failed"]


async def test_backfill_counts_reasons_and_rerun(
    topics: Settings, cli_env: dict[str, str], keystore: LocalKeystore, tmp_path: Path
) -> None:
    """500 records migrate, each failure is listed with its reason, the records
    read back as their sources, and a rerun publishes nothing new."""
    export = tmp_path / "export"
    expected_errors = make_export(export)

    status, result = run_cli(cli_env, export)
    assert status == 1  # failed records are a problem a script must see
    assert _counts(result) == (500, 0, 0, 6)
    assert _errors(result) == expected_errors
    assert all(e["line"] is None for e in result["errors"])
    assert json.loads(Path(result["report_file"]).read_text()) == result
    assert (
        Path(result["report_file"]).name == f"backfill-{result['job_id']}.report.json"
    )

    events = await memory_events(topics)
    assert len(events) == 500
    assert {e.tags[0] for e in events} == {"backfill"}
    assert {e.source_ref for e in events} >= {
        "legacy:records/agent-0/note-000__chat.json",
        "legacy:exports/batch-1.jsonl:50",
    }

    reader = Reader(StorePaths(topics.data_dir).l2_db, keystore)
    try:
        assert reader.l2.counts() == {"l2": 500}
        note = reader.get("acme", "agent-4/note-004")  # i=4: acme, ISO time
        assert note.payload == "café note 4 ✓".encode()
        assert note.cls == "ops"
        assert note.updated_ms == 1_683_280_800_000  # 2023-05-05T10:00:00Z
        assert note.metadata == {
            "emotion": "curious",
            "n": "4",
            "created_at": "2023-05-05T10:00:00Z",
        }
        obj = reader.get("legacy-default", "agent-0/note-030")  # no tenant_id
        assert json.loads(obj.payload) == {"text": "note 30", "n": 30}
        line = reader.get("globex", "jsonl/item-01")  # i=1001: epoch seconds
        assert line.updated_ms == 1_690_001_001_000
    finally:
        reader.close()

    ends = await end_offsets(topics, [topics.memory_topic])
    status, again = run_cli(cli_env, export)
    assert status == 1
    assert _counts(again) == (0, 500, 0, 6)
    assert again["published"] == 0
    assert again["resumed"] is False
    assert _errors(again) == expected_errors
    assert await end_offsets(topics, [topics.memory_topic]) == ends
    # The first run's helper says what it projected; the rerun, with nothing
    # to publish, started none.
    jobs = StorePaths(topics.data_dir).jobs
    [helper_log] = jobs.glob("*.worker.log")
    assert helper_log.name == f"backfill-{result['job_id']}.worker.log"
    assert helper_log.read_text().startswith("applied 500 events")


async def test_killed_backfill_resumes_to_the_same_counts(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A second run beside the first is refused; SIGKILL while publishing; the
    rerun resumes the job, publishes the rest once, and reports what an
    uninterrupted run reports."""
    export = tmp_path / "export"
    make_export(export)
    proc = start_slow_backfill(cli_env, export, stderr=subprocess.DEVNULL)
    try:
        await wait_published(proc, topics, 60)
        helpers = psutil.Process(proc.pid).children()
        assert [" ".join(h.cmdline()[-4:]) for h in helpers] == [
            f"strata worker --group {topics.topic_prefix}.backfill"
        ]
        # Another --tenant is the same export all the same.
        [second] = refused(cli_env, [*_command(export)[:-3], "--tenant", "x", "--json"])
        assert "another backfill of this export is running" in second
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # The projecting helper does not outlive the job.
        _, alive = psutil.wait_procs(helpers, timeout=30)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = sum((await end_offsets(topics, [topics.memory_topic])).values())
    assert 60 <= at_kill < 500

    status, result = run_cli(cli_env, export)
    assert status == 1
    assert result["resumed"] is True
    assert _counts(result) == (500, 0, 0, 6)
    assert result["published"] == 500 - at_kill
    assert sum((await end_offsets(topics, [topics.memory_topic])).values()) == 500
    paths = StorePaths(topics.data_dir)
    assert history_duplicates(paths.l2_db) == []


def test_backfill_of_a_missing_folder_is_a_usage_error(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Exit 2, one line on stderr naming the option and the path."""
    missing = tmp_path / "nowhere"
    assert refused(cli_env, _command(missing)) == [
        f"strata: --from-dir {missing}: not a folder"
    ]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            ["--agent", ""],
            "agent '': use 1-256 printable characters, not only spaces",
        ),
        (
            ["--agent", "  "],
            "agent '  ': use 1-256 printable characters, not only spaces",
        ),
        (["--max-rate", "nan"], "--max-rate nan: must be a positive number"),
        (["--max-rate", "0"], "--max-rate 0.0: must be a positive number"),
        (
            ["--report", "{tmp}"],
            "--report {tmp}: is a folder; give the report file's path",
        ),
        (
            ["--report", "{tmp}/export/records/r__chat.json"],
            "--report {tmp}/export/records/r__chat.json: is inside the export "
            "{tmp}/export; the report would overwrite or join its records",
        ),
        (
            ["--report", "/dev/null"],
            "--report /dev/null: is a device, not a regular file; the report would "
            "replace it",
        ),
        (
            ["--report", "/sys/report.json"],
            "--report /sys/report.json: folder /sys cannot take a file "
            "(Permission denied)",
        ),
        (
            ["--report", "{tmp}/no/such/report.json"],
            "--report {tmp}/no/such/report.json: folder {tmp}/no/such does not exist",
        ),
    ],
)
def test_bad_backfill_options_are_refused_before_anything_runs(
    cli_env: dict[str, str], tmp_path: Path, extra: list[str], says: str
) -> None:
    """Exit 2 with one line naming the option, and nothing written anywhere."""
    export = tmp_path / "export"
    make_export(export)
    before = sorted(tmp_path.rglob("*"))
    command = _command(export, *(e.format(tmp=tmp_path) for e in extra))
    assert refused(cli_env, command) == [f"strata: {says.format(tmp=tmp_path)}"]
    assert sorted(tmp_path.rglob("*")) == before


async def test_backfill_whose_broker_goes_away_stops_and_resumes(
    settings: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The broker stops mid-publish: the job exits 2 naming the broker instead
    of retrying forever, its helper with it; once the broker is back, a
    rerun resumes and imports every record exactly once."""
    export = tmp_path / "export"
    make_export(export)
    broker_dir = tmp_path / "own-broker"
    info, _ = broker_up(broker_dir)
    own = settings.model_copy(update={"kafka_bootstrap": info.bootstrap})
    env = {**cli_env, "STRATA_KAFKA_BOOTSTRAP": info.bootstrap}
    try:
        proc = start_slow_backfill(env, export, stderr=subprocess.PIPE)
        try:
            await wait_published(proc, own, 60)
            helpers = psutil.Process(proc.pid).children()
            broker_down(broker_dir)
            _, stderr = await asyncio.to_thread(proc.communicate, timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 2
        last = stderr.decode().strip().splitlines()[-1]
        assert last.startswith(
            f"strata: Kafka broker at {info.bootstrap} stopped answering"
        )
        assert last.endswith("rerun to resume")
        _, alive = psutil.wait_procs(helpers, timeout=30)
        assert alive == []

        restarted, _ = broker_up(broker_dir)
        assert restarted.bootstrap == info.bootstrap
        status, result = run_cli(env, export)
    finally:
        broker_down(broker_dir)
    assert status == 1
    assert result["resumed"] is True
    assert _counts(result) == (500, 0, 0, 6)
    assert history_duplicates(StorePaths(own.data_dir).l2_db) == []


def test_a_report_file_that_cannot_be_replaced_is_refused_up_front(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    export = tmp_path / "export"
    make_export(export)
    report = tmp_path / "kept.json"
    report.write_text("{}")
    if subprocess.run(["chattr", "+i", str(report)], check=False).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        lines = refused(cli_env, _command(export, "--report", str(report)))
    finally:
        subprocess.run(["chattr", "-i", str(report)], check=True)
    assert lines == [
        f"strata: --report {report}: cannot be replaced (Operation not permitted)"
    ]
    assert report.read_text() == "{}"
