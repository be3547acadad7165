"""Worker metrics in a registry of the worker's own (no module globals).

Histograms have fixed buckets, so memory stays bounded however long a worker
runs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class WorkerMetrics:
    """The figures a worker exports; one instance per worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events_applied = Counter(
            "strata_events_applied",
            "Events applied, per projection and partition",
            ["projection", "partition"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "strata_dead_letters",
            "Events sent to the dead-letter topic, per error class",
            ["error_class"],
            registry=self.registry,
        )
        self.store_retries = Counter(
            "strata_store_retries",
            "Store writes retried after a transient failure",
            ["projection"],
            registry=self.registry,
        )
        self.blocked = Gauge(
            "strata_blocked",
            "1 while a projection cannot be written and the worker waits",
            ["projection"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "strata_lag_events",
            "Events between the checkpoint and the end of the partition",
            ["partition"],
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "strata_batch_apply_seconds",
            "Time to apply one partition's batch to every projection",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
