"""Store faults block commits and heal by themselves; a broker outage loses nothing;
conflicting writes are decided by the log, the same way on every replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from consumers import replay
from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.ledger import verify_ledger
from projections.registry import digests
from strata.broker import broker_down, broker_up
from strata.commands.rebuild import rebuild
from strata.config import Settings
from strata.errors import BrokerError
from strata.kafka import ensure_topics
from strata.keystore import LocalKeystore
from strata.paths import StorePaths
from tests.helpers import (
    applied_offsets,
    committed_offsets,
    env_with,
    history_duplicates,
    kill_all,
    start_worker_process,
    wait_caught_up,
)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a size-capped tmpfs at ``path``: a disk that can really fill up."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write a file until the file system is full; return it."""
    filler = folder / "filler"
    # Unbuffered: a buffered file would keep the part of a chunk that did not
    # fit, and fail again when closed.
    with filler.open("wb", buffering=0) as out:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                out.write(chunk)
    return filler


async def _write_many(
    settings: Settings, keystore: LocalKeystore, count: int, prefix: str
) -> None:
    async with MemoryProducer(settings, keystore) as producer:
        await asyncio.gather(
            *[
                await producer.publish(
                    producer.seal_write(
                        "acme", f"{prefix}/{i % 50}", "v" * 400, cls="ops"
                    )
                )
                for i in range(count)
            ]
        )


async def test_full_disk_blocks_commits_then_resumes(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str]
) -> None:
    """L2 on a full disk: no checkpoint or commit moves, status says blocked, then heals."""
    paths = StorePaths(topics.data_dir)
    with small_tmpfs(paths.l2_db.parent, "3m"):
        worker = Worker(topics)
        task = asyncio.create_task(worker.run())
        try:
            await _write_many(topics, keystore, 200, "before")
            await wait_caught_up(topics, timeout_s=60)
            filler = fill_disk(paths.l2_db.parent)
            with sqlite3.connect(paths.l2_db) as db:
                before_l2 = dict(
                    db.execute("SELECT partition, next_offset FROM checkpoints")
                )
            before_commits = await committed_offsets(topics, worker.group)

            await _write_many(topics, keystore, 600, "during")
            deadline = time.monotonic() + 30
            while "l2" not in worker.blocked:
                assert time.monotonic() < deadline, (
                    "the worker never reported the full disk"
                )
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)

            assert "full" in worker.blocked["l2"]
            with sqlite3.connect(paths.l2_db) as db:
                assert (
                    dict(db.execute("SELECT partition, next_offset FROM checkpoints"))
                    == before_l2
                )
            assert await committed_offsets(topics, worker.group) == before_commits
            status = subprocess.run(
                [sys.executable, "-m", "strata", "status", "--json"],
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            reported = json.loads(status.stdout)
            assert reported["blocked"] is True
            assert reported["lag"] > 0

            filler.unlink()
            await wait_caught_up(topics, timeout_s=60)
            deadline = time.monotonic() + 30
            while worker.report.events_applied < 800:
                assert time.monotonic() < deadline, worker.report
                await asyncio.sleep(0.05)
            assert worker.blocked == {}
            assert worker.report.events_applied == 800
            assert await committed_offsets(topics, worker.group) != before_commits
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, timeout=30)
        assert history_duplicates(paths.l2_db) == []
        ledger = verify_ledger(paths.ledger)
        assert ledger.ok
        assert ledger.entries == 800


async def test_broker_outage_of_ten_seconds_loses_nothing(
    tmp_path: Path, keystore: LocalKeystore, settings: Settings
) -> None:
    """Stop the broker mid-stream for 10 s: producer and worker reconnect; all applied once."""
    broker_dir = tmp_path / "own-broker"
    info, _ = broker_up(broker_dir)
    own = settings.model_copy(update={"kafka_bootstrap": info.bootstrap})
    try:
        await ensure_topics(own)
        worker = Worker(own)
        worker_task = asyncio.create_task(worker.run())
        sent: list[str] = []

        async def publish_steadily() -> None:
            async with MemoryProducer(own, keystore) as producer:
                for i in range(400):
                    event = producer.seal_write(
                        "acme", f"steady/{i % 40}", f"value {i}"
                    )
                    while True:
                        try:
                            await asyncio.wait_for(
                                await producer.publish(event), timeout=40
                            )
                            break
                        except (KafkaError, TimeoutError):
                            # Resend the same event: its id makes a duplicate harmless.
                            await asyncio.sleep(0.5)
                    sent.append(event.event_id)
                    await asyncio.sleep(0.01)

        writer = asyncio.create_task(publish_steadily())
        while len(sent) < 100:
            await asyncio.sleep(0.05)
        broker_down(broker_dir)
        await asyncio.sleep(10)
        restarted, _ = broker_up(broker_dir)
        assert restarted.bootstrap == info.bootstrap
        await asyncio.wait_for(writer, timeout=180)
        await wait_caught_up(own, timeout_s=120)
        worker.request_stop()
        await asyncio.wait_for(worker_task, timeout=60)
    finally:
        broker_down(broker_dir)

    paths = StorePaths(own.data_dir)
    with sqlite3.connect(paths.l2_db) as db:
        written = dict(
            db.execute(
                "SELECT event_id, COUNT(*) FROM history WHERE action = 'written' GROUP BY event_id"
            )
        )
    assert len(sent) == 400
    assert set(written) == set(sent)
    assert set(written.values()) == {1}
    assert history_duplicates(paths.l2_db) == []
    assert verify_ledger(paths.ledger).ok


@pytest.mark.parametrize("busy", [False, True], ids=["caught-up", "mid-backlog"])
async def test_a_worker_stops_promptly_while_the_broker_is_away(
    tmp_path: Path,
    keystore: LocalKeystore,
    settings: Settings,
    cli_env: dict[str, str],
    busy: bool,
) -> None:
    """SIGTERM with the broker gone: the worker gives up on the commit, exits
    cleanly in bounded time, and its log says so without a line per retry.
    Mid-backlog, the group's session also expires first, so a revoke tries to
    commit to a coordinator that is gone while polls wait behind it."""
    broker_dir = tmp_path / "own-broker"
    info, _ = broker_up(broker_dir)
    own = settings.model_copy(update={"kafka_bootstrap": info.bootstrap})
    try:
        await ensure_topics(own)
        async with MemoryProducer(own, keystore) as producer:
            for i in range(50):
                await producer.write("acme", f"k{i}", f"value {i}")
            if busy:
                backlog = [
                    await producer.publish(
                        producer.seal_write("acme", f"b{i % 500}", b"x" * 64)
                    )
                    for i in range(60_000)
                ]
                await asyncio.gather(*backlog)
        worker = start_worker_process(
            env_with(cli_env, STRATA_KAFKA_BOOTSTRAP=info.bootstrap), "away"
        )
        paths = StorePaths(own.data_dir)
        try:
            if busy:
                while applied_offsets(paths) < 2_000:
                    assert worker.poll() is None
                    await asyncio.sleep(0.05)
            else:
                await wait_caught_up(own)
            broker_down(broker_dir)
            # Past the session timeout (10 s): a few hundred retries, a revoke.
            await asyncio.sleep(12)
            worker.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.wait, 60)
            assert worker.stderr is not None
            lines = worker.stderr.read().decode().splitlines()
        finally:
            kill_all(worker)
    finally:
        broker_down(broker_dir)
    assert code == 0, lines[-5:]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    gave_up = [r for r in records if r.get("event") == "worker.commit_failed"]
    assert [r["error"] for r in gave_up][-1:] == ["no answer within 5s"]
    assert len(lines) < 60, f"{len(lines)} log lines in 12 s of outage"


async def test_racing_writers_with_expected_versions(
    topics: Settings, keystore: LocalKeystore, tmp_path: Path
) -> None:
    """Five writers race for versions 1-10 of one key: one wins each, on replay too."""

    async def writer(name: str) -> None:
        async with MemoryProducer(topics, keystore) as producer:
            for expected in range(10):
                await producer.write(
                    "acme",
                    "shared/counter",
                    f"{name} at {expected}",
                    agent=name,
                    expected_version=expected,
                )

    await asyncio.gather(*(writer(f"agent-{i}") for i in range(5)))
    await Worker(topics, until_caught_up=True).run()

    paths = StorePaths(topics.data_dir)
    with sqlite3.connect(paths.l2_db) as db:
        rows = db.execute(
            "SELECT version, action, expected_version, reason FROM history "
            "WHERE tenant = 'acme' AND key = 'shared/counter' ORDER BY offset"
        ).fetchall()
    written = [r for r in rows if r[1] == "written"]
    rejected = [r for r in rows if r[1] == "rejected"]
    assert [r[0] for r in written] == list(range(1, 11))
    assert all(r[2] == r[0] - 1 for r in written)
    assert len(rejected) == 40
    assert all(r[3].startswith("expected version") for r in rejected)

    fresh = topics.model_copy(update={"data_dir": tmp_path / "replayed"})
    rebuilt = await rebuild(topics, fresh, show_progress=False)
    assert rebuilt["projections"] == digests(paths)


async def test_a_job_step_the_broker_never_takes_fails_in_bounded_time(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal whose broker went away raises a BrokerError naming the step
    instead of waiting forever, and closes without hanging either."""
    monkeypatch.setattr(replay, "RECORD_TIMEOUT_S", 2.0)
    monkeypatch.setattr(replay, "JOURNAL_TIMEOUT_S", 2.0)
    broker_dir = tmp_path / "own-broker"
    info, _ = broker_up(broker_dir)
    own = settings.model_copy(update={"kafka_bootstrap": info.bootstrap})
    try:
        await ensure_topics(own)
        began = time.monotonic()

        async def journal_across_the_outage() -> None:
            async with replay.JobJournal(own, job_id="j-7", kind="test") as journal:
                await journal.record("started")
                broker_down(broker_dir)
                await journal.record("completed")

        with pytest.raises(BrokerError) as raised:
            await journal_across_the_outage()
        assert time.monotonic() - began < 60
    finally:
        broker_down(broker_dir)
    assert str(raised.value) == (
        f"Kafka broker at {info.bootstrap} did not acknowledge the 'completed' step "
        f"of job j-7 on {own.jobs_topic} within 2s; rerun to resume"
    )
