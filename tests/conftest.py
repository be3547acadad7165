"""Fixtures: one real Kafka broker per session, fresh topics and data per test.

The broker is found in this order: ``STRATA_KAFKA_BOOTSTRAP`` if set; else a
testcontainers Kafka when a Docker engine answers; else the local broker that
Strata assembles from Maven Central jars.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from strata.config import Settings, load_settings
from strata.keystore import LocalKeystore
from strata.logging import configure_logging
from strata.paths import StorePaths

configure_logging("WARNING", json=True)


def _docker_answers() -> bool:
    """Whether a Docker engine answers ``GET /_ping`` on its socket.

    Asked over a plain socket that is always closed: the docker library
    leaves one open when no engine listens, which warnings-as-errors reports.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rpartition(":")
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (name, int(port))
        else:
            return False
        with conn:
            conn.settimeout(3)
            conn.connect(target)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = conn.recv(128).split(b"\r\n", 1)[0]
            return status_line.startswith(b"HTTP/1.") and b" 200" in status_line
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a real Kafka broker for the whole session."""
    explicit = os.environ.get("STRATA_KAFKA_BOOTSTRAP")
    if explicit:
        yield explicit
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        container = (
            KafkaContainer()
            .with_kraft()
            .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        )
        with container:
            yield container.get_bootstrap_server()
        return
    from strata.broker import broker_down, broker_up

    data_dir = tmp_path_factory.mktemp("broker")
    info, _ = broker_up(data_dir)
    try:
        yield info.bootstrap
    finally:
        broker_down(data_dir)


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> Settings:
    """Settings with a topic prefix and data dir of this test's own."""
    return load_settings(
        kafka_bootstrap=kafka_bootstrap,
        data_dir=tmp_path / "data",
        topic_prefix=f"test-{uuid.uuid4().hex[:12]}",
        partitions=6,
        sqlite_synchronous="NORMAL",
    )


@pytest.fixture
def keystore(settings: Settings) -> LocalKeystore:
    """The local keystore of this test's data dir."""
    return LocalKeystore(StorePaths(settings.data_dir).keys, settings.master_key_path)


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    """Environment for running the `strata` command against this test's settings."""
    env = dict(os.environ)
    env.update(
        STRATA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap or "",
        STRATA_DATA_DIR=str(settings.data_dir),
        STRATA_TOPIC_PREFIX=settings.topic_prefix,
        STRATA_PARTITIONS=str(settings.partitions),
    )
    return env


@pytest.fixture
async def topics(settings: Settings) -> Settings:
    """Create this test's topics; returns the settings."""
    from strata.kafka import ensure_topics

    await ensure_topics(settings)
    return settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that asks for the broker, so `-m 'not broker'` skips them."""
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)


structlog.contextvars.clear_contextvars()
