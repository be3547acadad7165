"""Key rotation killed and resumed, verification and retirement, tenant erasure.

Against a real broker; `strata keys ...` runs as its own process, as an
operator would run it, so a kill is a real SIGKILL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import sqlite3
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from consumers.rotation import (
    RotationJob,
    read_rotation_jobs,
    retire_versions,
    verify_coverage,
)
from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.l2 import L2Reader
from projections.reader import Reader, WriteToken
from schemas.codec import Codec
from schemas.events import MemoryReencrypted
from strata.config import Settings, load_settings
from strata.crypto import open_sealed
from strata.erasure import erase_tenant
from strata.errors import ErasedError, KeyUnavailableError, UsageError
from strata.kafka import end_offsets
from strata.keystore import Keyring, open_keystore, tenant_tag
from strata.kms import KmsServer, LocalKms
from strata.paths import StorePaths

SEED = int(os.environ.get("STRATA_TEST_SEED", random.randrange(1 << 30)))


# -- helpers ------------------------------------------------------------------------


async def _cli(
    env: dict[str, str],
    *args: str,
    kill_after: int | None = None,
    kill_after_s: float | None = None,
) -> tuple[int, str, str]:
    """Run `strata` with debug logs; SIGKILL it after N recorded batches or S seconds."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "strata",
        "--log-level",
        "DEBUG",
        *args,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    err: list[bytes] = []

    async def watch() -> None:
        batches = 0
        assert proc.stderr is not None
        async for line in proc.stderr:
            err.append(line)
            if kill_after is not None and b"rotation.batch_committed" in line:
                batches += 1
                if batches == kill_after and proc.returncode is None:
                    proc.kill()

    async def timer() -> None:
        if kill_after_s is not None:
            await asyncio.sleep(kill_after_s)
            if proc.returncode is None:
                proc.kill()

    out, _, _ = await asyncio.wait_for(
        asyncio.gather(proc.stdout.read(), watch(), timer()), timeout=120
    )
    code = await proc.wait()
    return code, out.decode(), b"".join(err).decode(errors="replace")


async def _raw_topic(settings: Settings, topic: str) -> bytes:
    """Every key, value and header byte of a topic, concatenated."""
    ends = await end_offsets(settings, [topic])
    tps = [tp for tp in ends if ends[tp] > 0]
    if not tps:
        return b""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
    )
    await consumer.start()
    chunks: list[bytes] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for msg in records:
                    chunks += [msg.key or b"", msg.value or b""]
                    chunks += [v for _, v in msg.headers or ()]
    finally:
        await consumer.stop()
    return b"".join(chunks)


async def _memory_events(settings: Settings) -> list[tuple[int, int, Any]]:
    ends = await end_offsets(settings, [settings.memory_topic])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    codec = Codec()
    found = []
    try:
        tps = [tp for tp in ends if ends[tp] > 0]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                found += [
                    (tp.partition, m.offset, codec.decode(m.value)) for m in records
                ]
    finally:
        await consumer.stop()
    return found


def _files(*roots: Path, skip: tuple[Path, ...] = ()) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path not in skip:
                yield path, path.read_bytes()


def _leaks(haystacks: dict[str, bytes], secrets: dict[str, bytes]) -> list[str]:
    """Which secret (raw, hex or base64) shows up where."""
    found = []
    for secret_name, secret in secrets.items():
        forms = [secret]
        if len(secret) == 32:  # key material: also as text
            forms += [secret.hex().encode(), base64.b64encode(secret)]
        for where, data in haystacks.items():
            if any(f in data for f in forms):
                found.append(f"{secret_name} in {where}")
    return found


def _keks(kms: LocalKms, *tenants: str) -> dict[str, bytes]:
    """The tenants' key-encryption keys, read from inside the local KMS."""
    found = {}
    keys = json.loads(_kms_file(kms).read_text())["keys"]
    for tenant in tenants:
        (name,) = [n for n in keys if n.startswith(f"strata-tk_{tenant_tag(tenant)}")]
        for version in kms.key_versions(name):
            found[f"{tenant} kek v{version}"] = kms._kek(name, version, keys[name])
    return found


def _kms_file(kms: LocalKms) -> Path:
    return Path(kms.describe().removeprefix("local:")) / "kms.json"


def _payload_rows(db: Path) -> list[tuple[str, str, str, int, bytes, bytes]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT tenant, key, event_id, key_version, nonce, ciphertext FROM history "
            "WHERE action = 'written' AND ciphertext IS NOT NULL"
        ).fetchall()


async def _project(settings: Settings, keyring: Keyring, **options: Any) -> None:
    await asyncio.wait_for(
        Worker(settings, keystore=keyring, until_caught_up=True, **options).run(), 90
    )


async def _write_corpus(
    settings: Settings, keyring: Keyring, tenants: dict[str, int]
) -> dict[str, tuple[str, str, bytes]]:
    """Writes (two versions of most keys, a delete, a rejected write); by event id."""
    written: dict[str, tuple[str, str, bytes]] = {}
    async with MemoryProducer(settings, keyring) as producer:
        for tenant, keys in tenants.items():
            for round_ in range(2):
                for i in range(keys if round_ == 0 else keys // 2):
                    payload = (
                        f"{tenant} secret {i}.{round_} {uuid.uuid4().hex}".encode()
                    )
                    event = producer.seal_write(tenant, f"agent-{i % 3}/k{i}", payload)
                    await (await producer.publish(event))
                    written[event.event_id] = (tenant, event.key, payload)
            await producer.delete(tenant, "agent-0/k0")
            stale = producer.seal_write(
                tenant,
                "agent-1/k1",
                f"{tenant} rejected {uuid.uuid4().hex}",
                expected_version=99,
            )
            await (await producer.publish(stale))
            written[stale.event_id] = (tenant, stale.key, b"")  # never stored: rejected
    return written


# -- rotation -----------------------------------------------------------------------


async def test_rotation_killed_five_times_resumes_verifies_retires_and_rebuilds(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    keyring = open_keystore(topics)
    written = await _write_corpus(topics, keyring, {"acme": 48, "globex": 32})
    await _project(topics, keyring)
    old_keys = {t: keyring.data_key(t, 1) for t in ("acme", "globex")}

    rotate = (
        "keys",
        "rotate",
        "--tenant",
        "acme",
        "--tenant",
        "globex",
        # One record per batch: enough batches that every kill lands mid-job.
        "--batch-size",
        "1",
        "--json",
    )
    logs: list[str] = []
    kills = []
    plan = [("s", rng.uniform(0.3, 1.2))] + [("b", rng.randint(1, 3)) for _ in range(4)]
    for kind, when in plan:
        code, out, err = await _cli(
            cli_env,
            *rotate,
            kill_after=int(when) if kind == "b" else None,
            kill_after_s=float(when) if kind == "s" else None,
        )
        logs += [out, err]
        assert code in (-9, 0), (SEED, code, err[-2000:])
        assert code == -9, f"seed {SEED}: the job finished before kill {kind}={when}"
        kills.append(f"{kind}={when:.2f}" if kind == "s" else f"{kind}={when}")

        if len(kills) == 2:
            # Mid-rotation, records still need v1: retiring it is refused.
            code, out, err = await _cli(
                cli_env, "keys", "retire", "--wait", "0", "--json"
            )
            logs += [out, err]
            assert code == 1, err
            refused = json.loads(out)["refused"]
            assert {(r["tenant"], r["version"]) for r in refused} >= {("acme", 1)}
            assert "verify" in err

    code, out, err = await _cli(cli_env, *rotate)
    logs += [out, err]
    assert code == 0, (SEED, kills, err[-3000:])
    report = json.loads(out)
    assert report["tenants"] == {"acme": 2, "globex": 2}
    assert report["resumed"], kills
    jobs = await read_rotation_jobs(topics)
    assert [j.state for j in jobs.values()] == ["completed"], jobs
    # Reruns resumed the one job: no version beyond the one it planned.
    assert [v.version for v in keyring.versions("acme")] == [1, 2]

    # Not projected yet: verify names the records still under v1.
    found = await verify_coverage(topics, keyring, limit=5, record=False, wait_s=0)
    assert not found.ok
    assert found.findings_total == 72 + 48
    assert len(found.findings) == 5
    assert found.findings[0].key_version == 1
    assert found.findings[0].key is not None
    # Projected but not yet verified: retire is still refused.
    await _project(topics, keyring)
    early = await retire_versions(topics, keyring, tenant="acme")
    assert early.retired == []
    assert "not cleared" in early.refused[0]["reason"]

    code, out, err = await _cli(cli_env, "keys", "verify", "--json")
    logs += [out, err]
    assert code == 0, out
    assert json.loads(out)["ok"]
    code, out, err = await _cli(cli_env, "keys", "retire", "--json")
    logs += [out, err]
    assert code == 0, out
    assert sorted((r["tenant"], r["version"]) for r in json.loads(out)["retired"]) == [
        ("acme", 1),
        ("globex", 1),
    ]
    with pytest.raises(KeyUnavailableError, match="retired"):
        keyring.data_key("acme", 1)

    # Every stored payload is under v2 and decrypts to what was written.
    live = StorePaths(topics.data_dir)
    rows = _payload_rows(live.l2_db)
    stored = dict.fromkeys(("acme", "globex"), 0)
    for tenant, key, event_id, key_version, nonce, ciphertext in rows:
        assert key_version == 2
        new = keyring.data_key(tenant, 2)
        plain = open_sealed(
            new, nonce, ciphertext, tenant=tenant, key=key, event_id=event_id
        )
        assert plain == written[event_id][2]
        stored[tenant] += 1
    assert stored == {"acme": 72, "globex": 48}

    # No record re-encrypted twice: once per stored payload in L2; on the topic,
    # one event id per source, and any resent copy rejected by L2.
    with sqlite3.connect(live.l2_db) as conn:
        per_version = Counter(
            conn.execute(
                "SELECT tenant, key, version FROM history WHERE action = 'reencrypted'"
            ).fetchall()
        )
        outcome = dict(
            conn.execute("SELECT partition || ':' || offset, action FROM history")
        )
    assert len(per_version) == len(rows)
    assert set(per_version.values()) == {1}
    reencrypts = [
        (p, o, e)
        for p, o, e in await _memory_events(topics)
        if isinstance(e, MemoryReencrypted)
    ]
    ids: dict[str, set[str]] = {}
    for _, _, event in reencrypts:
        ids.setdefault(event.source_event_id, set()).add(event.event_id)
    assert len(ids) == len(rows)
    assert all(len(v) == 1 for v in ids.values())
    copies = Counter(e.event_id for _, _, e in reencrypts)
    first: dict[str, int] = {}
    for _, offset, event in reencrypts:
        first[event.event_id] = min(offset, first.get(event.event_id, offset))
    for p, offset, event in reencrypts:
        expected = "reencrypted" if offset == first[event.event_id] else "rejected"
        assert outcome[f"{p}:{offset}"] == expected
    print(
        f"seed {SEED}, kills {kills}, resent copies {sum(copies.values()) - len(copies)}"
    )

    # A rebuild from offset 0 with the same keystore reaches the same L2.
    rebuilt = topics.model_copy(update={"data_dir": tmp_path / "rebuilt"})
    await _project(rebuilt, keyring, group=f"{topics.topic_prefix}.rebuild")
    fresh = StorePaths(rebuilt.data_dir)
    digests = [L2Reader(fresh.l2_db), L2Reader(live.l2_db)]
    assert digests[0].digest() == digests[1].digest()
    for opened in digests:
        opened.close()
    reader = Reader(fresh.l2_db, keyring)
    assert len(_payload_rows(fresh.l2_db)) == len(rows)
    for tenant, key, event_id, _, nonce, ciphertext in _payload_rows(fresh.l2_db):
        plain = open_sealed(
            keyring.data_key(tenant, 2),
            nonce,
            ciphertext,
            tenant=tenant,
            key=key,
            event_id=event_id,
        )
        assert plain == written[event_id][2]
    assert reader.get("acme", "agent-2/k2").payload.startswith(b"acme secret 2.1")
    reader.close()

    # Nothing secret in the topic, the stores or the logs.
    secrets = {f"payload {eid}": p for eid, (_, _, p) in written.items() if p}
    for tenant, key in old_keys.items():
        secrets[f"{tenant} v1"] = key.material
        secrets[f"{tenant} v2"] = keyring.data_key(tenant, 2).material
    assert isinstance(keyring.kms, LocalKms)
    secrets |= _keks(keyring.kms, "acme", "globex")
    master = topics.master_key_path
    secrets["master key"] = master.read_bytes()
    places = {
        str(p): d for p, d in _files(topics.data_dir, rebuilt.data_dir, skip=(master,))
    }
    for topic in (topics.memory_topic, topics.jobs_topic, topics.dlq_topic):
        places[topic] = await _raw_topic(topics, topic)
    places["logs"] = "\n".join(logs).encode()
    assert _leaks(places, secrets) == []
    assert b"rotation.batch_committed" in places["logs"]  # the logs were captured


# -- erasure ------------------------------------------------------------------------


async def test_shred_erases_everywhere_with_a_remote_kms(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    kms_dir = tmp_path / "kms"
    with KmsServer(
        LocalKms(kms_dir, kms_dir / "master.key"), token="kms-token"
    ) as server:
        settings = load_settings(
            **topics.model_dump(exclude={"kms_url", "kms_token"}),
            kms_url=server.url,
            kms_token="kms-token",
        )
        env = {**cli_env, "STRATA_KMS_URL": server.url, "STRATA_KMS_TOKEN": "kms-token"}
        keyring = open_keystore(settings)
        written = await _write_corpus(settings, keyring, {"acme": 20, "globex": 12})
        await _project(settings, keyring)
        secrets = {f"payload {eid}": p for eid, (_, _, p) in written.items() if p}
        for tenant in ("acme", "globex"):
            secrets[f"{tenant} v1"] = keyring.data_key(tenant, 1).material
        secrets["kms master key"] = (kms_dir / "master.key").read_bytes()
        secrets |= _keks(LocalKms(kms_dir, kms_dir / "master.key"), "acme", "globex")
        assert len(secrets) == 30 + 18 + 2 + 1 + 2
        backup = (StorePaths(settings.data_dir).keys / "keystore.json").read_bytes()

        logs: list[str] = []
        code, out, err = await _cli(env, "keys", "shred", "--tenant", "acme", "--json")
        logs += [out, err]
        assert code == 0, err
        receipt = json.loads(out)
        assert receipt["tenant"] == "acme"
        assert receipt["key_versions_destroyed"] == [1]
        assert receipt["kms"] == server.url
        assert receipt["kms_key_deleted"]
        assert len(receipt["events"]) == settings.partitions
        assert receipt["records_purged"] == {"l2": 19, "l3": 0}  # 20 keys, one deleted
        assert not receipt["purge_confirmed"]
        assert receipt["payloads_purged"] == 30
        assert receipt["erased_at"].endswith("+00:00")

        await _project(settings, keyring)
        paths = StorePaths(settings.data_dir)
        l2 = L2Reader(paths.l2_db)
        assert l2.is_erased("acme")
        assert l2.tenant_counts("acme") == {"payloads": 0}
        assert l2.tenant_counts("globex")["payloads"] == 18
        l2.close()

        reader = Reader(paths.l2_db, keyring)
        with pytest.raises(ErasedError, match="erased"):
            reader.get("acme", "agent-1/k1")
        with pytest.raises(ErasedError):
            reader.list("acme")
        assert reader.get("globex", "agent-1/k1").payload.startswith(
            b"globex secret 1.1"
        )
        reader.close()
        code, out, err = await _cli(env, "get", "acme", "agent-1/k1")
        logs += [out, err]
        assert code == 1
        assert "erased" in err
        with pytest.raises(ErasedError):
            keyring.primary("acme")

        # A backup of the keystore cannot bring the keys back: the KMS key is gone.
        current = (paths.keys / "keystore.json").read_bytes()
        (paths.keys / "keystore.json").write_bytes(backup)
        from_backup = open_keystore(settings)
        with pytest.raises(KeyUnavailableError, match="HTTP 404"):
            from_backup.data_key("acme", 1)
        from_backup.close()
        (paths.keys / "keystore.json").write_bytes(current)

        # Erasing again reprints the receipt and publishes nothing new.
        ends = await end_offsets(settings, [settings.memory_topic])
        again = await erase_tenant(settings, keyring, "acme")
        assert again.to_dict() | {"purge_confirmed": False} == receipt
        assert again.confirmed  # the workers applied its markers meanwhile
        assert await end_offsets(settings, [settings.memory_topic]) == ends

        code, out, err = await _cli(env, "ledger", "verify", "--json")
        logs += [out, err]
        assert code == 0, out
        assert json.loads(out)["ok"], out
        coverage = await verify_coverage(settings, keyring)
        assert coverage.ok, coverage.to_dict()
        assert {"tenant": "acme", "erased": True, "payloads": 0} in coverage.tenants

        # A rebuild from offset 0 skips the tenant's events as erased.
        rebuilt = settings.model_copy(update={"data_dir": tmp_path / "rebuilt"})
        await _project(rebuilt, keyring, group=f"{settings.topic_prefix}.rebuild")
        fresh = L2Reader(StorePaths(rebuilt.data_dir).l2_db)
        assert fresh.is_erased("acme")
        assert fresh.tenant_counts("acme") == {"payloads": 0}
        old = L2Reader(paths.l2_db)
        assert [r.event_id for r in fresh.payloads("globex")] == [
            r.event_id for r in old.payloads("globex")
        ]
        assert fresh.list("globex") == old.list("globex")
        fresh.close()
        old.close()

        # The ledger keeps the erased tenant's entries, and one rebuilt from
        # the topic (into a fresh data dir, or beside the live L2) has them too.
        live = {p.name: p.read_bytes() for p in paths.ledger.glob("p*.log")}
        assert sum(d.count(b'"tenant":"acme"') for d in live.values()) >= 30
        rebuilt_ledger = StorePaths(rebuilt.data_dir).ledger
        assert {p.name: p.read_bytes() for p in rebuilt_ledger.glob("p*.log")} == live
        shutil.rmtree(paths.ledger)
        await _project(settings, keyring, group=f"{settings.topic_prefix}.ledger")
        assert {p.name: p.read_bytes() for p in paths.ledger.glob("p*.log")} == live

        places = {
            str(p): d
            for p, d in _files(
                settings.data_dir,
                rebuilt.data_dir,
                kms_dir,
                skip=(kms_dir / "master.key",),
            )
        }
        for topic in (settings.memory_topic, settings.jobs_topic, settings.dlq_topic):
            places[topic] = await _raw_topic(settings, topic)
        places["logs"] = "\n".join(logs).encode()
        assert _leaks(places, secrets) == []
        keyring.close()


async def test_a_version_made_by_a_run_that_never_started_is_adopted(
    topics: Settings,
) -> None:
    """Killed between creating its version and recording its start, a rerun
    reuses that version instead of making another."""
    keyring = open_keystore(topics)
    written = await _write_corpus(topics, keyring, {"acme": 6})
    await _project(topics, keyring)
    keyring.ensure_version("acme", 2, job_id="rot-never-started")

    report = await RotationJob(topics, keyring, tenants=["acme"]).run()
    assert report.versions == {"acme": 2}
    assert not report.resumed
    assert report.counts.reencrypted == 9
    assert report.counts.not_live == 1  # the rejected write holds no payload
    assert [v.version for v in keyring.versions("acme")] == [1, 2]
    await _project(topics, keyring)
    assert (await verify_coverage(topics, keyring)).ok
    rows = _payload_rows(StorePaths(topics.data_dir).l2_db)
    assert {r[3] for r in rows} == {2}
    assert {r[2] for r in rows} == {e for e, (_, _, p) in written.items() if p}

    # Nothing left under v1: another run re-encrypts nothing.
    rerun = await RotationJob(
        topics, keyring, tenants=["acme"], reencrypt_only=True
    ).run()
    assert rerun.versions == {"acme": 2}
    assert rerun.counts.reencrypted == 0
    assert rerun.counts.current == 9


async def test_a_rotation_refused_for_want_of_a_worker_changes_no_key(
    topics: Settings,
) -> None:
    """With L2 behind the topic the rotation stops before it makes a version,
    so the primary stays what it was, and says what to run."""
    keyring = open_keystore(topics)
    await _write_corpus(topics, keyring, {"acme": 3})  # nothing projects them

    with pytest.raises(UsageError, match=r"run `strata worker`.*then run it again"):
        await RotationJob(topics, keyring, tenants=["acme"], l2_wait_s=0.3).run()
    assert [(v.version, v.primary) for v in keyring.versions("acme")] == [(1, True)]

    await _project(topics, keyring)
    report = await RotationJob(topics, keyring, tenants=["acme"]).run()
    assert not report.resumed  # the refused run left no job behind
    assert report.versions == {"acme": 2}


async def test_a_batch_published_but_not_recorded_is_not_published_again(
    topics: Settings,
) -> None:
    """The window a kill can hit between the broker's acks and the progress
    record: the rerun finds its own events past the mark and skips them."""

    class FailsAfterFirstSends(RotationJob):
        failed = False

        async def _batch(self, *args: Any) -> list[asyncio.Future[WriteToken]]:
            sends = await super()._batch(*args)
            if sends and not FailsAfterFirstSends.failed:
                FailsAfterFirstSends.failed = True
                await asyncio.gather(*sends)  # the broker acknowledged them
                raise RuntimeError("stopped between publishing and recording")
            return sends

    keyring = open_keystore(topics)
    written = await _write_corpus(topics, keyring, {"acme": 12})
    await _project(topics, keyring)
    with pytest.raises(RuntimeError, match="between publishing"):
        await FailsAfterFirstSends(
            topics, keyring, tenants=["acme"], batch_size=2
        ).run()
    jobs = await read_rotation_jobs(topics)
    assert [j.state for j in jobs.values()] == ["failed"]

    report = await RotationJob(topics, keyring, tenants=["acme"], batch_size=2).run()
    assert report.resumed
    assert report.counts.already_published in (1, 2)
    payloads = {e for e, (_, _, p) in written.items() if p}
    total = report.total()
    assert total["reencrypted"] + total["already_published"] == len(payloads) == 18
    sources = Counter(
        e.source_event_id
        for _, _, e in await _memory_events(topics)
        if isinstance(e, MemoryReencrypted)
    )
    assert set(sources) == payloads
    assert set(sources.values()) == {1}
