"""`strata ledger`: verify the audit ledger."""

from __future__ import annotations

import typer

from strata.commands._common import JsonOpt, emit, settings

ledger_app = typer.Typer(no_args_is_help=True, help="The audit ledger.")


@ledger_app.command("verify")
def ledger_verify_cmd(as_json: JsonOpt = False) -> None:
    """Check every partition's chain; exit 1 on any finding."""
    from projections.ledger import verify_ledger
    from strata.paths import StorePaths

    report = verify_ledger(StorePaths(settings().data_dir).ledger)
    obj = {
        "ok": report.ok,
        "entries": report.entries,
        "partitions": report.partitions,
        "findings": [f.to_dict() for f in report.findings],
    }
    emit(
        as_json,
        obj,
        lambda: print(
            f"ledger {'verified' if report.ok else 'FAILED'}: {report.entries} entries in "
            f"{report.partitions} partitions"
            + "".join(
                f"\n  partition {f.partition} entry {f.entry}: {f.problem}"
                for f in report.findings
            )
        ),
    )
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `strata ledger` to the command."""
    app.add_typer(ledger_app, name="ledger")
