"""`strata schemas`: keep every published event version readable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from strata.commands._common import JsonOpt, emit

schemas_app = typer.Typer(no_args_is_help=True, help="Event schema evolution.")

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="The schema folder (default: the installed schemas)."),
]
LockOpt = Annotated[
    Path | None,
    typer.Option(
        "--lock", help="The lock of published versions (default: DIR/lock.json)."
    ),
]


@schemas_app.command("check")
def schemas_check_cmd(
    directory: DirOpt = None,
    lock: LockOpt = None,
    golden: Annotated[
        Path | None,
        typer.Option(help="Also decode the golden events in this folder."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse schema changes that would leave a published event unreadable.

    Exit status 1 names each field at fault.
    """
    from schemas.check import check_golden, check_schemas
    from schemas.codec import SCHEMA_DIR, SchemaRegistry

    folder = directory or SCHEMA_DIR
    report = check_schemas(folder, lock or folder / "lock.json")
    if golden is not None:
        report.findings.extend(check_golden(golden, SchemaRegistry(folder)))
    obj = report.to_dict()

    def human() -> None:
        versions = len(report.versions)
        if report.ok:
            print(f"{versions} schema versions: every published event stays readable")
        for finding in report.findings:
            print(finding)
        if report.unlocked:
            print(
                "not yet locked (run `strata schemas lock` when publishing): "
                + ", ".join(report.unlocked)
            )

    emit(as_json, obj, human)
    if not report.ok:
        raise typer.Exit(1)


@schemas_app.command("lock")
def schemas_lock_cmd(
    directory: DirOpt = None, lock: LockOpt = None, as_json: JsonOpt = False
) -> None:
    """Record new schema versions as published, once they pass the check."""
    from schemas.check import lock_new_versions
    from schemas.codec import SCHEMA_DIR

    folder = directory or SCHEMA_DIR
    added = lock_new_versions(folder, lock or folder / "lock.json")
    emit(
        as_json,
        {"locked": added},
        lambda: print("\n".join(f"locked {a}" for a in added) or "nothing new to lock"),
    )


def register(app: typer.Typer) -> None:
    """Add `strata schemas` to the command."""
    app.add_typer(schemas_app, name="schemas")
