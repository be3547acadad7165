"""Exactly-once effects when workers are killed at any instant, and on rebalances."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from producers.load import publish_synthetic
from projections.ledger import verify_ledger
from projections.registry import digests
from strata.commands.rebuild import rebuild
from strata.config import Settings
from strata.paths import StorePaths
from tests.helpers import (
    applied_offsets,
    env_with,
    history_duplicates,
    kill_all,
    start_worker_process,
    wait_caught_up,
)

FAST_SESSION = {"STRATA_CONSUMER_SESSION_TIMEOUT_MS": "3000"}


async def _kill_at_random_points(
    settings: Settings, env: dict[str, str], events: int, kills: int, seed: int
) -> list[int]:
    """Start a worker, SIGKILL it when progress passes each random target, restart."""
    rng = random.Random(seed)
    # A poll applies up to 2,000 events at once: the last target leaves room
    # for several more, so every kill lands before the worker is done.
    targets = sorted(rng.sample(range(events // 20, events - events // 5), kills))
    paths = StorePaths(settings.data_dir)
    killed_at = []
    for target in targets:
        proc = start_worker_process(env, f"{settings.topic_prefix}.crash")
        try:
            deadline = time.monotonic() + 120
            while applied_offsets(paths) < target:
                assert proc.poll() is None, (
                    proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                )
                assert time.monotonic() < deadline, f"no progress to {target}"
                await asyncio.sleep(0.005)
            # A random extra delay lands the kill anywhere in the batch cycle.
            await asyncio.sleep(rng.random() * 0.05)
            os.kill(proc.pid, signal.SIGKILL)
            killed_at.append(applied_offsets(paths))
        finally:
            kill_all(proc)
    return killed_at


async def _assert_exactly_once(settings: Settings, tmp_path: Path, events: int) -> None:
    paths = StorePaths(settings.data_dir)
    ledger = verify_ledger(paths.ledger)
    assert ledger.ok, ledger.findings
    assert ledger.entries == events
    assert history_duplicates(paths.l2_db) == []

    fresh = settings.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    rebuilt = await rebuild(settings, fresh, show_progress=False)
    assert rebuilt["projections"] == digests(paths)


async def _crash_loop(
    topics: Settings,
    cli_env: dict[str, str],
    tmp_path: Path,
    *,
    events: int,
    kills: int,
) -> None:
    await publish_synthetic(
        topics, events=events, tenants=4, size=200, seed=5, keys=3000
    )
    env = env_with(cli_env, **FAST_SESSION)

    killed_at = await _kill_at_random_points(topics, env, events, kills, seed=kills)

    assert len(killed_at) == kills
    assert all(k < events for k in killed_at), killed_at
    final = start_worker_process(
        env, f"{topics.topic_prefix}.crash", "--until-caught-up"
    )
    try:
        assert final.wait(timeout=300) == 0
    finally:
        kill_all(final)
    await _assert_exactly_once(topics, tmp_path, events)


async def test_crash_loop_sigkill_five_times(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """20,000 events, 5 SIGKILLs at random points: same state as a clean rebuild."""
    await _crash_loop(topics, cli_env, tmp_path, events=20_000, kills=5)


@pytest.mark.soak
async def test_crash_loop_sigkill_fifty_times(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The soak variant: 50 kills over 100,000 events."""
    await _crash_loop(topics, cli_env, tmp_path, events=100_000, kills=50)


async def test_two_workers_one_killed_third_joins(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Two workers share 6 partitions; one dies mid-stream, a third joins: exactly once."""
    settings = topics
    env = env_with(cli_env, **FAST_SESSION)
    group = f"{settings.topic_prefix}.pair"
    first = start_worker_process(env, group)
    second = start_worker_process(env, group)
    third = None
    try:
        writer = asyncio.create_task(
            publish_synthetic(
                settings,
                events=6000,
                tenants=3,
                size=200,
                seed=9,
                keys=500,
                in_flight=200,
            )
        )
        paths = StorePaths(settings.data_dir)
        deadline = time.monotonic() + 120
        while applied_offsets(paths) < 1500:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        first.kill()
        third = start_worker_process(env, group)
        await writer
        await wait_caught_up(settings, timeout_s=180)
        for proc in (second, third):
            # A worker signalled while still importing has no handler yet.
            while not list(paths.workers.glob(f"{proc.pid}-*.json")):
                assert proc.poll() is None
                assert time.monotonic() < deadline + 120
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
        assert third.wait(timeout=60) == 0
    finally:
        kill_all(first, second, *(p for p in [third] if p is not None))
    await _assert_exactly_once(settings, tmp_path, 6000)


async def test_sigterm_finishes_batch_commits_and_exits_zero(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """SIGTERM mid-stream: exit 0 with the group's commits equal to the checkpoints."""
    from tests.test_faults import committed_offsets

    await publish_synthetic(topics, events=8000, tenants=2, size=200, seed=2, keys=800)
    group = f"{topics.topic_prefix}.term"
    proc = start_worker_process(env_with(cli_env), group)
    paths = StorePaths(topics.data_dir)
    try:
        deadline = time.monotonic() + 60
        while applied_offsets(paths) < 2000:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        kill_all(proc)

    import sqlite3

    with sqlite3.connect(paths.l2_db) as db:
        l2 = dict(db.execute("SELECT partition, next_offset FROM checkpoints"))
    commits = await committed_offsets(topics, group)
    assert commits == {p: l2.get(p, 0) for p in commits}
    assert sum(l2.values()) >= 2000
    assert not list(paths.workers.glob("*.json")), (
        "a stopped worker leaves no state file"
    )


@pytest.mark.parametrize("projection", ["l2", "ledger"])
async def test_rebuild_one_projection_in_place(
    topics: Settings, cli_env: dict[str, str], projection: str
) -> None:
    """`strata rebuild --projection NAME` drops one projection and replays it to the same state."""
    import json
    import subprocess
    import sys

    await publish_synthetic(topics, events=1500, tenants=2, size=100, seed=4, keys=100)
    done = start_worker_process(
        env_with(cli_env), f"{topics.topic_prefix}.w", "--until-caught-up"
    )
    try:
        assert done.wait(timeout=120) == 0
    finally:
        kill_all(done)
    paths = StorePaths(topics.data_dir)
    before = digests(paths)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "strata",
            "rebuild",
            "--projection",
            projection,
            "--json",
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["projections"] == before
    assert digests(paths) == before
