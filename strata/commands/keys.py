"""`strata keys` (data keys: rotate, verify, retire, shred) and `strata kms serve`."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from strata.commands._common import (
    JsonOpt,
    emit,
    progress_bar,
    run,
    say,
    settings,
    store_settings,
)
from strata.errors import UsageError

keys_app = typer.Typer(
    no_args_is_help=True, help="Tenants' data keys: rotation, verification, erasure."
)
kms_app = typer.Typer(no_args_is_help=True, help="A local Vault-transit-like KMS.")

TenantOpt = Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")]
WaitOpt = Annotated[
    float, typer.Option(min=0, help="Seconds to wait for stores to catch up.")
]


def _keyring() -> Any:
    from strata.keystore import open_keystore

    return open_keystore(store_settings())


@keys_app.command("list")
def keys_list_cmd(tenant: TenantOpt = None, as_json: JsonOpt = False) -> None:
    """Every tenant's key versions: state, primary, encryptions used.

    Refuses a damaged keystore, or one lacking entries the KMS holds keys
    for, as reads and writes do; it does not call the KMS to unwrap keys.
    """
    from strata.validation import check_tenant

    if tenant is not None:
        check_tenant(tenant)
    keyring = _keyring()
    keyring.check()
    names = [tenant] if tenant else keyring.tenants()
    tenants = []
    for name in names:
        infos = keyring.versions(name)
        if not infos and not keyring.is_erased(name):
            raise UsageError(f"tenant {name!r} has no keys")
        tenants.append(
            {
                "tenant": name,
                "erased": keyring.is_erased(name),
                "versions": [
                    {
                        "version": i.version,
                        "state": i.state,
                        "primary": i.primary,
                        "encryptions": i.encryptions,
                        "cleared": i.cleared_ms is not None,
                        "created_ms": i.created_ms,
                    }
                    for i in infos
                ],
            }
        )

    def human() -> None:
        for t in tenants:
            flags = " (erased)" if t["erased"] else ""
            print(f"{t['tenant']}{flags}")
            for v in t["versions"]:
                mark = "*" if v["primary"] else " "
                print(
                    f"  {mark} v{v['version']:<4} {v['state']:<10} "
                    f"{v['encryptions']:>12} encryptions{'  cleared' if v['cleared'] else ''}"
                )

    emit(as_json, {"kms": keyring.kms.describe(), "tenants": tenants}, human)


@keys_app.command("rotate")
def keys_rotate_cmd(
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="Rotate this tenant (repeatable)."),
    ] = None,
    all_tenants: Annotated[
        bool, typer.Option("--all", help="Rotate every tenant not erased.")
    ] = False,
    reencrypt_only: Annotated[
        bool,
        typer.Option(
            "--reencrypt-only",
            help="Create no version; re-encrypt stragglers to the current primary.",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Records per recorded step.")
    ] = 500,
    wait: Annotated[
        float,
        typer.Option(min=0, help="Seconds to wait for L2 to catch up before starting."),
    ] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """New key versions, then re-encrypt what older ones sealed; rerun to resume."""
    from consumers.rotation import RotationJob

    if bool(tenant) == all_tenants:
        raise UsageError("give --tenant T (repeatable) or --all")
    cfg = store_settings()
    keyring = _keyring()
    show = sys.stderr.isatty() and not as_json

    async def go() -> dict[str, Any]:
        with progress_bar(disable=not show) as bar:
            task = bar.add_task("re-encrypting", total=None)

            def on_progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            job = RotationJob(
                cfg,
                keyring,
                tenants=None if all_tenants else tenant,
                reencrypt_only=reencrypt_only,
                batch_size=batch_size,
                l2_wait_s=wait,
                on_progress=on_progress,
            )
            report = await job.run()
        return report.to_dict()

    say("rotating keys (a rerun resumes an unfinished rotation)")
    result = run(go())
    counts = result["counts"]
    emit(
        as_json,
        result,
        lambda: print(
            f"{'resumed' if result['resumed'] else 'started'} {result['job_id']}: "
            + ", ".join(f"{t} -> v{v}" for t, v in result["tenants"].items())
            + f"\nre-encrypted {counts['reencrypted']}, already current {counts['current']}, "
            f"not live {counts['not_live']}; run `strata keys verify` once workers caught up"
        ),
    )


@keys_app.command("verify")
def keys_verify_cmd(
    tenant: TenantOpt = None,
    limit: Annotated[
        int, typer.Option(min=0, help="List at most this many records.")
    ] = 100,
    wait: WaitOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Prove no live record needs a non-primary key version; exit 1 if some do."""
    from consumers.rotation import verify_coverage

    report = run(
        verify_coverage(
            store_settings(), _keyring(), tenant=tenant, limit=limit, wait_s=wait
        )
    )
    obj = report.to_dict()

    def human() -> None:
        for b in report.behind:
            print(
                f"{b['tier']} partition {b['partition']} is at {b['checkpoint']} of "
                f"{b['end_offset']}: not a proof until workers catch up"
            )
        for f in report.findings:
            where = f"{f.key} v{f.version} at {f.position}" if f.key else f.tier
            print(f"{f.tenant}: {where}: {f.problem}")
        extra = report.findings_total - sum(1 for f in report.findings if f.key)
        if report.findings and extra > 0:
            print(f"... {report.findings_total} in all")
        print("keys verified" if report.ok else "keys NOT verified")

    emit(as_json, obj, human)
    if not report.ok:
        raise typer.Exit(1)


@keys_app.command("retire")
def keys_retire_cmd(
    tenant: TenantOpt = None,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="Only this version.")
    ] = None,
    wait: WaitOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Destroy old key versions that `keys verify` cleared; exit 1 if any is refused."""
    from consumers.rotation import retire_versions

    report = run(
        retire_versions(
            store_settings(), _keyring(), tenant=tenant, version=version, wait_s=wait
        )
    )

    def human() -> None:
        for r in report.retired:
            print(f"retired {r['tenant']} v{r['version']}")
        for r in report.refused:
            print(f"refused {r['tenant']} v{r['version']}: {r['reason']}")
        if not report.retired and not report.refused:
            print("nothing to retire")

    emit(as_json, report.to_dict(), human)
    if report.refused:
        first = report.refused[0]
        sys.stderr.write(
            f"strata: {first['tenant']} v{first['version']} not retired: {first['reason']}\n"
        )
        raise typer.Exit(1)


@keys_app.command("rollback")
def keys_rollback_cmd(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant.")],
    to: Annotated[
        int | None,
        typer.Option(
            "--to", min=1, help="Make this version primary (default: the one before)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Switch new writes back to an earlier, unretired version: nothing is lost."""
    from strata.validation import check_tenant

    check_tenant(tenant)
    keyring = _keyring()
    infos = keyring.versions(tenant)
    current = next((i.version for i in infos if i.primary), None)
    if current is None:
        raise UsageError(f"tenant {tenant!r} has no usable keys")
    if to is None:
        earlier = [
            i.version for i in infos if i.version < current and i.state == "active"
        ]
        if not earlier:
            raise UsageError(
                f"tenant {tenant!r} has no active version before v{current}"
            )
        to = earlier[-1]
    keyring.set_primary(tenant, to)
    emit(
        as_json,
        {"tenant": tenant, "primary": to, "previous": current},
        lambda: print(f"{tenant}: new writes use v{to} (was v{current})"),
    )


@keys_app.command("shred")
def keys_shred_cmd(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant to erase.")],
    wait: Annotated[
        float,
        typer.Option(min=0, help="Seconds to wait for L2 to purge, to confirm it."),
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Erase a tenant: destroy its keys, purge its records; print the receipt."""
    from strata.erasure import erase_tenant

    receipt = run(
        erase_tenant(store_settings(), _keyring(), tenant, wait_s=wait)
    ).to_dict()

    def human() -> None:
        purged = receipt["records_purged"]
        print(
            f"erased {receipt['tenant']} at {receipt['erased_at']} ({receipt['erasure_id']})"
        )
        print(
            f"  key versions destroyed: {receipt['key_versions_destroyed']} "
            f"(KMS {receipt['kms']}: "
            f"{'key deleted' if receipt['kms_key_deleted'] else 'key NOT deleted yet'})"
        )
        print(
            f"  records held when the keys were destroyed: l2 {purged['l2']}, "
            f"l3 {purged['l3']}, l1 dropped by every worker; payloads "
            f"{receipt['payloads_purged']}"
        )
        if receipt["purge_confirmed"]:
            confirmed = "L2 has applied them and holds nothing of the tenant"
        elif receipt["remaining"]:
            confirmed = f"L2 still holds {receipt['remaining']}"
        else:
            confirmed = "not yet applied by L2 (--wait SECONDS waits for it)"
        print(f"  markers on {len(receipt['events'])} partitions: {confirmed}")

    emit(as_json, receipt, human)
    if not receipt["kms_key_deleted"]:
        from strata.errors import KmsUnavailableError

        raise KmsUnavailableError(
            f"{tenant}: keys destroyed here and records being purged, but the KMS "
            f"key is not deleted yet; run `strata keys shred --tenant {tenant}` again"
        )


@keys_app.command("jobs")
def keys_jobs_cmd(as_json: JsonOpt = False) -> None:
    """Rotation jobs on the jobs topic and how far each got."""
    from consumers.rotation import read_rotation_jobs

    jobs = run(read_rotation_jobs(store_settings()))
    items: list[dict[str, Any]] = [
        {
            "job_id": j.job_id,
            "state": j.state,
            "tenants": j.versions,
            "done": sum(min(j.next_offsets.get(p, 0), t) for p, t in j.targets.items()),
            "total": sum(j.targets.values()),
            "counts": j.counts,
        }
        for j in jobs.values()
    ]
    emit(
        as_json,
        {"jobs": items},
        lambda: print(
            "\n".join(
                f"{j['job_id']}  {j['state']:<10} {j['done']}/{j['total']}  "
                + ", ".join(f"{t}->v{v}" for t, v in j["tenants"].items())
                for j in items
            )
            or "no rotation jobs"
        ),
    )


@kms_app.command("serve")
def kms_serve_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any).")] = 8200,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where the KMS keeps its keys (default DATA_DIR/kms)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve a Vault-transit-like KMS over HTTP until interrupted (development)."""
    from strata.kms import KmsServer, LocalKms

    cfg = settings()
    folder = directory or cfg.data_dir / "kms"
    master = cfg.master_key_file or folder / "master.key"
    token = cfg.kms_token.get_secret_value() if cfg.kms_token else None
    server = KmsServer(LocalKms(folder, master), host=host, port=port, token=token)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        emit(
            as_json,
            {
                "url": server.url,
                "dir": str(folder),
                "token_required": token is not None,
            },
            lambda: print(f"KMS at {server.url} (keys in {folder}); Ctrl-C stops it"),
        )
        sys.stdout.flush()
        stop.wait()
    finally:
        server.close()


def register(app: typer.Typer) -> None:
    """Add `strata keys` and `strata kms` to the command."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(kms_app, name="kms")
