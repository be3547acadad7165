"""``python -m bench.w2r_writer``: the write-to-readable client, as its own process.

An agent writing through :class:`~producers.producer.MemoryProducer` and
reading its writes back through :class:`~projections.reader.Reader`, in a
process of its own as an agent would be, so the figures carry neither the
harness's heap nor its other work. Settings come from the environment
(:func:`bench.workerproc.worker_env`); the latencies of the timed writes, in
milliseconds, go to standard output as one JSON list.

Usage: ``python -m bench.w2r_writer RATE WARMUP_SECONDS SECONDS``
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from producers.producer import MemoryProducer
from projections.reader import Reader
from strata.config import load_settings
from strata.keystore import open_keystore
from strata.paths import StorePaths


async def write_and_read(rate: float, warmup_s: float, seconds: float) -> list[float]:
    """Write ``rate`` 1 KiB records a second, each timed until it is readable."""
    settings = load_settings()
    keystore = open_keystore(settings)
    reader = Reader.from_paths(
        StorePaths(settings.data_dir), keystore, l1=None, track_reads=False
    )
    latencies: list[float] = []
    try:
        async with MemoryProducer(settings, keystore) as producer:

            async def one(i: int, timed: bool) -> None:
                tenant, key = f"tenant-{i % 3:03d}", f"w2r/{i:06d}"
                began = time.perf_counter()
                token = await producer.write(tenant, key, b"v" * 1024, agent="bench")
                await reader.get_after(tenant, key, token, timeout_s=60)
                if timed:
                    latencies.append((time.perf_counter() - began) * 1000)

            async def steady(first: int, seconds: float, timed: bool) -> None:
                # A task group lets go of each write once it is done, as an
                # agent would; holding every finished task would grow the heap
                # and bring the collector's full passes into the figures.
                start = time.perf_counter()
                async with asyncio.TaskGroup() as writes:
                    for n in range(int(rate * seconds)):
                        delay = start + n / rate - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        writes.create_task(one(first + n, timed))

            # An untimed start: every partition, connection and file warm.
            await steady(0, warmup_s, timed=False)
            await steady(int(rate * warmup_s), seconds, timed=True)
    finally:
        reader.close()
    return latencies


def main() -> None:
    """Run the writes the arguments ask for and print their latencies."""
    rate, warmup_s, seconds = (float(arg) for arg in sys.argv[1:4])
    print(json.dumps(asyncio.run(write_and_read(rate, warmup_s, seconds))))


if __name__ == "__main__":
    main()
