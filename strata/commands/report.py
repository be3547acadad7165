"""`strata report`: governance artifacts, as JSON and Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from strata.commands._common import JsonOpt, emit, run, settings


def report_cmd(
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder to write report.json and report.md to."),
    ],
    step_timeout: Annotated[
        float,
        typer.Option(
            "--step-timeout", min=0.1, help="Seconds each step of the report may take."
        ),
    ] = 60.0,
    max_lag: Annotated[
        int,
        typer.Option(
            "--max-lag", min=0, help="Events projections may be behind and still pass."
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write the governance report; exit 1 when any of its checks fails."""
    from strata.report import build_report, write_report

    report = run(build_report(settings(), step_timeout_s=step_timeout, max_lag=max_lag))
    json_path, md_path = write_report(report, out)
    failed = [c for c in report.checks if not c.ok]
    obj = {
        "ok": report.ok,
        "json": str(json_path),
        "markdown": str(md_path),
        "checks": [c.to_dict() for c in report.checks],
        "failed": [c.name for c in failed],
    }

    def human() -> None:
        verdict = "passed" if report.ok else "FAILED"
        print(f"report {verdict}: {json_path} and {md_path}")
        for check in failed:
            print(f"  {check.name}: {check.reason}")

    emit(as_json, obj, human)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `strata report` to the command."""
    app.command("report")(report_cmd)
