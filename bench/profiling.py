"""Where the worker's time goes: pyinstrument over an in-process projection.

The profiler samples the main thread around ``asyncio.run``, so the event
loop's own work (aiokafka's fetcher, callbacks) and its idle waits are in the
picture, not only the worker's coroutines. Work handed to a thread
(``asyncio.to_thread``: the ledger's appends and fsyncs) is not sampled; it
shows as the loop waiting in ``epoll.poll``, and the ``components`` stage
times it. The file holds the functions with the most self time, then the top
of the call tree.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.registry import Measurement, Skip, stage
from consumers.worker import Worker

FLAT_LINES = 45
TREE_LINES = 140


@stage(
    "profile",
    "pyinstrument profile of the in-process worker -> profile-worker.txt",
    order=90,
    max_runs=1,
)
def profile(ctx: Context) -> list[Measurement]:
    """Profile one projection of the dataset topic (durable defaults)."""
    data = ctx.dataset()
    settings = ctx.settings(
        data.settings.topic_prefix,
        ctx.fresh_data_dir("profile", keys_from=data.settings.data_dir),
    )
    group = ctx.fresh_name("profile")

    async def run() -> Any:
        return await Worker(settings, group=group, until_caught_up=True).run()

    path = ctx.out_dir / "profile-worker.txt"
    title = (
        f"strata worker, in-process, fresh data dir, synchronous=FULL, "
        f"{data.events:,} events of {ctx.workload.size} B on "
        f"{ctx.workload.partitions} partitions"
    )
    seconds = profile_to(path, title, run)
    return [
        Measurement(
            "profile.worker",
            data.events / seconds,
            "events/s",
            "projection under the profiler (not comparable)",
        )
    ]


@stage(
    "profile-publish",
    "pyinstrument profile of MemoryProducer publishing -> profile-publish.txt",
    order=91,
    max_runs=1,
)
def profile_publish(ctx: Context) -> list[Measurement]:
    """Profile one run of the Strata publisher of the publish stage."""
    from bench.dataset import specs
    from bench.publish import strata_publish

    writes = list(specs(ctx.workload, ctx.workload.events))
    prefix = ctx.fresh_name("profile-pub")
    settings = ctx.settings(prefix, ctx.fresh_data_dir("profile-pub"))
    path = ctx.out_dir / "profile-publish.txt"
    title = (
        f"MemoryProducer.seal_write + publish, {len(writes):,} events of "
        f"{ctx.workload.size} B on {ctx.workload.partitions} partitions "
        "(topic creation and producer start included)"
    )
    seconds = profile_to(path, title, lambda: strata_publish(settings, writes))
    return [
        Measurement(
            "profile.publish",
            len(writes) / seconds,
            "events/s",
            "publish under the profiler (not comparable)",
        )
    ]


def profile_to(
    path: Path, title: str, main: Callable[[], Coroutine[Any, Any, Any]]
) -> float:
    """Run ``main`` in a fresh event loop under pyinstrument; write the report.

    Returns the wall-clock seconds of the run.
    """
    try:
        from pyinstrument import Profiler
        from pyinstrument.renderers import ConsoleRenderer
    except ImportError as exc:
        raise Skip(f"pyinstrument is not installed ({exc})") from exc
    profiler = Profiler(interval=0.001, async_mode="disabled")
    began = time.perf_counter()
    profiler.start()
    try:
        asyncio.run(main())
    finally:
        profiler.stop()
    seconds = time.perf_counter() - began
    session = profiler.last_session
    assert session is not None
    tree = ConsoleRenderer(unicode=False, color=False, show_all=False, short_mode=True)
    root = session.root_frame()
    text = [
        title,
        f"wall clock {seconds:.2f}s under the profiler (sampling every 1 ms); "
        "self = time in the function itself, incl = with what it calls",
        "main thread only: work in asyncio.to_thread shows as epoll.poll",
        "",
        f"== functions by self time (top {FLAT_LINES}) ==",
        *(flat_profile(root, FLAT_LINES) if root is not None else []),
        "",
        f"== call tree, library frames folded (top {TREE_LINES} lines) ==",
        *_head(session_text(tree, session), TREE_LINES),
    ]
    path.write_text("\n".join(text) + "\n")
    return seconds


def session_text(renderer: Any, session: Any) -> str:
    """Render a pyinstrument session with one renderer."""
    return str(renderer.render(session))


def flat_profile(root: Any, lines: int) -> list[str]:
    """Self and inclusive time per function over the whole tree, by self time.

    Inclusive time counts a function once per stack, so recursion does not
    inflate it.
    """
    own: dict[str, float] = {}
    incl: dict[str, float] = {}
    stack: list[tuple[Any, frozenset[str]]] = [(root, frozenset())]
    while stack:
        frame, above = stack.pop()
        name = f"{frame.function}  {frame.file_path_short or '?'}:{frame.line_no or ''}"
        # pyinstrument records a frame's own samples as a synthetic "[self]" child.
        children = [c for c in frame.children if not c.is_synthetic]
        own[name] = own.get(name, 0.0) + frame.time - sum(c.time for c in children)
        if name not in above:
            incl[name] = incl.get(name, 0.0) + frame.time
        path = above | {name}
        stack.extend((child, path) for child in children)
    total = root.time or 1.0
    rows = [f"{'self s':>8} {'self %':>7} {'incl s':>8}  function  location"]
    for name, t in sorted(own.items(), key=lambda i: -i[1])[:lines]:
        rows.append(f"{t:8.3f} {100 * t / total:6.1f}% {incl[name]:8.3f}  {name}")
    return rows


def _head(text: str, lines: int) -> list[str]:
    kept = text.splitlines()
    return kept[:lines] + (
        [f"... {len(kept) - lines} more lines"] if len(kept) > lines else []
    )
