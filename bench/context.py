"""What every stage shares: the broker, a scratch folder, the workload and its topics.

The broker is ``STRATA_KAFKA_BOOTSTRAP`` when set; otherwise a local broker
is started in the scratch folder and stopped at the end. Every topic the run
creates carries the run's prefix (``bench-<id>``), so it never collides with
another run on a shared broker, and is deleted at the end unless asked not to.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from bench.dataset import Dataset, publish_dataset
from strata.config import Settings, load_settings


@dataclass(frozen=True)
class Workload:
    """The shape of the events every stage works on, unless it says otherwise."""

    events: int = 100_000
    size: int = 1024
    partitions: int = 6
    tenants: int = 3
    keys: int = 1000

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``keys`` is per tenant)."""
        return {
            "events": self.events,
            "size": self.size,
            "partitions": self.partitions,
            "tenants": self.tenants,
            "keys_per_tenant": self.keys,
        }


@dataclass
class Context:
    """The run's shared state, handed to every stage."""

    bootstrap: str
    workdir: Path
    workload: Workload
    runs: int
    out_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    #: Anything a stage wants kept in results.json beside its figures.
    extras: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    #: The current run, from 0; stages use it to alternate what goes first.
    run: int = 0
    _datasets: dict[tuple[Any, ...], Dataset] = field(default_factory=dict)
    _counter: int = 0

    @property
    def prefix_root(self) -> str:
        """The start of every topic prefix and group name of this run."""
        return f"bench-{self.run_id}"

    def fresh_name(self, what: str) -> str:
        """A topic prefix, group or folder name never used before in this run."""
        self._counter += 1
        return f"{self.prefix_root}-{what}-{self._counter}"

    def settings(self, prefix: str, data_dir: Path, **overrides: Any) -> Settings:
        """Strata settings for one topic prefix and data dir on this run's broker."""
        values: dict[str, Any] = {
            "kafka_bootstrap": self.bootstrap,
            "data_dir": data_dir,
            "topic_prefix": prefix,
            "partitions": self.workload.partitions,
        }
        values.update(overrides)
        return load_settings(**values)

    def fresh_data_dir(self, what: str, keys_from: Path | None = None) -> Path:
        """An empty data dir; with ``keys_from``, holding a copy of that keystore.

        A worker checks every event's key version against its keystore, so a
        fresh worker needs the keys the events were sealed with.
        """
        path = self.workdir / self.fresh_name(what)
        path.mkdir(parents=True)
        if keys_from is not None:
            shutil.copytree(keys_from / "keys", path / "keys")
        return path

    def dataset(self, events: int | None = None) -> Dataset:
        """The topic of ``events`` sealed events of the workload, published once per run.

        Stages that compare clients on "the same topic" call this with the
        same count and get the same topic.
        """
        count = events or self.workload.events
        key = (count, self.workload)
        if key not in self._datasets:
            prefix = self.fresh_name(f"data{count}")
            data_dir = self.fresh_data_dir(f"producer{count}")
            settings = self.settings(prefix, data_dir)
            began = time.perf_counter()
            self._datasets[key] = asyncio.run(
                publish_dataset(settings, self.workload, count)
            )
            print(
                f"  published {count} events to {settings.memory_topic} "
                f"in {time.perf_counter() - began:.1f}s",
                flush=True,
            )
        return self._datasets[key]

    def delete_topics(self) -> list[str]:
        """Delete every topic of this run from the broker; return their names."""
        return asyncio.run(_delete_topics(self.bootstrap, self.prefix_root))


async def _delete_topics(bootstrap: str, marker: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if marker in t]
        if ours:
            await admin.delete_topics(ours)
        return ours
    finally:
        await admin.close()


class Broker:
    """The broker of a run: the one named in the environment, or one started here."""

    def __init__(self, workdir: Path) -> None:
        self._data_dir = workdir / "broker"
        self._started = False
        self.bootstrap = os.environ.get("STRATA_KAFKA_BOOTSTRAP", "")

    def __enter__(self) -> Broker:
        if not self.bootstrap:
            from strata.broker import broker_up

            print("starting a local Kafka broker ...", flush=True)
            info, self._started = broker_up(self._data_dir)
            self.bootstrap = info.bootstrap
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            from strata.broker import broker_down

            broker_down(self._data_dir)


def make_workdir(keep: bool) -> Path:
    """A scratch folder for data dirs (and the broker, when started here)."""
    return Path(tempfile.mkdtemp(prefix="strata-bench-" + ("keep-" if keep else "")))
