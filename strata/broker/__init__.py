"""A local single-node Apache Kafka broker for development and tests.

See :mod:`strata.broker.local` for how it is assembled and run.
"""

from __future__ import annotations

from strata.broker.local import (
    KAFKA_VERSION,
    BrokerInfo,
    broker_down,
    broker_status,
    broker_up,
    ensure_jars,
    jar_cache_dir,
    recorded_bootstrap,
)

__all__ = [
    "KAFKA_VERSION",
    "BrokerInfo",
    "broker_down",
    "broker_status",
    "broker_up",
    "ensure_jars",
    "jar_cache_dir",
    "recorded_bootstrap",
]
