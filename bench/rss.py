"""The worker's memory as events grow: a worker process on a large topic.

A topic of ``--rss-events`` sealed events (1,000,000 by default) is published
once, then ``strata worker --until-caught-up`` projects it from a fresh data
dir as a child process. Its resident set is sampled every 250 ms and read at
each quarter of the events (250k, 500k, 750k and 1M by default); the peak is
the kernel's high-water mark. "Flat" is held to the resident set at the end
being at most 1.1 times the one at the first quarter.
"""

from __future__ import annotations

from bench.context import Context
from bench.registry import Measurement, stage, target
from bench.workerproc import MIB, run_worker

QUARTERS = (1, 2, 3, 4)


@stage("rss", "worker process memory at 1/4..4/4 of --rss-events (1M)", order=70)
def rss(ctx: Context) -> list[Measurement]:
    """One worker process over the large topic, sampled from outside."""
    events = int(ctx.options.get("rss_events") or 1_000_000)
    data = ctx.dataset(events)
    settings = ctx.settings(
        data.settings.topic_prefix,
        ctx.fresh_data_dir("rss", keys_from=data.settings.data_dir),
    )
    child = run_worker(settings, group=ctx.fresh_name("rss"))
    workload = {"events": events}
    out = [
        Measurement(
            "rss.peak",
            child.peak_rss / MIB,
            "MiB",
            f"worker peak RSS at {events:,} events",
            workload,
        ),
        Measurement(
            "rss.rate",
            events / child.seconds,
            "events/s",
            f"rebuild: worker process over {events:,} events",
            workload,
        ),
    ]
    first = None
    for quarter in QUARTERS:
        mark = events * quarter // 4
        at = child.rss_at(mark)
        if at is None:
            # The worker finished between two samples: its last sample stands in.
            at = child.samples[-1].rss if child.samples else child.peak_rss
        first = first or at
        out.append(
            Measurement(
                f"rss.at_{quarter}q",
                at / MIB,
                "MiB",
                f"worker RSS at {mark:,} events",
                workload,
            )
        )
    last = out[-1].value * MIB
    out.append(
        Measurement(
            "rss.growth",
            last / first if first else float("nan"),
            "ratio",
            "worker RSS at 4/4 / at 1/4 (flat = 1.0)",
            workload,
        )
    )
    ctx.extras.setdefault("rss_curves", []).append(
        {
            "events": events,
            "samples": [[s.applied, round(s.rss / MIB, 1)] for s in child.samples],
        }
    )
    return out


target("rss.peak", "<", 256)
target("rss.growth", "<=", 1.1)
