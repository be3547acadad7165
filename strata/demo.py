"""The main job on real input: the chatterbot corpus through a real broker.

Publishes every conversation turn of the ``chatterbot-corpus`` package as a
memory (one tenant per language, one agent per topic file), projects them
with a worker until caught up, reads a sample back and compares it with the
source text, verifies the ledger, and reports.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from consumers.worker import Worker
from producers.producer import MemoryProducer
from projections.ledger import verify_ledger
from projections.reader import Reader
from strata.broker import broker_down, broker_status, broker_up
from strata.config import Settings
from strata.errors import UsageError
from strata.kafka import ensure_topics
from strata.keystore import open_keystore
from strata.paths import StorePaths

log = structlog.get_logger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class Turn:
    """One conversation turn of the corpus, as the memory it becomes."""

    tenant: str
    agent: str
    key: str
    text: str
    source: str


def corpus_dir() -> Path:
    """The data folder of the installed chatterbot-corpus package.

    Raises:
        UsageError: the package is not installed.
    """
    try:
        import chatterbot_corpus
    except ImportError as exc:
        raise UsageError("the chatterbot-corpus package is not installed") from exc
    return Path(chatterbot_corpus.__file__).resolve().parent / "data"


def corpus_turns(root: Path | None = None) -> Iterator[Turn]:
    """Every turn of every conversation, in a stable order.

    Raises:
        UsageError: a corpus file is not the YAML shape the corpus documents.
    """
    root = root or corpus_dir()
    for path in sorted(root.glob("*/*.yml")):
        language = path.parent.name
        topic = _SAFE.sub("-", path.stem)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"{path}: cannot read the corpus file: {exc}") from exc
        conversations = doc.get("conversations") or []
        if not isinstance(conversations, list):
            raise UsageError(f"{path}: field conversations is not a list")
        for i, conversation in enumerate(conversations):
            turns = conversation if isinstance(conversation, list) else [conversation]
            for j, text in enumerate(turns):
                if text is None:
                    continue
                yield Turn(
                    tenant=f"lang-{_SAFE.sub('-', language)}",
                    agent=topic,
                    key=f"{topic}/conversation-{i:04d}/turn-{j:02d}",
                    text=str(text),
                    source=f"{path.relative_to(root)}:conversations[{i}][{j}]",
                )


async def run_demo(
    settings: Settings,
    *,
    sample: int = 200,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the main job end to end and return its summary.

    A broker is started when none is configured or recorded, and stopped
    again at the end.
    """
    say = progress or (lambda _msg: None)
    began = time.monotonic()
    started_broker = False
    if settings.kafka_bootstrap is None:
        _recorded, running = broker_status(settings.data_dir)
        if not running:
            say("starting a local Kafka broker (first run downloads its jars)")
            _info, started_broker = broker_up(settings.data_dir)
    try:
        return await _demo(
            settings, sample=sample, say=say, began=began, started=started_broker
        )
    finally:
        if started_broker:
            say("stopping the broker the demo started")
            broker_down(settings.data_dir)


async def _demo(
    settings: Settings,
    *,
    sample: int,
    say: Callable[[str], None],
    began: float,
    started: bool,
) -> dict[str, Any]:
    await ensure_topics(settings)
    paths = StorePaths(settings.data_dir)
    keystore = open_keystore(settings)

    turns = list(corpus_turns())
    say(f"publishing {len(turns)} conversation turns from chatterbot-corpus")
    publish_began = time.monotonic()
    async with MemoryProducer(settings, keystore) as producer:
        pending = [
            await producer.publish(
                producer.seal_write(
                    t.tenant,
                    t.key,
                    t.text,
                    cls="chat",
                    agent=t.agent,
                    metadata={"source": t.source},
                )
            )
            for t in turns
        ]
        await asyncio.gather(*pending)
    publish_s = time.monotonic() - publish_began

    say("projecting with a worker until caught up")
    worker = Worker(
        settings,
        group=f"{settings.topic_prefix}.demo",
        keystore=keystore,
        until_caught_up=True,
    )
    report = await worker.run()

    say(f"reading {sample} memories back and comparing with the corpus")
    reader = Reader(paths.l2_db, keystore, l1=worker.l1)
    latest = {(t.tenant, t.key): t for t in turns}
    rng = random.Random(7)  # noqa: S311 - a repeatable sample, not a secret
    picks = rng.sample(sorted(latest), min(sample, len(latest)))
    mismatched = [
        f"{tenant}/{key}"
        for tenant, key in picks
        if reader.get(tenant, key).payload.decode() != latest[(tenant, key)].text
    ]
    counts = reader.l2.counts()
    reader.close()

    say("verifying the ledger chain")
    verified = verify_ledger(paths.ledger)
    return {
        "events_published": len(turns),
        "events_projected": report.events_applied,
        "tenants": len({t.tenant for t in turns}),
        "agents": len({(t.tenant, t.agent) for t in turns}),
        "sampled": len(picks),
        "sample_mismatches": mismatched,
        "ledger_verified": verified.ok,
        "ledger_entries": verified.entries,
        "ledger_findings": [f.to_dict() for f in verified.findings],
        "tiers": {
            "l1": len(worker.l1),
            "l2": counts.get("l2", 0),
            "l3": counts.get("l3", 0),
        },
        "dlq": report.dead_letters,
        "publish_seconds": round(publish_s, 2),
        "seconds": round(time.monotonic() - began, 2),
        "broker_started": started,
        "topic": settings.memory_topic,
    }
