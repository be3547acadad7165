"""`strata dlq`: the dead-letter topic."""

from __future__ import annotations

import typer

from strata.commands._common import JsonOpt, emit, run, settings, store_settings

dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter topic.")


@dlq_app.command("list")
def dlq_list_cmd(as_json: JsonOpt = False) -> None:
    """Show the dead letters, why and where each came from."""
    from consumers.dlq import read_dead_letters

    letters = run(read_dead_letters(settings()))
    obj = {"count": len(letters), "messages": [d.to_dict() for d in letters]}
    emit(
        as_json,
        obj,
        lambda: print(
            "\n".join(
                f"{d.source_topic}[{d.source_partition}]@{d.source_offset}: {d.error_class}: {d.error_message}"
                for d in letters
            )
            or "no dead letters"
        ),
    )


@dlq_app.command("replay")
def dlq_replay_cmd(as_json: JsonOpt = False) -> None:
    """Send back every dead letter that now applies; keep and explain the rest."""
    from consumers.dlq import replay_dead_letters
    from strata.keystore import open_keystore

    cfg = store_settings()  # letters are judged with this data dir's keys
    keystore = open_keystore(cfg)
    from projections.l2 import known_store_id
    from strata.paths import StorePaths

    store = known_store_id(StorePaths(cfg.data_dir))
    result = run(replay_dead_letters(cfg, keystore, store=store))
    emit(
        as_json,
        result,
        lambda: print(
            f"replayed {result['replayed']} of {result['count']} dead letters; "
            f"{result['still_failing']} still fail"
            + (
                f"; {result['other_stores']} of other stores left to them"
                if result["other_stores"]
                else ""
            )
            + "".join(
                f"\n  {e['source']['topic']}[{e['source']['partition']}]"
                f"@{e['source']['offset']}: {e['error_class']}: {e['error_message']}"
                for e in result["errors"]
            )
        ),
    )


def register(app: typer.Typer) -> None:
    """Add `strata dlq` to the command."""
    app.add_typer(dlq_app, name="dlq")
