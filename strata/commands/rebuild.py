"""`strata rebuild`: replay the memory topic from offset 0 into projections."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from strata.commands._common import (
    JsonOpt,
    emit,
    progress_bar,
    run,
    store_settings,
)
from strata.config import Settings
from strata.errors import UsageError
from strata.paths import StorePaths, store_id

PROJECTIONS = ("l2", "ledger", "l3")


def _drop(paths: StorePaths, name: str) -> None:
    """Remove one projection's files so the next replay rebuilds it."""
    if name == "l2":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{paths.l2_db}{suffix}").unlink(missing_ok=True)
    elif name == "ledger":
        shutil.rmtree(paths.ledger, ignore_errors=True)
    elif name == "l3":
        shutil.rmtree(paths.l3, ignore_errors=True)


async def _preflight(source: Settings) -> None:
    """Fail before anything is dropped if the replay could not run."""
    from strata.kafka import end_offsets
    from strata.keystore import open_keystore

    await end_offsets(source, [source.memory_topic])
    open_keystore(source).tenants()


def _refuse_if_workers_run(paths: StorePaths) -> None:
    from strata.status import read_worker_states

    alive = [w for w in read_worker_states(paths) if w["alive"]]
    if alive:
        pids = ", ".join(str(w["pid"]) for w in alive)
        raise UsageError(
            f"workers are running on {paths.root} (pids {pids}); stop them before "
            "rebuilding in place, or rebuild into a fresh --data-dir"
        )


async def rebuild(
    source: Settings, target: Settings, *, show_progress: bool
) -> dict[str, Any]:
    """Replay the topic from offset 0 into ``target``'s data dir until caught up.

    The keystore of ``source`` is used, so key versions resolve as they do live.
    Poison events are not dead-lettered again: the live worker already did.
    """
    from consumers.worker import Worker
    from projections.l2 import known_store_id
    from projections.registry import digests
    from strata.kafka import end_offsets
    from strata.keystore import open_keystore

    keystore = open_keystore(source)
    # A copy of the source's store honours the same dead-letter decisions.
    # Nothing is made in the source: a source with no id yet has made none.
    source_store = known_store_id(StorePaths(source.data_dir))
    if source_store is not None:
        store_id(StorePaths(target.data_dir), adopt=source_store)
    ends = await end_offsets(source, [source.memory_topic])
    total = sum(ends.values())
    worker = Worker(
        target,
        group=f"{target.topic_prefix}.rebuild.{uuid.uuid4().hex[:8]}",
        keystore=keystore,
        until_caught_up=True,
        dead_letters=False,
    )
    began = time.monotonic()
    task = asyncio.create_task(worker.run())
    if show_progress:
        with progress_bar() as bar:
            job = bar.add_task("rebuilding", total=total)
            while not task.done():
                bar.update(job, completed=worker.report.events_seen)
                await asyncio.wait({task}, timeout=0.2)
    report = await task
    seconds = time.monotonic() - began
    return {
        "events": report.events_seen,
        "applied": report.events_applied,
        "poison_skipped": report.dead_letters,
        "seconds": round(seconds, 3),
        "events_per_s": round(report.events_seen / seconds, 1) if seconds else 0.0,
        "data_dir": str(target.data_dir),
        "projections": digests(StorePaths(target.data_dir)),
    }


def rebuild_cmd(
    projection: Annotated[
        str | None,
        typer.Option(
            help=f"Rebuild only this projection ({', '.join(PROJECTIONS)}) in place."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Rebuild every projection into this fresh folder."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the memory topic from offset 0 into projections, with progress."""
    source = store_settings()
    if projection is not None and projection not in PROJECTIONS:
        raise UsageError(
            f"--projection {projection!r}: choose one of {', '.join(PROJECTIONS)}"
        )
    if data_dir is not None:
        if projection is not None:
            raise UsageError("--projection and --data-dir do not go together")
        target_paths = StorePaths(data_dir)
        if target_paths.l2_db.exists() or target_paths.ledger.exists():
            raise UsageError(
                f"--data-dir {data_dir} already holds projections; give a fresh one"
            )
        # The broker is the source's, wherever it was found (setting or record).
        from strata.kafka import bootstrap_of

        target = source.model_copy(
            update={"data_dir": data_dir, "kafka_bootstrap": bootstrap_of(source)}
        )
    else:
        paths = StorePaths(source.data_dir)
        _refuse_if_workers_run(paths)
        # Nothing is dropped until the broker answers and the keystore reads.
        run(_preflight(source))
        for name in [projection] if projection else PROJECTIONS:
            _drop(paths, name)
        target = source
    result = run(
        rebuild(source, target, show_progress=sys.stderr.isatty() and not as_json)
    )
    emit(
        as_json,
        result,
        lambda: print(
            f"rebuilt {result['events']} events into {result['data_dir']} in "
            f"{result['seconds']}s ({result['events_per_s']}/s)"
            + "".join(f"\n{n}\t{d}" for n, d in result["projections"].items())
        ),
    )


def register(app: typer.Typer) -> None:
    """Add `strata rebuild` to the command."""
    app.command("rebuild")(rebuild_cmd)
