"""`strata ledger`: verify the audit ledger, prove entries, check proofs offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from strata.commands._common import JsonOpt, emit, settings, store_settings
from strata.errors import KeyUnavailableError, UsageError

if TYPE_CHECKING:
    from projections.ledger import VerifyReport
    from strata.signing import LedgerPublicKey

ledger_app = typer.Typer(
    no_args_is_help=True,
    help="The audit ledger: verify it, prove entries, check proofs.",
)

OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Write the proof to this file instead of stdout."),
]


def _paths() -> Any:
    from strata.paths import StorePaths

    return StorePaths(store_settings().data_dir)


def _write_out(path: Path, doc: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
    except OSError as exc:
        raise UsageError(f"--out {path}: {exc.strerror}") from exc


def _print_report(report: VerifyReport) -> None:
    from projections.ledger_findings import count

    state = "verified" if report.ok else "FAILED"
    print(
        f"ledger {state}: {count(report.entries, 'entry', 'entries')} in "
        f"{count(report.partitions, 'partition', 'partitions')} "
        f"({report.seconds:.2f}s)"
    )
    for s in report.summaries:
        if s.signed is not None:
            signed = f"signed up to {s.signed.size}"
        elif s.signed_checkpoints:
            signed = "no signed checkpoint matches"
        else:
            signed = "not signed yet"
        print(
            f"  partition {s.partition}: {count(s.entries, 'entry', 'entries')}, "
            f"{signed}, root {s.root}"
        )
        if s.uncommitted:
            print(
                f"    and {count(s.uncommitted, 'line', 'lines')} past its "
                "checkpoint, not part of the ledger: written by a worker that has "
                "not recorded its checkpoint yet, or stopped before it did (its "
                "next start moves them to ledger/discarded/)"
            )
    for f in report.findings:
        where = f"entry {f.entry}" if f.entry is not None else "-"
        print(f"  FINDING partition {f.partition} {where} [{f.kind}]: {f.problem}")


@ledger_app.command("verify")
def ledger_verify_cmd(as_json: JsonOpt = False) -> None:
    """Check every chain, checkpoint, signed root and signature; exit 1 on any finding."""
    from projections.ledger import verify_ledger

    paths = _paths()
    report = verify_ledger(paths.ledger)
    report.findings.extend(_missing_partitions(paths, report))
    emit(as_json, report.to_dict(), lambda: _print_report(report))
    if not report.ok:
        raise typer.Exit(1)


def _missing_partitions(paths: Any, report: Any) -> list[Any]:
    """Partitions L2 has applied events of but the ledger has no file for.

    A ledger alone cannot tell a deleted partition from one that never had
    an event; L2's checkpoints can.
    """
    from projections.l2 import L2Reader
    from projections.ledger import partitions_in
    from projections.ledger_findings import Finding

    present = set(partitions_in(paths.ledger)) if paths.ledger.exists() else set()
    l2 = L2Reader(paths.l2_db)
    try:
        applied = l2.checkpoints()
    finally:
        l2.close()
    return [
        Finding(
            partition,
            0,
            f"no ledger for this partition, though L2 applied its events up to "
            f"offset {offset}: the partition's files were deleted",
            kind="deleted",
        )
        for partition, offset in sorted(applied.items())
        if offset > 0 and partition not in present
    ]


def _parse_at(at: str | None) -> tuple[int, int] | None:
    if at is None:
        return None
    partition, sep, entry = at.partition(":")
    if not sep or not partition.isdigit() or not entry.isdigit():
        raise UsageError(f"--at {at!r}: expected PARTITION:ENTRY")
    return int(partition), int(entry)


@ledger_app.command("prove")
def ledger_prove_cmd(
    event_id: str,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", help="PARTITION:ENTRY, when the event id has several entries."
        ),
    ] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an inclusion proof of an event's entry against the latest signed checkpoint."""
    from projections.ledger_proofs import prove_event

    doc = prove_event(_paths().ledger, event_id, _parse_at(at))
    if out is None:
        emit(True, doc)
        return
    _write_out(out, doc)
    summary = {
        "written": str(out),
        "partition": doc["partition"],
        "entry": doc["entry"],
        "size": doc["checkpoint"]["size"],
        "root": doc["checkpoint"]["root"],
    }
    emit(
        as_json,
        summary,
        lambda: print(
            f"proof of entry {doc['entry']} of partition {doc['partition']} against "
            f"the signed root of {summary['size']} entries written to {out}"
        ),
    )


@ledger_app.command("prove-consistency")
def ledger_prove_consistency_cmd(
    partition: int,
    from_size: Annotated[
        int | None,
        typer.Option("--from-size", help="Size of the earlier signed checkpoint."),
    ] = None,
    to_size: Annotated[
        int | None,
        typer.Option("--to-size", help="Size of the later one (default: the latest)."),
    ] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a proof that a later signed checkpoint only extends an earlier one."""
    from projections.ledger_proofs import consistency_proof_doc

    doc = consistency_proof_doc(_paths().ledger, partition, from_size, to_size)
    if out is None:
        emit(True, doc)
        return
    _write_out(out, doc)
    first, second = doc["first"]["size"], doc["second"]["size"]
    emit(
        as_json,
        {"written": str(out), "partition": partition, "first": first, "second": second},
        lambda: print(f"consistency proof {first} -> {second} written to {out}"),
    )


def _public_key(path: Path | None) -> LedgerPublicKey:
    from strata.signing import LedgerPublicKey, load_public_key

    if path is not None:
        try:
            return LedgerPublicKey.from_pem(path.read_bytes())
        except OSError as exc:
            raise UsageError(f"--public-key {path}: {exc.strerror}") from exc
        except ValueError as exc:
            # The library's own words point at its FAQ; ours say what to give.
            raise UsageError(
                f"--public-key {path}: not a PEM Ed25519 public key "
                "(export one with `strata ledger public-key --out FILE`)"
            ) from exc
    keys = _paths().keys
    try:
        return load_public_key(keys)
    except KeyUnavailableError as exc:
        raise UsageError(f"{exc}; give the key with --public-key FILE") from exc


def _read_proof(file: Path) -> Any:
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        return json.loads(text)
    except OSError as exc:
        raise UsageError(f"{file}: {exc.strerror}") from exc
    except RecursionError:
        raise UsageError(f"{file}: not a ledger proof (nested too deeply)") from None
    except ValueError as exc:
        raise UsageError(f"{file}: not JSON ({exc})") from exc


@ledger_app.command("check-proof")
def ledger_check_proof_cmd(
    file: Annotated[Path, typer.Argument(help="The proof, or '-' for standard input.")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="PEM public key (from `strata ledger public-key`); default: "
            "this data dir's.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an inclusion or consistency proof with the public key alone; exit 1 if it fails."""
    from projections.ledger_proofs import check_proof

    doc = _read_proof(file)
    result = check_proof(doc, _public_key(public_key))

    def human() -> None:
        what = "holds" if result.ok else "FAILS"
        print(f"{result.kind} proof {what}")
        for key, value in result.details.items():
            print(f"  {key}: {value}")
        for problem in result.problems:
            print(f"  PROBLEM: {problem}")

    emit(as_json, result.to_dict(), human)
    if not result.ok:
        raise typer.Exit(1)


@ledger_app.command("public-key")
def ledger_public_key_cmd(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Write the PEM to this file instead of printing it."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the ledger's Ed25519 public key (PEM), creating the key pair if needed.

    A key pair is created only for a ledger that has no signed checkpoint:
    where one was signed, a lost key file is refused, not replaced.
    """
    from projections.ledger import LedgerProjection
    from strata.paths import StorePaths
    from strata.signing import load_public_key

    # A key pair may be made before any ledger exists, to hand out first.
    cfg = settings()
    paths = StorePaths(cfg.data_dir)
    try:
        key = load_public_key(paths.keys)
    except KeyUnavailableError:
        key = LedgerProjection(paths.ledger, settings=cfg).signer().public_key
    pem = key.pem()
    if out is not None:
        try:
            out.write_text(pem)
        except OSError as exc:
            raise UsageError(f"--out {out}: {exc.strerror}") from exc

    def human() -> None:
        if out is None:
            print(pem, end="")
        else:
            print(f"ledger public key {key.key_id} written to {out}")

    emit(as_json, {"algorithm": "Ed25519", "key_id": key.key_id, "pem": pem}, human)


@ledger_app.command("sign")
def ledger_sign_cmd(as_json: JsonOpt = False) -> None:
    """Sign a checkpoint now for every partition with unsigned entries."""
    from projections.ledger import LedgerProjection, partitions_in

    cfg = store_settings()
    ledger = LedgerProjection(_paths().ledger, settings=cfg)
    ledger.check_signer()
    signed = []
    for partition in partitions_in(ledger.directory):
        head = ledger.sign_now(partition)
        if head is not None:
            signed.append(
                {"partition": partition, "size": head.size, "root": head.root.hex()}
            )
    emit(
        as_json,
        {"signed": signed},
        lambda: print(
            "\n".join(
                f"partition {s['partition']}: signed {s['size']} entries, root {s['root']}"
                for s in signed
            )
            or "every entry was already signed"
        ),
    )


def register(app: typer.Typer) -> None:
    """Add `strata ledger` to the command."""
    app.add_typer(ledger_app, name="ledger")
