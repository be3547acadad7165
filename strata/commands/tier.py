"""`strata tier`: apply the aging policy, and inspect, verify and compact L3."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from strata.commands._common import JsonOpt, emit, run, say, store_settings
from strata.errors import UsageError

tier_app = typer.Typer(
    no_args_is_help=True, help="Tiers: aging and promotion, the L3 archive."
)


def parse_time_ms(text: str) -> int:
    """UTC milliseconds from an integer or an ISO 8601 time (UTC if no zone).

    Raises:
        UsageError: neither.
    """
    try:
        value = int(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"--now {text!r}: expected UTC milliseconds or an ISO 8601 time"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        value = int(parsed.timestamp() * 1000)
    if value < 0:
        raise UsageError(f"--now {text!r}: before 1970")
    return value


@tier_app.command("run")
def tier_run_cmd(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Decide and report; publish nothing.")
    ] = False,
    now: Annotated[
        str | None,
        typer.Option(
            "--now",
            help="Evaluate as if at this time (UTC ms or ISO 8601), e.g. to preview.",
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait until a worker has applied the moves."),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait may take.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Apply the aging policy: publish a tier move for each record that is due."""
    from producers.tiering import TieringJob, wall_clock_ms

    at_ms = parse_time_ms(now) if now is not None else None
    job = TieringJob(
        store_settings(), clock=(lambda: at_ms) if at_ms is not None else wall_clock_ms
    )

    async def go() -> dict[str, Any]:
        report = await job.run(dry_run=dry_run)
        if wait and report.published:
            say(f"waiting for a worker to apply {report.published} moves")
            await job.wait_applied(report, timeout_s=timeout)
        return report.to_dict()

    obj = run(go())
    verb = "would move" if dry_run else "moved"
    emit(
        as_json,
        obj,
        lambda: print(
            f"evaluated {obj['evaluated']} records: {verb} {obj['demoted']} to L3, "
            f"{obj['promoted']} back to L2"
            + (" (limit reached; run again)" if obj["truncated"] else "")
        ),
    )


@tier_app.command("status")
def tier_status_cmd(as_json: JsonOpt = False) -> None:
    """Records per tier, and what the L3 archive holds."""
    from projections.l2 import L2Reader
    from projections.l3 import L3Reader
    from strata.paths import StorePaths

    paths = StorePaths(store_settings().data_dir)
    l2, l3 = L2Reader(paths.l2_db), L3Reader(paths.l3)
    try:
        counts = l2.counts()
        stats = l3.stats()
        checkpoints = l3.checkpoints()
    finally:
        l2.close()
        l3.close()
    obj = {
        "tiers": {"l2": counts.get("l2", 0), "l3": counts.get("l3", 0)},
        "l3": stats.to_dict(),
        "checkpoints": {str(p): o for p, o in sorted(checkpoints.items())},
    }
    emit(
        as_json,
        obj,
        lambda: print(
            f"l2: {obj['tiers']['l2']} records, l3: {obj['tiers']['l3']} records\n"
            f"archive: {stats.segments} segments ({stats.sealed} sealed), "
            f"{stats.bytes} bytes, {stats.dead_bytes} dead"
        ),
    )


@tier_app.command("verify")
def tier_verify_cmd(as_json: JsonOpt = False) -> None:
    """Check every L3 segment and frame against its checksums; exit 1 on damage."""
    from projections.l3 import verify_l3
    from strata.paths import StorePaths

    report = verify_l3(StorePaths(store_settings().data_dir).l3)
    emit(
        as_json,
        report.to_dict(),
        lambda: print(
            f"L3 {'verified' if report.ok else 'FAILED'}: {report.entries} records "
            f"in {report.segments} segments"
            + "".join(f"\n  {finding}" for finding in report.findings)
        ),
    )
    if not report.ok:
        raise typer.Exit(1)


@tier_app.command("compact")
def tier_compact_cmd(as_json: JsonOpt = False) -> None:
    """Rewrite L3 segments that are mostly dead or hold an erased tenant's data."""
    from projections.l3 import L3Options, L3Projection, L3Reader
    from strata.paths import StorePaths

    config = store_settings()
    paths = StorePaths(config.data_dir)
    reader = L3Reader(paths.l3)
    try:
        partitions = sorted(reader.checkpoints())
    finally:
        reader.close()
    projection = L3Projection(paths, L3Options.from_settings(config))

    async def go() -> tuple[int, int]:
        segments = reclaimed = 0
        for partition in partitions:
            done, freed = await projection.compact(partition)
            segments, reclaimed = segments + done, reclaimed + freed
        return segments, reclaimed

    try:
        segments, reclaimed = run(go())
    finally:
        projection.close()
    obj = {"segments": segments, "reclaimed_bytes": reclaimed}
    emit(
        as_json,
        obj,
        lambda: print(f"compacted {segments} segments, reclaimed {reclaimed} bytes"),
    )


def register(app: typer.Typer) -> None:
    """Add `strata tier` to the command."""
    app.add_typer(tier_app, name="tier")
