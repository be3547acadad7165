"""Worker and read metrics in a registry of their own (no module globals).

Histograms have fixed buckets and every label takes a bounded set of values
(projections, partitions, tiers, error classes), so memory stays bounded
however long a process runs. Figures that live elsewhere (L1's counters, the
size of each tier) are read when Prometheus scrapes, by collectors, rather
than copied on every event.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from projections.l1 import L1Cache
    from strata.paths import StorePaths

log = structlog.get_logger(__name__)

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

#: Reads are served from memory or one indexed lookup: finer at the low end.
_READ_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
    0.5,
)


class ReadMetrics:
    """Figures of the read path: latency per serving tier, misses, fallbacks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "strata_read_seconds",
            "Time to find and decrypt one record, by the tier that served it",
            ["tier"],
            buckets=_READ_BUCKETS,
            registry=registry,
        )
        self.not_found = Counter(
            "strata_read_not_found",
            "Reads of a key that does not exist (or not at the offset asked)",
            registry=registry,
        )
        self.l3_fallbacks = Counter(
            "strata_read_l3_fallbacks",
            "Reads of an L3 record answered from L2's copy, by reason",
            ["reason"],
            registry=registry,
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
        self.blocked_seconds = Counter(
            "strata_blocked_seconds",
            "Time spent waiting for a projection's store to accept writes",
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
        self.apply_latency = Histogram(
            "strata_apply_seconds",
            "Time one projection takes to apply one batch, retries included",
            ["projection"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reads = ReadMetrics(self.registry)
        self._watching: set[str] = set()

    def watch_l1(self, l1: L1Cache) -> None:
        """Export an L1 cache's hit rate, counters and size at each scrape."""
        if "l1" not in self._watching:
            self._watching.add("l1")
            self.registry.register(L1Collector(l1))

    def watch_tiers(
        self, paths: StorePaths, l1: L1Cache | None = None, *, max_age_s: float = 10.0
    ) -> None:
        """Export record counts and bytes of each tier of a data dir.

        The stores are read at most once per ``max_age_s``, so a scrape never
        costs more than a few queries.
        """
        if "tiers" not in self._watching:
            self._watching.add("tiers")
            self.registry.register(TierCollector(paths, l1, max_age_s=max_age_s))


class L1Collector:
    """Reads an L1 cache's counters when Prometheus scrapes."""

    def __init__(self, l1: L1Cache) -> None:
        self._l1 = l1

    def collect(self) -> Iterable[Metric]:
        """The L1 figures, as metric families."""
        stats = self._l1.stats
        yield CounterMetricFamily("strata_l1_hits", "L1 lookups that hit", stats.hits)
        yield CounterMetricFamily(
            "strata_l1_misses", "L1 lookups that missed", stats.misses
        )
        yield CounterMetricFamily(
            "strata_l1_evictions",
            "Records evicted from L1 to stay within its bounds",
            stats.evictions,
        )
        yield GaugeMetricFamily(
            "strata_l1_hit_ratio",
            "L1 hits over lookups since the process started",
            stats.hit_rate,
        )
        yield GaugeMetricFamily(
            "strata_l1_entries", "Records held in L1", float(len(self._l1))
        )
        yield GaugeMetricFamily(
            "strata_l1_max_bytes", "L1's byte bound", float(self._l1.max_bytes)
        )


class TierCollector:
    """Reads the size of each tier when Prometheus scrapes, cached briefly."""

    def __init__(
        self, paths: StorePaths, l1: L1Cache | None, *, max_age_s: float
    ) -> None:
        self._paths = paths
        self._l1 = l1
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._figures: tuple[dict[str, int], dict[str, int], int, int] = ({}, {}, 0, 0)

    def collect(self) -> Iterable[Metric]:
        """Records and bytes per tier, L3's dead bytes and segments."""
        records, sizes, dead, segments = self._read()
        if self._l1 is not None:
            records = {**records, "l1": len(self._l1)}
            sizes = {**sizes, "l1": self._l1.bytes}
        for name, text, values in (
            (
                "strata_tier_records",
                "Live records per tier (l2, l3: the tier that serves them)",
                records,
            ),
            (
                "strata_tier_bytes",
                "Bytes per tier: L1 in memory, L2 and L3 on disk",
                sizes,
            ),
        ):
            family = GaugeMetricFamily(name, text, labels=["tier"])
            for tier, value in sorted(values.items()):
                family.add_metric([tier], float(value))
            yield family
        yield GaugeMetricFamily(
            "strata_l3_dead_bytes",
            "L3 bytes of frames no record points to, until compaction",
            float(dead),
        )
        yield GaugeMetricFamily(
            "strata_l3_segments", "L3 segment files", float(segments)
        )

    def _read(self) -> tuple[dict[str, int], dict[str, int], int, int]:
        from projections.l2 import L2Reader
        from projections.l3 import L3Reader

        with self._lock:
            if time.monotonic() - self._at < self._max_age_s:
                return self._figures
            l3 = L3Reader(self._paths.l3)
            l2: L2Reader | None = None
            try:
                l2_db = self._paths.l2_db
                l2 = L2Reader(l2_db)
                counts = l2.counts()
                stats = l3.stats()
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail the server
                log.warning(
                    "metrics.tiers_unreadable",
                    error=str(exc),
                    consequence="tier sizes show their last known values",
                )
                return self._figures
            finally:
                if l2 is not None:
                    l2.close()
                l3.close()
            records = {"l2": counts.get("l2", 0), "l3": counts.get("l3", 0)}
            sizes = {"l2": _file_bytes(l2_db), "l3": stats.bytes}
            self._figures = (records, sizes, stats.dead_bytes, stats.segments)
            self._at = time.monotonic()
            return self._figures


def _file_bytes(path: Path) -> int:
    """A SQLite database's bytes, its write-ahead log included."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(f"{path}{suffix}").st_size
    return total
