"""The metrics and health endpoint, scraped by a real HTTP client."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.l1 import L1Cache
from projections.reader import Reader
from strata.config import Settings
from strata.health import HealthServer, Readiness, serve_worker
from strata.keystore import LocalKeystore
from strata.metrics import WorkerMetrics
from strata.paths import StorePaths


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in page.items() if n == name and wanted <= ls)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_histograms_keep_fixed_buckets_however_many_observations() -> None:
    """Read latency per tier is a fixed set of series: memory stays bounded."""
    metrics = WorkerMetrics()
    rng = random.Random(1)
    for i in range(20_000):
        metrics.reads.latency.labels(("l1", "l2", "l3")[i % 3]).observe(
            rng.expovariate(1000)
        )
    page = samples(generate_latest(metrics.registry).decode())
    buckets = [k for k in page if k[0] == "strata_read_seconds_bucket"]
    assert len(buckets) == 3 * 14  # 13 bounds and +Inf, per tier
    assert total(page, "strata_read_seconds_count") == 20_000


def test_l1_and_tier_figures_are_read_at_scrape(tmp_path: Path) -> None:
    """L1's hit ratio and the tier sizes come from the live objects."""
    from tests.test_l1_cache import rec

    metrics = WorkerMetrics()
    cache = L1Cache(10, 1 << 20)
    metrics.watch_l1(cache)
    metrics.watch_tiers(StorePaths(tmp_path), cache, max_age_s=0)
    cache.put(rec("t", "a", 10))
    cache.get("t", "a")
    cache.get("t", "b")
    page = samples(generate_latest(metrics.registry).decode())
    assert total(page, "strata_l1_hit_ratio") == 0.5
    assert total(page, "strata_l1_hits_total") == 1
    assert total(page, "strata_tier_records", tier="l1") == 1
    assert total(page, "strata_tier_records", tier="l3") == 0


def test_health_server_answers_readiness_and_refuses_a_taken_port() -> None:
    """/health is 503 with reasons until ready; a busy port is a usage error."""
    from strata.errors import UsageError

    state = [Readiness(False, ["no partitions assigned yet"])]
    with HealthServer(WorkerMetrics().registry, lambda: state[0]) as server:
        response = httpx.get(f"{server.url}/health")
        assert response.status_code == 503
        assert response.json()["reasons"] == ["no partitions assigned yet"]
        state[0] = Readiness(True)
        assert httpx.get(f"{server.url}/health").json()["ready"] is True
        assert httpx.get(f"{server.url}/live").status_code == 200
        assert httpx.get(f"{server.url}/nope").status_code == 404
        clash = HealthServer(
            WorkerMetrics().registry, lambda: state[0], port=server.port
        )
        with pytest.raises(UsageError, match=str(server.port)):
            clash.start()


async def test_endpoint_moves_with_applied_events_and_reports_blocking(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """A worker's endpoint parses as Prometheus text, its counters move as
    events are applied, reads show per tier, and /health turns 503 while a
    store blocks and 200 again once it heals."""
    worker = Worker(topics)
    server = serve_worker(worker, 0, tier_cache_s=0)
    client = httpx.AsyncClient(base_url=server.url, timeout=5)
    task: asyncio.Task[object] | None = None
    try:
        assert (await client.get("/health")).status_code == 503
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.assigned.wait(), 30)

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return samples(response.text)

        async def applied(count: int) -> bool:
            page = await scrape()
            return all(
                total(page, "strata_events_applied_total", projection=p) == count
                for p in ("l2", "ledger")
            )

        async with MemoryProducer(topics, keystore) as producer:
            for i in range(10):
                await producer.write("acme", f"k{i}", f"v{i}".encode())
            await eventually(lambda: applied(10))
            reader = Reader.from_paths(
                StorePaths(topics.data_dir),
                keystore,
                l1=worker.l1,
                metrics=worker.metrics.reads,
                track_reads=False,
            )
            reader.get("acme", "k1")
            reader.l1.clear()  # type: ignore[union-attr]
            reader.get("acme", "k2")
            page = await scrape()
            assert total(page, "strata_read_seconds_count", tier="l1") == 1
            assert total(page, "strata_read_seconds_count", tier="l2") == 1
            assert total(page, "strata_l1_hit_ratio") == 0.5
            assert total(page, "strata_tier_records", tier="l2") == 10
            assert total(page, "strata_tier_bytes", tier="l2") > 0
            assert any(
                n == "strata_events_applied_total" and ("projection", "l3") in labels
                for n, labels in page
            )
            reader.close()

            for i in range(10, 15):
                await producer.write("acme", f"k{i}", b"more")
            await eventually(lambda: applied(15))
            assert (await client.get("/health")).json()["ready"] is True

            # A fault: L3's lock folder is replaced by a file.
            locks = StorePaths(topics.data_dir).l3 / "locks"
            shutil.rmtree(locks)
            locks.write_bytes(b"")
            await producer.write("acme", "k-blocked", b"waits")

            async def blocked() -> bool:
                health = await client.get("/health")
                return (
                    health.status_code == 503
                    and "blocked on l3" in health.json()["reasons"]
                )

            await eventually(blocked)
            page = await scrape()
            assert total(page, "strata_blocked", projection="l3") == 1
            assert total(page, "strata_store_retries_total", projection="l3") >= 1
            locks.unlink()

            async def healed() -> bool:
                return (await client.get("/health")).status_code == 200

            await eventually(healed)
            await eventually(lambda: applied(16))
    finally:
        worker.request_stop()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await client.aclose()
        server.stop()
