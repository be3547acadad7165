"""`strata report`: passes on a healthy store, fails and says why otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from consumers.worker import Worker
from producers.load import publish_synthetic
from projections.l2 import L2Reader
from strata.config import Settings
from strata.paths import StorePaths


def run_report(env: dict[str, str], out: Path) -> tuple[int, dict[str, Any], str]:
    """Run `strata report --json`; return exit code, report.json and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "strata", "report", "--out", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    summary = json.loads(done.stdout)
    assert summary["json"] == str(out / "report.json")
    return done.returncode, json.loads((out / "report.json").read_text()), done.stderr


def failed(report: dict[str, Any]) -> dict[str, str]:
    """Name -> reason of each failed check."""
    return {c["name"]: c["reason"] for c in report["checks"] if not c["ok"]}


def nulls(value: Any, path: str = "") -> list[str]:
    """Where in a JSON value a null sits."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nulls(v, f"{path}[{i}]")]
    return []


async def test_healthy_store_passes_and_a_tampered_ledger_fails(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Every check passes and every section is filled on a caught-up store;
    after one ledger byte changes, the report exits 1 and names the entry."""
    await publish_synthetic(topics, events=90, tenants=2, size=32, seed=3, keys=20)
    await Worker(topics, until_caught_up=True).run()

    code, report, stderr = run_report(cli_env, tmp_path / "healthy")
    assert code == 0, (stderr, failed(report))
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} == {
        "data_dir",
        "ledger",
        "ledger_signed",
        "keys",
        "broker",
        "dead_letters",
        "lag",
        "stores",
        "tiers",
    }
    assert nulls(report) == []
    assert report["ledger"]["entries"] == 90
    assert report["keys"]["tenant_count"] == 2
    assert report["status"]["dlq"] == 0
    reader = L2Reader(StorePaths(topics.data_dir).l2_db)
    live = reader.counts()
    reader.close()
    assert report["tiers"]["totals"] == {"l1": 0, "l2": 0, "l3": 0, **live}
    markdown = (tmp_path / "healthy" / "report.md").read_text()
    assert "**Result: PASS** (9 of 9 checks passed)" in markdown
    assert "## Records per tier and class" in markdown

    log = StorePaths(topics.data_dir).ledger / "p00002.log"
    lines = log.read_bytes().splitlines()
    lines[5] = lines[5].replace(b'"tenant":"tenant-', b'"tenant":"tenanT-', 1)
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    code, report, _ = run_report(cli_env, tmp_path / "tampered")
    assert code == 1
    assert set(failed(report)) == {"ledger"}
    assert "partition 2 entry 5" in failed(report)["ledger"]
    markdown = (tmp_path / "tampered" / "report.md").read_text()
    assert "**Result: FAIL**" in markdown
    assert "partition 2, entry 5 [changed]" in markdown


async def test_a_stuck_dead_letter_fails_the_report(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """An event the worker dead-lettered and nobody replayed fails the report."""
    await publish_synthetic(topics, events=10, tenants=1, size=16, seed=1, keys=5)
    raw = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap)
    await raw.start()
    try:
        await raw.send_and_wait(topics.memory_topic, b"not an event", key=b"t/k")
    finally:
        await raw.stop()
    await Worker(topics, until_caught_up=True).run()

    code, report, _ = run_report(cli_env, tmp_path / "dlq")
    assert code == 1
    assert set(failed(report)) == {"dead_letters"}
    assert failed(report)["dead_letters"].startswith("1 dead letters await replay")


async def test_a_missing_data_dir_fails_every_check_that_needs_it(
    topics: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Nothing to read is a failed check with its reason, never an empty field."""
    env = dict(cli_env, STRATA_DATA_DIR=str(tmp_path / "nowhere"))
    code, report, _ = run_report(env, tmp_path / "missing")
    assert code == 1
    reasons = failed(report)
    assert {"data_dir", "ledger", "ledger_signed", "keys", "tiers"} <= set(reasons)
    assert all("does not exist" in reasons[n] for n in ("data_dir", "ledger", "keys"))
    for section in ("ledger", "keys", "tiers"):
        assert report[section]["available"] is False
        assert "does not exist" in report[section]["reason"]
    assert nulls(report) == []
    assert (
        "Not available: the ledger folder"
        in (tmp_path / "missing" / "report.md").read_text()
    )
