"""`strata backfill`: import a legacy export as a resumable job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from strata.commands._common import JsonOpt, emit, progress_bar, run, settings
from strata.config import Settings

_PHASES = {
    "catch-up": "projecting earlier events",
    "publish": "reading and publishing records",
    "project": "projecting the new events",
    "verify": "reading records back",
}


def backfill_cmd(
    from_dir: Annotated[
        Path,
        typer.Option(
            "--from-dir",
            help="The export: records/<key>__<class>.json files and *.jsonl files.",
        ),
    ],
    tenant: Annotated[
        str | None,
        typer.Option(help="Tenant of records whose meta has no tenant_id."),
    ] = None,
    source: Annotated[
        str,
        typer.Option(help="Name of the legacy system; part of every event id."),
    ] = "legacy",
    agent: Annotated[str, typer.Option(help="Agent named on the events.")] = "backfill",
    max_rate: Annotated[
        float | None,
        typer.Option("--max-rate", help="Publish at most this many records a second."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write the report here (default: the data dir's jobs/)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import legacy records; a killed run resumes when run again.

    Exit status 1 when a record failed or does not read back as its source.
    """
    from producers.backfill import run_backfill
    from strata.validation import check_tenant, check_text

    if tenant is not None:
        check_tenant(tenant)
    check_text("--source", source)
    cfg = settings()
    options: dict[str, Any] = {
        "tenant": tenant,
        "source": source,
        "agent": agent,
        "max_rate": max_rate,
        "report_path": report,
    }
    if sys.stderr.isatty():
        result = _with_progress(cfg, from_dir, options)
    else:
        result = run(run_backfill(cfg, from_dir, **options)).to_dict()

    def human() -> None:
        print(
            f"migrated {result['migrated']}, skipped {result['skipped']}, "
            f"mismatched {result['mismatched']}, failed {result['failed']} "
            f"in {result['seconds']}s; report: {result['report_file']}"
        )
        for error in result["errors"]:
            line = f":{error['line']}" if error["line"] is not None else ""
            print(f"  {error['path']}{line}: {error['kind']}: {error['reason']}")

    emit(as_json, result, human)
    if result["failed"] or result["mismatched"]:
        raise typer.Exit(1)


def _with_progress(
    cfg: Settings, from_dir: Path, options: dict[str, Any]
) -> dict[str, Any]:
    from rich.progress import (
        TaskID,
    )

    from producers.backfill import BackfillProgress, run_backfill

    bar = progress_bar()
    tasks: dict[str, TaskID] = {}

    def show(step: BackfillProgress) -> None:
        if step.phase not in tasks:
            tasks[step.phase] = bar.add_task(_PHASES.get(step.phase, step.phase))
        bar.update(tasks[step.phase], completed=step.done, total=step.total)

    with bar:
        report = run(run_backfill(cfg, from_dir, on_progress=show, **options))
    return report.to_dict()


def register(app: typer.Typer) -> None:
    """Add `strata backfill` to the command."""
    app.command("backfill")(backfill_cmd)
