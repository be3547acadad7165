"""`strata migrate`: build a projection version beside the live one, compare, switch."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from strata.commands._common import JsonOpt, emit, progress_bar, run, store_settings
from strata.config import Settings

_STAGES = {
    "build": "replaying into the shadow",
    "cutover": "catching up for cutover",
    "rollback": "catching up for rollback",
}


def migrate_cmd(
    projection: Annotated[str, typer.Option(help="The projection: l2.")],
    version: Annotated[
        int, typer.Option(help="The shadow version to build or switch.")
    ],
    cutover: Annotated[
        bool, typer.Option("--cutover", help="Switch reads to it once caught up.")
    ] = False,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback", help="Switch reads from it back to the one it replaced."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Cut over even though the versions differ.")
    ] = False,
    wait_live: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for a lagging live version before comparing."
        ),
    ] = 30.0,
    lock_timeout: Annotated[
        float,
        typer.Option(help="Longest the live version's writers are held at a switch."),
    ] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Shadow-migrate a projection while the live one keeps serving.

    Exit status 1 when the versions differ or a switch is refused.
    """
    from consumers.migrate import run_migration

    cfg = store_settings()
    options: dict[str, Any] = {
        "cutover": cutover,
        "rollback": rollback,
        "force": force,
        "wait_live_s": wait_live,
        "lock_timeout_s": lock_timeout,
    }
    if sys.stderr.isatty():
        result = _with_progress(cfg, projection, version, options)
    else:
        result = run(run_migration(cfg, projection, version, **options)).to_dict()
    emit(as_json, result, lambda: _human(result))
    if not result["ok"]:
        raise typer.Exit(1)


def _human(result: dict[str, Any]) -> None:
    build, diff, switch = result["build"], result["diff"], result["switch"]
    if build:
        print(
            f"shadow v{result['version']}: replayed {build['records']} events in "
            f"{build['seconds']}s ({build['records_per_s']}/s)"
        )
    if diff:
        print(
            f"compared {diff['compared']} records: {diff['only_live']} only live, "
            f"{diff['only_shadow']} only in the shadow, {diff['differing']} differ"
        )
        for kind, names in diff["examples"].items():
            for name in names:
                print(f"  {kind}: {name}")
    if switch:
        print(
            f"reads switched from v{switch['from_version']} to v{switch['to_version']} "
            f"(writers held {switch['lock_held_s']}s)"
        )
    if result["refused"]:
        print(f"not switched: {result['refused']}")
    print(f"live version of {result['projection']}: v{result['live_version']}")


def _with_progress(
    cfg: Settings, projection: str, version: int, options: dict[str, Any]
) -> dict[str, Any]:
    from rich.progress import (
        TaskID,
        TextColumn,
    )

    from consumers.migrate import run_migration
    from consumers.replay import ReplayProgress

    bar = progress_bar(TextColumn("{task.fields[rate]:>9.0f} events/s"))
    tasks: dict[str, TaskID] = {}

    def show(stage: str, step: ReplayProgress) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(_STAGES.get(stage, stage), rate=0.0)
        bar.update(tasks[stage], completed=step.done, total=step.total, rate=step.rate)

    with bar:
        report = run(
            run_migration(cfg, projection, version, on_progress=show, **options)
        )
    return report.to_dict()


def register(app: typer.Typer) -> None:
    """Add `strata migrate` to the command."""
    app.command("migrate")(migrate_cmd)
