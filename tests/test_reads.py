"""Reads through L1, L2 and L3 against a real broker: isolation, history, tokens."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.worker import Worker
from producers.producer import MemoryProducer, now_ms
from producers.tiering import DAY_S, TieringJob
from projections.l1 import L1Cache
from projections.l3 import L3Reader
from projections.reader import Reader
from strata.config import Settings
from strata.errors import NotFoundError, NotProjectedError
from strata.keystore import LocalKeystore
from strata.paths import StorePaths

DAY_MS = int(DAY_S * 1000)

#: Valid tenant names that differ by one character, or only by case.
TENANTS = ["acme", "acme-", "acme.", "acme_", "ACME", "acme1", "a.cme", "acme.b"]
#: Key material: separators, path parts, SQL wildcards, look-alike and
#: invisible characters, both Unicode normal forms of "é".
PIECES = [
    "/", "//", "\\", "..", ".", "%", "_", "%2F", "*", "?", "'", '"', ";", " ",
    "\u00e9", "e\u0301", "名前", "😀", "\u200b", "\u202e", "acme", "ACME/",
    "acme-/", "tenant=acme", "x",
]  # fmt: skip


def _keys(rng: random.Random) -> list[str]:
    keys = {
        "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4))) for _ in range(60)
    }
    keys |= {
        "a/b",
        "a//b",
        "/a",
        "a/",
        "../etc/passwd",
        "acme/a/b",
        "\u00e9",
        "e\u0301",
    }
    return sorted(keys)


async def test_tenant_isolation_fuzz_across_tiers(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """Look-alike tenants writing look-alike keys never read each other's
    records, from L1, L2 or L3, by get or by prefix listing."""
    rng = random.Random(20260)
    keys = _keys(rng)
    written: dict[tuple[str, str], bytes] = {}
    async with MemoryProducer(topics, keystore) as producer:
        pending = []
        for tenant in TENANTS:
            for key in keys:
                if rng.random() < 0.5:
                    continue
                payload = f"{tenant}\x1f{key}\x1f{rng.random()}".encode()
                written[(tenant, key)] = payload
                cls = rng.choice(["chat", "pii"])
                event = producer.seal_write(tenant, key, payload, cls=cls)
                pending.append(await producer.publish(event))
        await asyncio.gather(*pending)
    cache = L1Cache(max_entries=len(written) // 3, max_bytes=1 << 24)
    await Worker(topics, until_caught_up=True, l1=cache).run()
    moved = await TieringJob(topics, clock=lambda: now_ms() + 40 * DAY_MS).run()
    assert moved.demoted > len(written) // 4
    await Worker(topics, until_caught_up=True, l1=cache).run()

    paths = StorePaths(topics.data_dir)
    reader = Reader.from_paths(paths, keystore, l1=cache, track_reads=False)
    served = set()
    for _ in range(2):  # the second pass is served largely from L1
        for tenant in [*TENANTS, "acme/", "acme\\", "Acme", ""]:
            for key in keys:
                expected = written.get((tenant, key))
                if expected is None:
                    with pytest.raises(NotFoundError):
                        reader.get(tenant, key)
                    continue
                memory = reader.get(tenant, key)
                assert (memory.tenant, memory.key, memory.payload) == (
                    tenant,
                    key,
                    expected,
                )
                served.add(memory.served_by)
    assert served == {"l1", "l2", "l3"}

    archive = L3Reader(paths.l3)
    for tenant in TENANTS:
        for key in keys:
            record = archive.get(tenant, key)
            assert record is None or (record.tenant, record.key) == (tenant, key)
            assert record is None or (tenant, key) in written
        for prefix in ("a", "acme", "acme/", "%", "_", "e", "\u00e9"):
            listed = {k for k, *_ in reader.list(tenant, prefix=prefix)}
            own = {k for (t, k) in written if t == tenant and k.startswith(prefix)}
            assert listed == own, (tenant, prefix)
    archive.close()
    reader.close()


async def test_as_of_returns_each_historical_value(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """`get --as-of OFFSET` answers what the store held once the key's
    partition reached OFFSET: each version, the deletion, the rewrite; the
    answers do not change when the key moves to L3."""
    async with MemoryProducer(topics, keystore) as producer:
        tokens = []
        for i in range(15):
            tokens.append(await producer.write("acme", "doc", f"v{i}".encode()))
            await producer.write("acme", f"neighbour/{i}", b"noise")
        deleted = await producer.delete("acme", "doc")
        final = await producer.write("acme", "doc", b"after the delete")
    await Worker(topics, until_caught_up=True).run()
    paths = StorePaths(topics.data_dir)

    def check(reader: Reader) -> None:
        for i, token in enumerate(tokens):
            memory = reader.get("acme", "doc", as_of=token.offset)
            assert (memory.payload, memory.version) == (f"v{i}".encode(), i + 1)
            if i + 1 < len(tokens):
                between = reader.get("acme", "doc", as_of=tokens[i + 1].offset - 1)
                assert between.payload == f"v{i}".encode()
        with pytest.raises(NotFoundError, match="was deleted at offset"):
            reader.get("acme", "doc", as_of=deleted.offset)
        with pytest.raises(NotFoundError, match="not found at offset"):
            reader.get("acme", "doc", as_of=tokens[0].offset - 1)
        assert (
            reader.get("acme", "doc", as_of=final.offset).payload == b"after the delete"
        )
        # Past what the worker has projected, the answer is not known yet.
        unread = reader.l2.checkpoint(final.partition)
        with pytest.raises(NotProjectedError, match=f"offset {unread} of partition"):
            reader.get("acme", "doc", as_of=unread)
        # A key the store never saw: "not found" below what every partition
        # has projected, "not projected" past all of them.
        with pytest.raises(NotFoundError, match="not found at offset"):
            reader.get("acme", "never", as_of=0)
        beyond = max(reader.l2.checkpoints().values())
        with pytest.raises(NotProjectedError, match="not projected yet in any"):
            reader.get("acme", "never", as_of=beyond)

    reader = Reader.from_paths(paths, keystore, track_reads=False)
    check(reader)
    report = await TieringJob(topics, clock=lambda: now_ms() + 40 * DAY_MS).run()
    assert ("acme", "doc") in {(m.tenant, m.key) for m in report.moves}
    await Worker(topics, until_caught_up=True).run()
    assert reader.get("acme", "doc").served_by == "l3"
    check(reader)
    reader.close()


async def test_read_your_writes_across_tiers_with_a_shared_l1(
    topics: Settings, keystore: LocalKeystore
) -> None:
    """With a running worker and a reader sharing its L1, a token's write is
    read back whether the key was in L1, L2 or L3 before it."""
    cache = L1Cache(max_entries=100, max_bytes=1 << 20)
    worker = Worker(topics, l1=cache)
    task = asyncio.create_task(worker.run())
    paths = StorePaths(topics.data_dir)
    reader = Reader.from_paths(paths, keystore, l1=cache, track_reads=False)
    try:
        await asyncio.wait_for(worker.assigned.wait(), 30)
        async with MemoryProducer(topics, keystore) as producer:
            first = await producer.write("acme", "k", b"v1")
            assert (await reader.get_after("acme", "k", first)).payload == b"v1"
            assert reader.get("acme", "k").served_by == "l1"

            job = TieringJob(topics, clock=lambda: now_ms() + 40 * DAY_MS)
            await job.wait_applied(await job.run(), timeout_s=30)
            assert reader.get("acme", "k").served_by == "l3"
            assert reader.get("acme", "k").served_by == "l1"  # filled by the read

            for i in range(2, 12):
                token = await producer.write("acme", "k", f"v{i}".encode())
                memory = await reader.get_after("acme", "k", token)
                assert memory.payload == f"v{i}".encode()
                assert memory.version == i
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        reader.close()


async def test_unknown_tenant_or_key_is_a_clear_not_found(
    topics: Settings, keystore: LocalKeystore, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Whatever is asked for, a missing record is NotFoundError, also before
    anything was projected; the command line exits 1 with one line."""
    empty = Reader.from_paths(StorePaths(tmp_path / "nothing-here"), keystore)
    with pytest.raises(NotFoundError):
        empty.get("acme", "k")
    with pytest.raises(NotFoundError):
        empty.history("acme", "k")
    assert empty.list("acme") == []
    empty.close()
    assert not (tmp_path / "nothing-here").exists(), "a read must not create stores"

    async with MemoryProducer(topics, keystore) as producer:
        await producer.write("acme", "k", b"v")
    await Worker(topics, until_caught_up=True).run()
    reader = Reader.from_paths(StorePaths(topics.data_dir), keystore)
    for tenant, key in [
        ("acme", "missing"),
        ("nobody", "k"),
        ("../../etc", "passwd"),
        ("", ""),
        ("acme/k", ""),
        ("acme", "k\x00"),
        ("ACME", "k"),
    ]:
        with pytest.raises(NotFoundError):
            reader.get(tenant, key)
    reader.close()

    done = subprocess.run(
        [sys.executable, "-m", "strata", "get", "nobody", "k", "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "strata: nobody/k: not found\n"


async def test_get_wait_refuses_a_token_no_write_returned(
    topics: Settings, cli_env: dict[str, str]
) -> None:
    """A partition the topic lacks, or an offset past its end, is a one-line
    usage error at once, not a wait until the timeout."""
    topics.data_dir.mkdir(parents=True, exist_ok=True)  # else that is the error
    for token, why in [("99:0", "has no partition 99"), ("0:5", "ends at offset 0")]:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "strata", "get", "acme", "k", "--wait", token],
            env=cli_env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert why in done.stderr
        assert done.stderr.count("\n") == 1
        assert time.monotonic() - began < 25  # the default --timeout is 30 s
