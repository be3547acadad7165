"""The local broker: jars, start, status, reuse, a round trip, stop, fail-fast.

The lifecycle tests share one broker (module scope) and run in file order:
up -> status -> second up -> produce/consume -> down and up again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from strata.broker import (
    KAFKA_VERSION,
    BrokerInfo,
    broker_down,
    broker_status,
    broker_up,
    ensure_jars,
    jar_cache_dir,
    local,
    recorded_bootstrap,
)
from strata.errors import BrokerError, ConfigError

TOPIC = f"strata-test-{uuid.uuid4().hex[:8]}"


def _processes_using(props: Path) -> list[int]:
    """Pids whose command line names this server.properties (Linux /proc)."""
    needle = os.fsencode(props)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in args:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("strata-data")
    yield path
    broker_down(path, timeout_s=10)
    assert _processes_using(path / "broker" / "server.properties") == []


@pytest.fixture(scope="module")
def started(data_dir: Path) -> tuple[BrokerInfo, bool]:
    return broker_up(data_dir, timeout_s=90, heap_mb=384)


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1)]
        )
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + 20
        while len(values) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                values.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return values


# ------------------------------------------------------------------ no broker


def test_jar_cache_dir_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STRATA_KAFKA_JARS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jar_cache_dir("4.0.0") == tmp_path / "strata" / "kafka" / "4.0.0"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert jar_cache_dir() == Path.home() / ".cache/strata/kafka" / KAFKA_VERSION
    monkeypatch.setenv("STRATA_KAFKA_JARS_DIR", str(tmp_path / "jars"))
    assert jar_cache_dir() == tmp_path / "jars"
    with pytest.raises(ConfigError, match="STRATA_KAFKA_JARS_DIR"):
        ensure_jars()
    with pytest.raises(ConfigError, match="not a Kafka version"):
        jar_cache_dir("../../etc")


def test_missing_mvn_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    java = shutil.which("java")
    assert java is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(java)
    monkeypatch.delenv("STRATA_KAFKA_JARS_DIR", raising=False)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ConfigError, match=r"^mvn not found"):
        ensure_jars()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"^java not found"):
        ensure_jars()
    assert not (tmp_path / "cache" / "strata" / "kafka" / KAFKA_VERSION).exists()


def test_ensure_jars_fills_an_empty_cache_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STRATA_KAFKA_JARS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lines: list[str] = []
    jars = ensure_jars(progress=lines.append)
    assert jars == tmp_path / "strata" / "kafka" / KAFKA_VERSION
    assert (jars / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()
    assert (jars / "log4j-slf4j-impl-2.24.3.jar").is_file()
    assert [p.name for p in jars.parent.iterdir()] == [KAFKA_VERSION]
    assert lines
    # A complete cache is used without Maven.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ensure_jars() == jars


# ------------------------------------------------------------------ lifecycle


@pytest.mark.broker
def test_up_starts_a_broker_that_status_reports(
    data_dir: Path, started: tuple[BrokerInfo, bool]
) -> None:
    info, started_now = started
    assert started_now
    assert info.bootstrap.startswith("127.0.0.1:")
    assert info.version == KAFKA_VERSION
    assert info.data_dir == data_dir.resolve() / "broker"
    assert info.log_file.is_file()
    status, running = broker_status(data_dir)
    assert running
    assert status == info
    assert recorded_bootstrap(data_dir) == info.bootstrap
    recorded = json.loads((info.data_dir / "broker.json").read_text())
    assert recorded["pid"] == info.pid
    assert recorded["running"] is True
    assert len(recorded["cluster_id"]) == 22


@pytest.mark.broker
def test_second_up_returns_the_running_broker(
    data_dir: Path, started: tuple[BrokerInfo, bool]
) -> None:
    again, started_now = broker_up(data_dir)
    assert not started_now
    assert again == started[0]
    assert _processes_using(again.data_dir / "server.properties") == [again.pid]


@pytest.mark.broker
async def test_aiokafka_round_trip(started: tuple[BrokerInfo, bool]) -> None:
    bootstrap = started[0].bootstrap
    await _create_topic(bootstrap, TOPIC)
    await _produce(bootstrap, TOPIC, b"before restart")
    assert await _consume(bootstrap, TOPIC, 1) == [b"before restart"]


@pytest.mark.broker
async def test_down_then_up_keeps_address_and_data(
    data_dir: Path, started: tuple[BrokerInfo, bool]
) -> None:
    first = started[0]
    cluster_id = json.loads((first.data_dir / "broker.json").read_text())["cluster_id"]

    assert await asyncio.to_thread(broker_down, data_dir)
    status, running = broker_status(data_dir)
    assert status == first
    assert not running
    assert recorded_bootstrap(data_dir) is None
    assert _processes_using(first.data_dir / "server.properties") == []
    assert not await asyncio.to_thread(broker_down, data_dir)

    second, started_now = await asyncio.to_thread(broker_up, data_dir, timeout_s=90)
    assert started_now
    assert second.bootstrap == first.bootstrap
    assert second.pid != first.pid
    recorded = json.loads((second.data_dir / "broker.json").read_text())
    assert recorded["cluster_id"] == cluster_id
    await _produce(second.bootstrap, TOPIC, b"after restart")
    assert await _consume(second.bootstrap, TOPIC, 2) == [
        b"before restart",
        b"after restart",
    ]


# ------------------------------------------------------------------ fail-fast


@pytest.mark.broker
def test_a_jvm_that_exits_fails_fast_with_its_log_tail(tmp_path: Path) -> None:
    # 4 MiB of heap cannot hold the broker: the JVM exits on OutOfMemoryError.
    began = time.monotonic()
    with pytest.raises(BrokerError, match="exited with code") as caught:
        broker_up(tmp_path, heap_mb=4, timeout_s=60)
    assert time.monotonic() - began < 30
    assert "OutOfMemoryError" in str(caught.value)
    assert broker_status(tmp_path) == (None, False)
    assert _processes_using(tmp_path.resolve() / "broker" / "server.properties") == []


@pytest.mark.broker
def test_a_start_timeout_kills_the_jvm(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match=r"within 0\.5 s and was killed"):
        broker_up(tmp_path, timeout_s=0.5)
    assert broker_status(tmp_path) == (None, False)
    assert _processes_using(tmp_path.resolve() / "broker" / "server.properties") == []


def test_new_cluster_ids_never_start_like_an_option() -> None:
    """Kafka's tools read an id starting with '-' as a flag (1 in 64 draws)."""
    assert not any(local._new_cluster_id().startswith("-") for _ in range(5000))


@pytest.mark.broker
def test_a_cluster_id_starting_with_a_dash_still_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id kept from an earlier run may start with '-': storage still formats."""
    monkeypatch.setattr(local, "_new_cluster_id", lambda: "-q4BuMJhX51BGS329hWNRQ")
    info, started = broker_up(tmp_path / "dash", timeout_s=90)
    try:
        assert started
        recorded = json.loads((info.data_dir / "broker.json").read_text())
        assert recorded["cluster_id"] == "-q4BuMJhX51BGS329hWNRQ"
    finally:
        broker_down(tmp_path / "dash")
