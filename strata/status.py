"""What `strata status` reports: checkpoints, end offsets, lag, dead letters."""

from __future__ import annotations

from typing import Any

from projections.l2 import L2Reader
from projections.ledger import LedgerProjection
from strata.config import Settings
from strata.kafka import end_offsets
from strata.paths import StorePaths


async def collect_status(settings: Settings) -> dict[str, Any]:
    """Per partition: each projection's checkpoint, the end offset, and the lag."""
    paths = StorePaths(settings.data_dir)
    ends = await end_offsets(settings, [settings.memory_topic, settings.dlq_topic])
    l2 = L2Reader(paths.l2_db)
    l2_ckpts = l2.checkpoints()
    l2.close()
    ledger_ckpts = LedgerProjection(paths.ledger).checkpoints()
    partitions = []
    for tp, end in sorted(ends.items(), key=lambda i: i[0].partition):
        if tp.topic != settings.memory_topic:
            continue
        ckpts = {
            "l2": l2_ckpts.get(tp.partition, 0),
            "ledger": ledger_ckpts.get(tp.partition, 0),
        }
        partitions.append(
            {
                "partition": tp.partition,
                "checkpoints": ckpts,
                "end_offset": end,
                "lag": max(0, end - min(ckpts.values())),
            }
        )
    dlq = sum(end for tp, end in ends.items() if tp.topic == settings.dlq_topic)
    return {
        "topic": settings.memory_topic,
        "partitions": partitions,
        "lag": sum(p["lag"] for p in partitions),
        "dlq": dlq,
    }
