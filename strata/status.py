"""What `strata status` reports: checkpoints, end offsets, lag, dead letters."""

from __future__ import annotations

import json
import os
from typing import Any

import structlog

from consumers.dlq import read_dead_letters
from projections.l2 import L2Reader, source_mismatch
from projections.l3 import L3Reader
from projections.ledger import LedgerProjection
from strata.config import Settings
from strata.errors import ConfigError
from strata.kafka import cluster_id, end_offsets, missing_topic
from strata.paths import StorePaths, require_data_dir

log = structlog.get_logger(__name__)


async def collect_status(settings: Settings) -> dict[str, Any]:
    """Per partition: each projection's checkpoint, the end offset, and the lag.

    Raises:
        UsageError: the memory topic does not exist.
        ConfigError: the data dir was built from another topic or cluster.
    """
    paths = StorePaths(settings.data_dir)
    ends = await end_offsets(settings, [settings.memory_topic, settings.dlq_topic])
    if not any(tp.topic == settings.memory_topic for tp in ends):
        # An empty table with no lag would read as "all caught up".
        raise missing_topic(settings, settings.memory_topic)
    # Every partition would show as lagging from offset 0.
    require_data_dir(paths.root)
    # Lag against another topic's offsets would read as "caught up".
    l2_ckpts = await check_store_source(
        settings,
        {
            tp.partition: end
            for tp, end in ends.items()
            if tp.topic == settings.memory_topic
        },
    )
    ledger_ckpts = LedgerProjection(paths.ledger).checkpoints()
    l3 = L3Reader(paths.l3)
    l3_ckpts = l3.checkpoints()
    l3.close()
    partitions = []
    for tp, end in sorted(ends.items(), key=lambda i: i[0].partition):
        if tp.topic != settings.memory_topic:
            continue
        ckpts = {
            "l2": l2_ckpts.get(tp.partition, 0),
            "ledger": ledger_ckpts.get(tp.partition, 0),
            "l3": l3_ckpts.get(tp.partition, 0),
        }
        partitions.append(
            {
                "partition": tp.partition,
                "checkpoints": ckpts,
                "end_offset": end,
                "lag": max(0, end - min(ckpts.values())),
            }
        )
    dlq = (
        len(await read_dead_letters(settings))
        if any(end for tp, end in ends.items() if tp.topic == settings.dlq_topic)
        else 0
    )
    workers = read_worker_states(paths)
    return {
        "topic": settings.memory_topic,
        "partitions": partitions,
        "lag": sum(p["lag"] for p in partitions),
        "dlq": dlq,
        "workers": workers,
        "blocked": any(w["blocked"] for w in workers if w["alive"]),
    }


async def check_store_source(
    settings: Settings, ends: dict[int, int]
) -> dict[int, int]:
    """Refuse a data dir whose L2 was built from another topic or cluster, or
    whose checkpoints are past these end offsets; return L2's checkpoints.

    Raises:
        ConfigError: as :func:`projections.l2.source_mismatch` finds.
        BrokerError: the broker cannot be asked for its cluster id.
    """
    l2 = L2Reader(StorePaths(settings.data_dir).l2_db)
    try:
        l2.check_topic(settings.memory_topic)
        checkpoints = l2.checkpoints()
        recorded = l2.recorded_cluster()
    finally:
        l2.close()
    problem = source_mismatch(
        l2.path,
        settings.memory_topic,
        await cluster_id(settings) if recorded else "",
        recorded,
        checkpoints,
        ends,
    )
    if problem:
        raise ConfigError(problem)
    return checkpoints


def read_worker_states(paths: StorePaths) -> list[dict[str, Any]]:
    """State files of workers using this data dir; ``alive`` when the pid runs."""
    states = []
    for path in sorted(paths.workers.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning(
                "status.worker_state_unreadable", path=str(path), error=str(exc)
            )
            continue
        state["alive"] = _pid_alive(int(state.get("pid", 0)))
        states.append(state)
    return states


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
