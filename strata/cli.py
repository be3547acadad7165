"""The ``strata`` command.

Exit status: 0 on success, 1 when a check finds a problem, 2 on bad usage,
configuration or input, with one line on stderr naming what was wrong.
Commands that report take ``--json`` and then print exactly one JSON object.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import io
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from strata.commands._common import JsonOpt
from strata.commands._common import emit as _emit
from strata.commands._common import run as _run
from strata.commands._common import say as _say
from strata.commands._common import settings as _settings
from strata.config import Settings
from strata.errors import BrokerError, OutputError, StrataError, UsageError
from strata.logging import configure_logging
from strata.validation import check_text

if TYPE_CHECKING:
    from projections.reader import WriteToken


#: The largest offset or version an event or store can hold (Avro long, SQLite INTEGER).
_MAX_LONG = 2**63 - 1

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Strata: an event-sourced memory store for AI agents, over Apache Kafka.",
)
broker_app = typer.Typer(
    no_args_is_help=True, help="A local Kafka broker for development and tests."
)
topics_app = typer.Typer(no_args_is_help=True, help="Topic administration.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")


def _write_bytes(data: bytes) -> None:
    sys.stdout.buffer.write(data)


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option(help="Lowest log level shown on stderr.")
    ] = "WARNING",
) -> None:
    if log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise typer.BadParameter(
            "use DEBUG, INFO, WARNING, ERROR or CRITICAL", param_hint="--log-level"
        )
    configure_logging(log_level)


# -- broker --------------------------------------------------------------------


@broker_app.command("up")
def broker_up_cmd(as_json: JsonOpt = False) -> None:
    """Start a local single-node Kafka broker (KRaft) on loopback ports."""
    from strata.broker import broker_up

    settings = _settings()
    _say(
        "starting Kafka (the first start downloads the broker's jars from Maven Central)"
    )
    info, started = broker_up(settings.data_dir)
    obj = {
        "bootstrap": info.bootstrap,
        "running": True,
        "started": started,
        "pid": info.pid,
        "version": info.version,
    }
    _emit(
        as_json,
        obj,
        lambda: print(
            f"{'started' if started else 'already running'}: Kafka {info.version} at {info.bootstrap}"
            + _bootstrap_hint(settings.kafka_bootstrap, info.bootstrap)
        ),
    )


def _bootstrap_hint(configured: str | None, local: str) -> str:
    if configured and configured != local:
        return (
            f"\nnote: STRATA_KAFKA_BOOTSTRAP={configured} is set, so commands use "
            f"that broker, not this one; unset it or set it to {local}"
        )
    return (
        f"\nexport STRATA_KAFKA_BOOTSTRAP={local}  # optional: commands find it anyway"
    )


@broker_app.command("down")
def broker_down_cmd(as_json: JsonOpt = False) -> None:
    """Stop the local broker."""
    from strata.broker import broker_down

    settings = _settings()
    stopped = broker_down(settings.data_dir)
    if stopped:
        said = "stopped"
    elif settings.kafka_bootstrap:
        said = (
            f"no local broker was running in {settings.data_dir}; the broker at "
            f"{settings.kafka_bootstrap} (STRATA_KAFKA_BOOTSTRAP) is not managed here"
        )
    else:
        said = f"no local broker was running in {settings.data_dir}"
    _emit(as_json, {"stopped": stopped, "running": False}, lambda: print(said))


@broker_app.command("status")
def broker_status_cmd(as_json: JsonOpt = False) -> None:
    """Say whether the local broker runs, and where; exit 1 if it does not."""
    from strata.broker import broker_status

    settings = _settings()
    if settings.kafka_bootstrap:
        # A configured broker is not ours to manage: say whether it answers.
        bootstrap: str | None = settings.kafka_bootstrap
        running = _answers(settings)
        managed, pid = False, None
    else:
        info, running = broker_status(settings.data_dir)
        bootstrap = info.bootstrap if info else None
        managed, pid = True, info.pid if info else None
    obj = {"bootstrap": bootstrap, "running": running, "managed": managed, "pid": pid}
    where = "configured by STRATA_KAFKA_BOOTSTRAP" if not managed else "local broker"
    if bootstrap is None:
        line = (
            f"not running: no local broker was started in {settings.data_dir} "
            "(`strata broker up` starts one)"
        )
    else:
        line = f"{'running' if running else 'not running'}: {bootstrap} ({where})"
    _emit(as_json, obj, lambda: print(line))
    if not running:
        # Scripts wait on this, as they would on `pg_isready`.
        raise typer.Exit(1)


def _answers(settings: Settings, timeout_s: float = 5.0) -> bool:
    """Whether a Kafka broker of the configured bootstrap list describes its
    cluster (a port that merely accepts connections is not a broker)."""
    from strata.kafka import cluster_id

    try:
        _run(cluster_id(settings, timeout_s=timeout_s))
    except BrokerError:
        return False
    return True


# -- topics --------------------------------------------------------------------


@topics_app.command("ensure")
def topics_ensure(as_json: JsonOpt = False) -> None:
    """Create the memory, dead-letter and jobs topics, idempotently."""
    from strata.kafka import ensure_topics

    settings = _settings()
    created = _run(ensure_topics(settings))
    topics = [settings.memory_topic, settings.dlq_topic, settings.jobs_topic]
    _emit(
        as_json,
        {"topics": topics, "created": created},
        lambda: print(
            "\n".join(f"{t}: {'created' if t in created else 'exists'}" for t in topics)
        ),
    )


# -- writing -------------------------------------------------------------------


def _payload(text: str | None, file: Path | None) -> bytes:
    if file is not None and text is not None:
        raise UsageError("give the payload as TEXT, --file or '-', not several")
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as exc:
            raise UsageError(f"--file {file}: {exc.strerror}") from exc
    if text is None:
        raise UsageError("no payload: give TEXT, --file F, or '-' for standard input")
    if text == "-":
        return sys.stdin.buffer.read()
    # The bytes as given: what was not UTF-8 came in as surrogate escapes.
    return os.fsencode(text)


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--meta {pair!r}: expected NAME=VALUE")
        meta[check_text("--meta", name)] = check_text("--meta", value)
    return meta


@app.command("write")
def write_cmd(
    tenant: str,
    key: str,
    text: Annotated[
        str | None, typer.Argument(help="The payload, or '-' to read standard input.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Read the payload from a file.")
    ] = None,
    cls: Annotated[str, typer.Option("--cls", help="The memory's class.")] = "chat",
    agent: Annotated[str, typer.Option(help="The writing agent.")] = "cli",
    expect_version: Annotated[
        int | None,
        typer.Option(
            "--expect-version",
            max=_MAX_LONG,
            help="Apply only if the key is at this version.",
        ),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="Metadata NAME=VALUE (repeatable; not encrypted)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a memory write; print its read-your-writes token."""
    from producers.producer import MemoryProducer
    from strata.keystore import open_keystore

    settings = _settings()
    data = _payload(text, file)
    metadata = _metadata(meta)

    async def go() -> str:
        keystore = open_keystore(settings)
        async with MemoryProducer(settings, keystore) as producer:
            token = await producer.write(
                tenant,
                key,
                data,
                cls=cls,
                agent=agent,
                expected_version=expect_version,
                metadata=metadata,
            )
        return str(token)

    token = _run(go())
    _emit(as_json, {"token": token, "tenant": tenant, "key": key}, lambda: print(token))


@app.command("delete")
def delete_cmd(
    tenant: str,
    key: str,
    agent: Annotated[str, typer.Option(help="The deleting agent.")] = "cli",
    expect_version: Annotated[
        int | None, typer.Option("--expect-version", max=_MAX_LONG)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a delete; print its token."""
    from producers.producer import MemoryProducer
    from strata.keystore import open_keystore

    settings = _settings()

    async def go() -> str:
        keystore = open_keystore(settings)
        async with MemoryProducer(settings, keystore) as producer:
            return str(
                await producer.delete(
                    tenant, key, agent=agent, expected_version=expect_version
                )
            )

    token = _run(go())
    _emit(as_json, {"token": token, "tenant": tenant, "key": key}, lambda: print(token))


# -- reading -------------------------------------------------------------------


def _check_names(tenant: str, key: str | None = None) -> None:
    """Refuse names no write could have used, as a usage error."""
    from strata.validation import check_key, check_tenant

    check_tenant(tenant)
    if key is not None:
        check_key(key)


def _reader(settings: Settings) -> Any:
    from projections.reader import Reader
    from strata.keystore import open_keystore
    from strata.paths import StorePaths, require_data_dir

    # Not "not found": the records may well exist, in the data dir meant.
    require_data_dir(settings.data_dir)
    reader = Reader.from_paths(StorePaths(settings.data_dir), open_keystore(settings))
    reader.l2.check_topic(settings.memory_topic)
    return reader


@app.command("get")
def get_cmd(
    tenant: str,
    key: str,
    as_of: Annotated[
        int | None,
        typer.Option(
            "--as-of",
            min=0,
            max=_MAX_LONG,
            help="The value once the key's partition was projected to OFFSET.",
        ),
    ] = None,
    wait: Annotated[
        str | None,
        typer.Option("--wait", help="Wait until token PARTITION:OFFSET is projected."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds --wait may take.")
    ] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Read a memory (L1, then L2, then L3) and print its payload."""
    from projections.reader import WriteToken

    _check_names(tenant, key)
    settings = _settings()
    reader = _reader(settings)
    if wait is not None:
        try:
            token = WriteToken.parse(wait)
        except ValueError:
            raise UsageError(f"--wait {wait!r}: expected PARTITION:OFFSET") from None
        _run(_check_token(settings, token, wait))
        _run(reader.wait_for(token, timeout_s=timeout))
    memory = reader.get(tenant, key, as_of=as_of)
    # Piped or redirected, the payload's bytes exactly (a payload may be a
    # file); on a terminal, a newline after it so the prompt starts a line.
    end = b"\n" if sys.stdout.isatty() else b""
    _emit(as_json, memory.to_dict(), lambda: _write_bytes(memory.payload + end))


async def _check_token(settings: Settings, token: WriteToken, shown: str) -> None:
    """Refuse a token no write could have returned, rather than wait for it."""
    from strata.kafka import end_offsets
    from strata.status import check_store_source

    topic = settings.memory_topic
    ends = {
        tp.partition: end for tp, end in (await end_offsets(settings, [topic])).items()
    }
    if token.partition not in ends:
        raise UsageError(
            f"--wait {shown}: topic {topic} has no partition {token.partition} "
            f"(it has {len(ends)})"
        )
    if token.offset >= ends[token.partition]:
        raise UsageError(
            f"--wait {shown}: partition {token.partition} of {topic} ends at offset "
            f"{ends[token.partition]}; no write has offset {token.offset} yet"
        )
    # A store of another cluster's topic may be past the token already, and
    # would answer with what it holds instead of the write.
    await check_store_source(settings, ends)


@app.command("history")
def history_cmd(tenant: str, key: str, as_json: JsonOpt = False) -> None:
    """Every event that touched a key, rejected ones included."""
    from projections.reader import history_to_dict

    _check_names(tenant, key)
    rows = _reader(_settings()).history(tenant, key)
    items = [history_to_dict(r) for r in rows]
    _emit(
        as_json,
        {"tenant": tenant, "key": key, "history": items},
        lambda: print(
            "\n".join(
                f"v{r.version:<4} {r.action:<11} {r.partition}:{r.offset:<8} {r.agent:<12} {r.reason}"
                for r in rows
            )
        ),
    )


@app.command("list")
def list_cmd(
    tenant: str,
    prefix: Annotated[
        str | None, typer.Option(help="Only keys starting with this.")
    ] = None,
    cls: Annotated[str | None, typer.Option("--cls", help="Only this class.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List a tenant's live keys."""
    from strata.validation import check_class

    _check_names(tenant)
    if prefix is not None:
        check_text("--prefix", prefix)
    if cls is not None:
        check_class(cls)
    rows = _reader(_settings()).list(tenant, prefix=prefix, cls=cls)
    items = [{"key": k, "version": v, "cls": c, "updated_ms": t} for k, v, c, t in rows]

    def human() -> None:
        for k, v, c, _ in rows:
            print(f"{k}\tv{v}\t{c}")

    _emit(as_json, {"tenant": tenant, "count": len(items), "keys": items}, human)


# -- workers and state ------------------------------------------------------------


def _freeze_heap() -> None:
    """Keep what a service loaded at start out of the collector's full passes.

    Modules, settings and clients live as long as the process; left in the
    collected heap, each full collection walks them all again and stalls the
    event loop for tens of milliseconds, which shows as a latency spike.
    """
    gc.collect()
    gc.freeze()


@app.command("worker")
def worker_cmd(
    group: Annotated[
        str | None, typer.Option(help="Consumer group (default PREFIX.workers).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            help="Serve /metrics (Prometheus), /health and /live on this port.",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host",
            help="Address the metrics server binds (0.0.0.0 inside a container).",
        ),
    ] = "127.0.0.1",
    until_caught_up: Annotated[
        bool,
        typer.Option(
            "--until-caught-up",
            help="Exit once every partition reaches the end offsets seen at start.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Project the memory topic into L1, L2, L3 and the ledger."""
    from consumers.worker import Worker

    if group is not None and (not group.strip() or any(ord(ch) < 0x20 for ch in group)):
        raise UsageError(
            f"--group {group!r}: give a consumer group name, not blank or with "
            "control characters"
        )
    settings = _settings()

    async def go() -> dict[str, Any]:
        from strata.health import serve_worker

        worker = Worker(settings, group=group, until_caught_up=until_caught_up)
        server = (
            serve_worker(worker, metrics_port, host=metrics_host)
            if metrics_port is not None
            else None
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.request_stop)
        _freeze_heap()
        try:
            report = await worker.run()
        finally:
            if server is not None:
                server.stop()
        return report.to_dict()

    result = _run(go())
    _emit(
        as_json,
        result,
        lambda: print(
            f"applied {result['events_applied']} events ({result['dead_letters']} dead-lettered) "
            f"in {result['seconds']}s"
        ),
    )


@app.command("status")
def status_cmd(as_json: JsonOpt = False) -> None:
    """Checkpoints, end offsets, lag and the dead-letter count."""
    from strata.status import collect_status

    obj = _run(collect_status(_settings()))

    def human() -> None:
        names = ("l2", "ledger", "l3")
        print(
            f"{'partition':>9} "
            + " ".join(f"{n:>10}" for n in names)
            + f" {'end':>10} {'lag':>8}"
        )
        for p in obj["partitions"]:
            ckpts = " ".join(f"{p['checkpoints'][n]:>10}" for n in names)
            print(f"{p['partition']:>9} {ckpts} {p['end_offset']:>10} {p['lag']:>8}")
        print(f"dead letters: {obj['dlq']}")
        for w in obj["workers"]:
            state = "alive" if w["alive"] else "gone"
            print(f"worker pid {w['pid']} ({state}): partitions {w['partitions']}")
            for projection, error in w["blocked"].items():
                print(f"  BLOCKED on {projection}: {error}")

    _emit(as_json, obj, human)


@app.command("digest")
def digest_cmd(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Digest this data dir instead.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A digest of each durable projection's state, to compare two data dirs."""
    from projections.registry import digests
    from strata.paths import StorePaths

    root = data_dir or _settings().data_dir
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise UsageError(f"data dir {root} {what}")
    obj = {"projections": digests(StorePaths(root))}
    _emit(
        as_json,
        obj,
        lambda: print("\n".join(f"{n}\t{d}" for n, d in obj["projections"].items())),
    )


@app.command("load")
def load_cmd(
    events: Annotated[
        int, typer.Option("--events", min=1, help="How many events to publish.")
    ],
    tenants: Annotated[int, typer.Option("--tenants", min=1)] = 3,
    size: Annotated[
        int, typer.Option("--size", min=0, help="Payload bytes per event.")
    ] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    keys: Annotated[
        int, typer.Option("--keys", min=1, help="Distinct keys per tenant.")
    ] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Publish synthetic events for benchmarks and soak tests."""
    from producers.load import publish_synthetic

    settings = _settings()
    result = _run(
        publish_synthetic(
            settings, events=events, tenants=tenants, size=size, seed=seed, keys=keys
        )
    )
    _emit(
        as_json,
        result,
        lambda: print(
            f"published {result['events']} events in {result['seconds']}s ({result['events_per_s']:.0f}/s)"
        ),
    )


@app.command("demo")
def demo_cmd(
    sample: Annotated[
        int, typer.Option(help="How many memories to read back and compare.")
    ] = 200,
    as_json: JsonOpt = False,
) -> None:
    """The main job on real input: the chatterbot corpus, end to end."""
    from strata.demo import run_demo

    summary = _run(run_demo(_settings(), sample=sample, progress=_say))

    def human() -> None:
        print(
            f"published {summary['events_published']} memories for {summary['tenants']} tenants "
            f"({summary['agents']} agents) in {summary['publish_seconds']}s"
        )
        print(
            f"projected {summary['events_projected']}; dead letters: {summary['dlq']}"
        )
        print(
            f"read back {summary['sampled']}: {len(summary['sample_mismatches'])} mismatches"
        )
        print(
            f"ledger: {'verified' if summary['ledger_verified'] else 'FAILED'} "
            f"({summary['ledger_entries']} entries)"
        )
        tiers = summary["tiers"]
        print(
            f"tiers: L1 {tiers['l1']} hot, L2 {tiers['l2']} warm, L3 {tiers['l3']} "
            f"cold; took {summary['seconds']}s"
        )

    _emit(as_json, summary, human)
    if not summary["ledger_verified"] or summary["sample_mismatches"]:
        raise typer.Exit(1)


def _register_commands() -> None:
    """Add the command groups of :mod:`strata.commands`, one module each."""
    import importlib
    import pkgutil

    import strata.commands

    names = sorted(m.name for m in pkgutil.iter_modules(strata.commands.__path__))
    for name in names:
        if name.startswith("_"):
            continue
        module = importlib.import_module(f"strata.commands.{name}")
        module.register(app)


def _framework_error(name: str) -> type[Any]:
    # The CLI framework's own error classes, found through the one it exports
    # (typer.BadParameter), whichever click the installed typer builds on.
    found: type[Any] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
    return found


_CLI_USAGE_ERROR = _framework_error("UsageError")
_CLI_ERROR = _framework_error("ClickException")


class _Terminated(KeyboardInterrupt):
    """SIGTERM before a command installs handlers of its own (the worker does):
    stop as on Ctrl-C, running the cleanups, and say why."""

    received = False


def _on_sigterm(_signum: int, _frame: object) -> None:
    _Terminated.received = True
    raise _Terminated


class _GuardedStdout(io.RawIOBase):
    """File descriptor 1, turning a failed write into an :class:`OutputError`
    so the command ends with one line on stderr instead of a traceback."""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return os.isatty(1)

    def write(self, data: Any) -> int:
        try:
            return os.write(1, data)
        except OSError as exc:
            reason = (
                "the reader closed the pipe"
                if exc.errno == errno.EPIPE
                else exc.strerror
            )
            raise OutputError(f"cannot write to standard output: {reason}") from exc


def _guard_stdout() -> None:
    try:
        os.fstat(1)
    except OSError:
        # Started with stdout closed (`>&-`): what it would print goes nowhere.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as we do
        return
    old = sys.stdout
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_GuardedStdout()),
        encoding=old.encoding if old is not None else "utf-8",
        errors=old.errors if old is not None else "strict",
        line_buffering=os.isatty(1),
    )


def main() -> None:
    """Entry point of the ``strata`` command."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _guard_stdout()
    try:
        _register_commands()
        code = app(standalone_mode=False)
        sys.stdout.flush()
    except OutputError as exc:
        # Nothing more goes to the stream that failed, not even at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as we do
        sys.stderr.write(f"strata: {exc}\n")
        sys.exit(exc.exit_code)
    except StrataError as exc:
        sys.stderr.write(f"strata: {exc}\n")
        sys.exit(exc.exit_code)
    except _CLI_USAGE_ERROR as exc:
        # One line, like every other error, instead of the framework's box.
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "strata"
        message = exc.format_message()
        # Without a command the help was printed already: it says the rest.
        sys.stderr.write(
            f"{where}: {message} (see --help)\n"
            if message
            else f"{where}: no command given\n"
        )
        sys.exit(exc.exit_code)
    except _CLI_ERROR as exc:
        sys.stderr.write(f"strata: {exc.format_message()}\n")
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except Exception as exc:
        # A Kafka client error no command turned into a BrokerError of its
        # own (if aiokafka was never imported, none can have been raised).
        kafka_errors = sys.modules.get("aiokafka.errors")
        if kafka_errors is None or not isinstance(exc, kafka_errors.KafkaError):
            raise
        hint = (
            "; STRATA_MAX_PAYLOAD_BYTES may be above what the topic was created "
            "to accept (its max.message.bytes)"
            if isinstance(exc, kafka_errors.MessageSizeTooLargeError)
            else ""
        )
        sys.stderr.write(f"strata: Kafka: {type(exc).__name__}: {exc}{hint}\n")
        sys.exit(BrokerError.exit_code)
    if code == 130:  # the framework's exit status for an interrupt
        if _Terminated.received:
            sys.stderr.write("strata: stopped by SIGTERM\n")
            sys.exit(128 + signal.SIGTERM)
        sys.stderr.write("strata: interrupted\n")
    sys.exit(code if isinstance(code, int) else 0)
