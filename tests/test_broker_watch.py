"""BrokerWatch: a job's wait that stops moving ends once the broker is gone."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from strata.config import load_settings
from strata.errors import BrokerError
from strata.kafka import BrokerWatch


def _nobody_listening(tmp_path: Path) -> BrokerWatch:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{port}", data_dir=tmp_path, topic_prefix="watch"
    )
    return BrokerWatch(settings, "testing", stall_s=0.2, probe_s=2.0)


async def test_a_stalled_wait_asks_the_broker_and_says_it_is_gone(
    tmp_path: Path,
) -> None:
    watch = _nobody_listening(tmp_path)
    await watch.check()  # nothing stalled yet: no question asked
    await asyncio.sleep(0.3)
    with pytest.raises(BrokerError) as raised:
        await watch.check()
    message = str(raised.value)
    assert message.startswith(f"Kafka broker at {watch.settings.kafka_bootstrap} ")
    assert "stopped answering while testing" in message
    assert message.endswith("rerun to resume")


async def test_work_that_never_ends_is_cancelled_when_the_broker_is_gone(
    tmp_path: Path,
) -> None:
    watch = _nobody_listening(tmp_path)
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(BrokerError):
        await watch.wait(never)
    assert never.cancelled()


async def test_work_that_moves_is_left_alone(tmp_path: Path) -> None:
    watch = _nobody_listening(tmp_path)

    async def slow_but_moving() -> int:
        for _ in range(25):  # 2.5 s: the wait looks at the broker twice
            await asyncio.sleep(0.1)
            watch.moved()
        return 7

    assert await watch.wait(slow_but_moving()) == 7
