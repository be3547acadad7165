"""`strata report` and `strata keys list` on damaged inputs: a damaged keystore,
master key or KMS file, or a damaged ledger checkpoint, is a failed check with
its reason in a written report (or a refusal naming the file), never a pass,
a crash or a missing report."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consumers.worker import Worker
from producers.load import publish_synthetic
from projections.ledger_files import read_state
from strata.config import Settings, load_settings
from strata.errors import StoreError
from strata.keystore import LocalKeystore
from strata.paths import StorePaths

TENANTS = ("tenant-000", "tenant-001")


@pytest.fixture(scope="module")
async def pristine(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """One caught-up store for the whole module; each test damages a copy."""
    settings = load_settings(
        kafka_bootstrap=kafka_bootstrap,
        data_dir=tmp_path_factory.mktemp("pristine") / "data",
        topic_prefix=f"test-{uuid.uuid4().hex[:12]}",
        partitions=6,
        sqlite_synchronous="NORMAL",
    )
    await publish_synthetic(settings, events=36, tenants=2, size=16, seed=7, keys=12)
    await Worker(settings, until_caught_up=True).run()
    return settings


@pytest.fixture
def store(pristine: Settings, tmp_path: Path) -> tuple[StorePaths, dict[str, str]]:
    """A copy of the pristine store and the environment to run `strata` on it."""
    data = tmp_path / "data"
    shutil.copytree(pristine.data_dir, data)
    env = dict(os.environ)
    env.update(
        STRATA_KAFKA_BOOTSTRAP=pristine.kafka_bootstrap or "",
        STRATA_DATA_DIR=str(data),
        STRATA_TOPIC_PREFIX=pristine.topic_prefix,
        STRATA_PARTITIONS=str(pristine.partitions),
        # The module's store is built once; its entries may not age into a failure.
        STRATA_LEDGER_CHECKPOINT_INTERVAL_MS="86400000",
    )
    env.pop("STRATA_KMS_URL", None)
    env.pop("STRATA_MASTER_KEY_FILE", None)
    return StorePaths(data), env


def strata(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `strata` command."""
    return subprocess.run(
        [sys.executable, "-m", "strata", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_report(env: dict[str, str], out: Path) -> tuple[int, dict[str, Any], str]:
    """Run `strata report`; return its exit code, report.json and report.md."""
    done = strata(env, "report", "--out", str(out), "--json")
    assert (out / "report.json").is_file(), done.stderr
    assert (out / "report.md").is_file(), done.stderr
    summary = json.loads(done.stdout)
    assert summary["json"] == str(out / "report.json")
    report = json.loads((out / "report.json").read_text())
    return done.returncode, report, (out / "report.md").read_text()


def failed(report: dict[str, Any]) -> dict[str, str]:
    """Name -> reason of each failed check."""
    return {c["name"]: c["reason"] for c in report["checks"] if not c["ok"]}


def refusals(stderr: str) -> list[str]:
    """The `strata: ...` lines of a command's stderr (log lines left out)."""
    return [line for line in stderr.splitlines() if line.startswith("strata: ")]


def _forms(secret: bytes) -> list[str]:
    """The ways key material could leak into text: hex and base64."""
    return [secret.hex(), base64.b64encode(secret).decode()]


# -- damage -----------------------------------------------------------------------


def rename_tenant(paths: StorePaths) -> None:
    """Rename tenant-001's entry inside keystore.json."""
    path = paths.keys / "keystore.json"
    doc = json.loads(path.read_text())
    doc["tenants"]["tenant-009"] = doc["tenants"].pop("tenant-001")
    path.write_text(json.dumps(doc))


def replace_master_key(paths: StorePaths) -> None:
    """Put 32 other bytes in master.key, keeping its mode."""
    (paths.keys / "master.key").write_bytes(os.urandom(32))


def open_master_key(paths: StorePaths) -> None:
    """Make master.key readable by everyone."""
    (paths.keys / "master.key").chmod(0o644)


def delete_kms_file(paths: StorePaths) -> None:
    """Delete the local KMS's keys."""
    (paths.keys / "kms.json").unlink()


def delete_keystore(paths: StorePaths) -> None:
    """Delete keystore.json while the KMS still holds the tenants' keys."""
    (paths.keys / "keystore.json").unlink()


# -- the tests --------------------------------------------------------------------


def test_the_untouched_store_passes_and_unwraps_every_primary_key(
    store: tuple[StorePaths, dict[str, str]], tmp_path: Path
) -> None:
    """Every check passes; the keys check unwrapped each tenant's primary key
    through the KMS, and no key material reaches the report."""
    paths, env = store
    code, report, markdown = run_report(env, tmp_path / "report")
    assert code == 0, failed(report)
    assert report["ok"] is True
    assert failed(report) == {}
    assert report["keys"]["unwrapped"] == len(TENANTS)
    keys = next(c for c in report["checks"] if c["name"] == "keys")
    assert f"{len(TENANTS)} primary keys unwrap" in keys["reason"]

    ring = LocalKeystore(paths.keys, paths.keys / "master.key")
    secrets = [(paths.keys / "master.key").read_bytes()]
    secrets += [
        ring.data_key(t, ring.primary_version(t) or 0).material for t in TENANTS
    ]
    ring.close()
    text = json.dumps(report) + markdown
    for secret in secrets:
        for form in _forms(secret):
            assert form not in text


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (rename_tenant, ["keystore.json", "tenants.tenant-009.key_id"]),
        (replace_master_key, ["master.key", "does not unwrap"]),
        (open_master_key, ["master.key", "mode 644"]),
        (delete_kms_file, ["strata-tk_", "does not exist"]),
    ],
    ids=["tenant-renamed", "master-key-replaced", "master-key-0644", "kms-deleted"],
)
def test_unusable_keys_fail_the_keys_check(
    store: tuple[StorePaths, dict[str, str]],
    tmp_path: Path,
    damage: Callable[[StorePaths], None],
    names: list[str],
) -> None:
    """Each damage `strata get` refuses fails the keys check, and only it,
    with a reason naming the problem; the section says the same."""
    paths, env = store
    damage(paths)
    code, report, markdown = run_report(env, tmp_path / "report")
    assert code == 1
    assert report["ok"] is False
    reasons = failed(report)
    assert set(reasons) == {"keys"}, reasons
    for name in names:
        assert name in reasons["keys"]
    assert report["keys"] == {"available": False, "reason": reasons["keys"]}
    assert "**Result: FAIL**" in markdown
    assert f"Not available: {reasons['keys']}" in markdown


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (rename_tenant, ["tenants.tenant-009.key_id"]),
        (delete_keystore, ["is missing", "the KMS"]),
    ],
    ids=["tenant-renamed", "keystore-deleted"],
)
def test_keys_list_refuses_a_damaged_keystore(
    store: tuple[StorePaths, dict[str, str]],
    damage: Callable[[StorePaths], None],
    names: list[str],
) -> None:
    """`strata keys list` lists a sound keystore; once damaged, it refuses as
    `get` does: exit 2, one line naming the file."""
    paths, env = store
    done = strata(env, "keys", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert [t["tenant"] for t in json.loads(done.stdout)["tenants"]] == list(TENANTS)
    damage(paths)
    done = strata(env, "keys", "list")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = refusals(done.stderr)
    assert len(lines) == 1, done.stderr
    assert str(paths.keys / "keystore.json") in lines[0]
    for name in names:
        assert name in lines[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"garbage", "not JSON"),
        (b"{}", "field next_offset is missing"),
    ],
    ids=["garbage", "empty-object"],
)
def test_a_damaged_ledger_checkpoint_is_a_failed_check_in_a_written_report(
    store: tuple[StorePaths, dict[str, str]],
    tmp_path: Path,
    content: bytes,
    problem: str,
) -> None:
    """The report is written, exits 1, and its ledger checks name the file
    and what is wrong with it; status still refuses the store."""
    paths, env = store
    ckpt = paths.ledger / "p00005.ckpt"
    ckpt.write_bytes(content)
    code, report, markdown = run_report(env, tmp_path / "report")
    assert code == 1
    assert report["ok"] is False
    reasons = failed(report)
    for name in ("ledger", "ledger_signed"):
        assert str(ckpt) in reasons[name], reasons
        assert problem in reasons[name]
    assert "keys" not in reasons
    assert "tiers" not in reasons
    assert report["ledger"]["available"] is True
    assert "**Result: FAIL**" in markdown
    assert problem in markdown

    done = strata(env, "status")
    assert done.returncode == 2
    assert str(ckpt) in "".join(refusals(done.stderr))


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({}, "field next_offset is missing"),
        (
            {"next_offset": 3, "size": "many", "entries": 1, "head": "00"},
            "field size is not a whole number",
        ),
        ({"next_offset": 3, "size": 9, "entries": 1}, "field head is missing"),
        (
            {"next_offset": 3, "size": 9, "entries": 1, "head": "00", "frontier": 7},
            "field frontier is not a list",
        ),
        ([1, 2], "not a JSON object"),
    ],
    ids=["empty", "size-not-a-number", "no-head", "frontier-not-a-list", "a-list"],
)
def test_read_state_names_the_missing_or_wrong_field(
    tmp_path: Path, doc: Any, problem: str
) -> None:
    """A checkpoint that parses but lacks a field, or holds a wrong one, says which."""
    path = tmp_path / "p00005.ckpt"
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as caught:
        read_state(tmp_path, 5)
    assert str(caught.value).startswith(f"ledger checkpoint {path}: {problem}")
