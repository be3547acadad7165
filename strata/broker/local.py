"""Run a single-node Apache Kafka broker (KRaft) on loopback, built from Maven jars.

The broker lives in ``<strata data dir>/broker``::

    broker.json        what was started: pid, ports, cluster id, running or not
    server.properties  written on every start
    kafka-logs/        the partitions and the KRaft metadata log
    broker.log         the broker's own log (log4j2, size-capped)
    broker.out         the JVM's stdout and stderr of the latest start
    .lock              serialises ``up`` and ``down`` on one folder

Jars come from Maven Central through ``mvn dependency:copy-dependencies`` on the
``pom.xml`` next to this module and are cached per Kafka version.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

import structlog

from strata.errors import BrokerError, ConfigError

__all__ = [
    "KAFKA_VERSION",
    "BrokerInfo",
    "broker_down",
    "broker_status",
    "broker_up",
    "ensure_jars",
    "jar_cache_dir",
    "recorded_bootstrap",
]

KAFKA_VERSION: str = "4.1.1"

_T = TypeVar("_T")

log = structlog.get_logger(__name__)

_HOST = "127.0.0.1"
_HERE = Path(__file__).resolve().parent
_POM = _HERE / "pom.xml"
_LOG4J_CONFIG = _HERE / "log4j2.properties"

_JARS_ENV = "STRATA_KAFKA_JARS_DIR"
_MARKER = ".strata-complete"
_STATE_FILE = "broker.json"
_LOCK_FILE = ".lock"
_PROPERTIES_FILE = "server.properties"
_LOG_FILE = "broker.log"
_CONSOLE_FILE = "broker.out"
_LOG_DIRS = "kafka-logs"

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:[.-][A-Za-z0-9]+)*$")
# Java stack frames crowd the message out of a short tail; the "Caused by:"
# lines that carry the reasons are kept.
_FRAME_RE = re.compile(r"^\s+(?:at |\.\.\. \d+ more)")
_TAIL_LINES = 20
_MVN_TIMEOUT_S = 1800.0
_FORMAT_TIMEOUT_S = 120.0
_KILL_WAIT_S = 10.0
_POLL_S = 0.2

# Brokers this process started: holding the Popen objects lets us reap them
# (a zombie still answers kill(pid, 0)) and keeps Popen's destructor quiet.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class BrokerInfo:
    """A local broker as recorded in ``broker.json``.

    Attributes:
        bootstrap: the client address, ``"127.0.0.1:PORT"``.
        pid: process id of the broker's JVM (of the latest start).
        version: Kafka version it runs.
        data_dir: the broker's own folder, ``<strata data dir>/broker``.
        log_file: the broker's log file.
        started_at_ms: wall-clock start time, milliseconds since the epoch.
    """

    bootstrap: str
    pid: int
    version: str
    data_dir: Path
    log_file: Path
    started_at_ms: int


class _State(TypedDict):
    bootstrap: str
    pid: int
    version: str
    port: int
    controller_port: int
    cluster_id: str
    started_at_ms: int
    running: bool


# --------------------------------------------------------------------------- jars


def jar_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Return the folder that holds (or will hold) the broker jars of ``version``.

    ``$STRATA_KAFKA_JARS_DIR`` when set (a folder already holding the jars);
    otherwise ``$XDG_CACHE_HOME/strata/kafka/<version>``, falling back to
    ``~/.cache/strata/kafka/<version>``.

    Args:
        version: the Kafka version, e.g. ``"4.1.1"``.

    Raises:
        ConfigError: ``version`` is not a version number.
    """
    _check_version(version)
    override = os.environ.get(_JARS_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / "strata" / "kafka" / version


def ensure_jars(
    version: str = KAFKA_VERSION,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Make sure the broker jars of ``version`` are on disk and return their folder.

    A cached folder is used as is. Otherwise Maven resolves the jars into a
    temporary folder next to the cache, a marker file records completion, and
    the folder is renamed into place, so an interrupted download never leaves
    a half-filled cache.

    Args:
        version: the Kafka version to resolve.
        progress: called with a short human-readable line before a download.

    Raises:
        ConfigError: ``mvn`` or ``java`` is missing, the version is malformed,
            or ``$STRATA_KAFKA_JARS_DIR`` does not hold the jars of ``version``.
        BrokerError: Maven failed or timed out.
    """
    cache = jar_cache_dir(version)
    main_jar = f"kafka_2.13-{version}.jar"
    if os.environ.get(_JARS_ENV):
        if not (cache / main_jar).is_file():
            raise ConfigError(f"{_JARS_ENV}={cache} holds no {main_jar}")
        return cache
    if (cache / _MARKER).is_file():
        return cache

    _find_java()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError(
            "mvn not found on PATH: Maven is needed to download the Kafka jars"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(
        tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=cache.parent)
    )
    try:
        # mkdtemp makes the folder private; the cache it becomes need not be.
        partial.chmod(0o755)
        log.info("broker.jars_resolving", version=version, cache=str(cache))
        if progress is not None:
            progress(f"downloading Apache Kafka {version} jars from Maven Central")
        _run_maven(mvn, version, partial)
        if not (partial / main_jar).is_file():
            raise BrokerError(f"mvn finished but {main_jar} is not in {partial}")
        (partial / _MARKER).write_text(f"{version}\n", encoding="utf-8")
        if cache.exists() and not (cache / _MARKER).is_file():
            # No marker: not the result of a finished download, so replace it.
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.rename(partial, cache)
        except OSError as exc:
            # Another process may have finished the same download first.
            if not (cache / _MARKER).is_file():
                raise BrokerError(f"cannot move the jars into {cache}: {exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cache


def _run_maven(mvn: str, version: str, out_dir: Path) -> None:
    cmd = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(_POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
        f"-DoutputDirectory={out_dir}",
    ]
    try:
        done = subprocess.run(
            cmd,
            cwd=out_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_MVN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(
            f"mvn did not resolve the Kafka {version} jars within {_MVN_TIMEOUT_S:g} s"
        ) from exc
    if done.returncode != 0:
        tail = _tail_of_text(done.stdout + done.stderr)
        raise BrokerError(
            f"mvn could not resolve the Kafka {version} jars "
            f"(exit {done.returncode}):\n{tail}"
        )


def _find_java() -> str:
    # Same order as Kafka's own kafka-run-class.sh: JAVA_HOME wins over PATH.
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise ConfigError(
            "java not found: install Java 17 or newer on PATH or set JAVA_HOME"
        )
    return found


def _check_version(version: str) -> None:
    if not _VERSION_RE.fullmatch(version):
        raise ConfigError(f"not a Kafka version: {version!r}")


# ------------------------------------------------------------------- public API


def broker_up(
    strata_data_dir: Path,
    *,
    version: str = KAFKA_VERSION,
    timeout_s: float = 120.0,
    heap_mb: int = 512,
) -> tuple[BrokerInfo, bool]:
    """Start the local broker of ``strata_data_dir``, or find the running one.

    If the broker recorded in ``<strata_data_dir>/broker/broker.json`` is alive
    and accepts connections it is returned as is. Otherwise the jars are
    ensured, storage is formatted (keeping the cluster id and data of earlier
    runs), the broker JVM is started in its own session, and the call waits
    until its client port accepts a TCP connection. Ports of the previous run
    are kept when they are still free, so recorded addresses stay valid.

    Args:
        strata_data_dir: Strata's data folder; the broker uses ``broker/`` in it.
        version: Kafka version to run when a new broker is started.
        timeout_s: how long to wait for the port to accept, once the JVM runs.
        heap_mb: JVM heap (both ``-Xms`` and ``-Xmx``), in MiB.

    Returns:
        ``(info, started_now)``; ``started_now`` is False for a broker that
        was already running.

    Raises:
        ConfigError: ``java`` or ``mvn`` is missing, or an argument is invalid.
        BrokerError: the jars cannot be resolved, formatting fails, the JVM
            exits early (the message holds the end of its log), the port does
            not accept in time (the JVM is then killed), or a recorded broker
            is alive but does not accept connections.
    """
    if heap_mb < 1:
        raise ConfigError(f"heap_mb must be positive, got {heap_mb}")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
    broker_dir = _broker_dir(strata_data_dir)
    with _locked(broker_dir):
        state = _read_state(broker_dir)
        if (
            state is not None
            and state["running"]
            and _pid_is_broker(state["pid"], broker_dir)
        ):
            if _port_accepts(state["port"]):
                return _info(broker_dir, state), False
            raise BrokerError(
                f"broker pid {state['pid']} of {broker_dir} is running but "
                f"{state['bootstrap']} does not accept connections; "
                "stop it with `strata broker down`"
            )
        return _start(broker_dir, state, version, timeout_s, heap_mb), True


def broker_down(strata_data_dir: Path, *, timeout_s: float = 30.0) -> bool:
    """Stop the local broker of ``strata_data_dir`` if it runs.

    Sends SIGTERM to the broker's process group, waits up to ``timeout_s`` for
    its controlled shutdown, then sends SIGKILL. ``broker.json`` is marked as
    stopped but keeps the ports and cluster id for the next ``broker_up``.

    Args:
        strata_data_dir: Strata's data folder.
        timeout_s: grace period before SIGKILL.

    Returns:
        True if a running broker was stopped.

    Raises:
        BrokerError: the process survived SIGKILL.
    """
    broker_dir = _broker_dir(strata_data_dir)
    if not (broker_dir / _STATE_FILE).is_file():
        return False
    with _locked(broker_dir):
        state = _read_state(broker_dir)
        if state is None or not state["running"]:
            return False
        stopped = False
        if _pid_is_broker(state["pid"], broker_dir):
            log.info("broker.stopping", pid=state["pid"], bootstrap=state["bootstrap"])
            _stop_process_group(state["pid"], broker_dir, timeout_s)
            stopped = True
        state["running"] = False
        _write_state(broker_dir, state)
        if stopped:
            log.info("broker.stopped", pid=state["pid"], bootstrap=state["bootstrap"])
        return stopped


def broker_status(strata_data_dir: Path) -> tuple[BrokerInfo | None, bool]:
    """Report the recorded broker of ``strata_data_dir`` and whether it runs.

    Args:
        strata_data_dir: Strata's data folder.

    Returns:
        ``(info, running)``: ``info`` is None when no broker was ever recorded;
        ``running`` means its process is alive and its port accepts.
    """
    broker_dir = _broker_dir(strata_data_dir)
    state = _read_state(broker_dir)
    if state is None:
        return None, False
    running = (
        state["running"]
        and _pid_is_broker(state["pid"], broker_dir)
        and _port_accepts(state["port"])
    )
    return _info(broker_dir, state), running


def recorded_bootstrap(strata_data_dir: Path) -> str | None:
    """Return the bootstrap address of the running recorded broker, else None.

    Args:
        strata_data_dir: Strata's data folder.
    """
    info, running = broker_status(strata_data_dir)
    return info.bootstrap if info is not None and running else None


# ---------------------------------------------------------------------- starting


def _start(
    broker_dir: Path,
    previous: _State | None,
    version: str,
    timeout_s: float,
    heap_mb: int,
) -> BrokerInfo:
    jars = ensure_jars(version)
    java = _find_java()
    log_dir = broker_dir / _LOG_DIRS
    log_file = broker_dir / _LOG_FILE
    props = broker_dir / _PROPERTIES_FILE

    port, controller_port = _choose_ports(previous)
    bootstrap = f"{_HOST}:{port}"
    props.write_text(
        _server_properties(log_dir, port, controller_port), encoding="utf-8"
    )
    # meta.properties is the truth once storage is formatted; broker.json only
    # bridges a folder whose storage was never formatted.
    cluster_id = (
        _stored_cluster_id(log_dir)
        or (previous["cluster_id"] if previous is not None else None)
        or _new_cluster_id()
    )
    log.info(
        "broker.starting",
        version=version,
        bootstrap=bootstrap,
        controller_port=controller_port,
        data_dir=str(broker_dir),
    )
    _format_storage(java, jars, props, log_file, cluster_id)

    log_offset = log_file.stat().st_size if log_file.exists() else 0
    console = broker_dir / _CONSOLE_FILE
    cmd = [
        java,
        f"-Xmx{heap_mb}m",
        f"-Xms{heap_mb}m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        # An OOM leaves threads dead inside a live process; better to exit
        # and show up as stopped than to hang half-working.
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        # log4j's own shutdown hook would stop logging halfway through Kafka's
        # shutdown hook; lines are flushed one by one, so nothing is lost.
        "-Dlog4j2.shutdownHookEnabled=false",
        f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
        f"-Dstrata.broker.log={log_file}",
        "-cp",
        f"{jars}/*",
        "kafka.Kafka",
        str(props),
    ]
    started_at_ms = int(time.time() * 1000)
    launched = time.monotonic()
    with console.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=broker_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    try:
        _wait_ready(proc, port, timeout_s, launched, broker_dir, log_offset)
    except BaseException:
        # Never leave a JVM behind that nothing recorded.
        _stop_process_group(proc.pid, broker_dir, _KILL_WAIT_S)
        raise

    state: _State = {
        "bootstrap": bootstrap,
        "pid": proc.pid,
        "version": version,
        "port": port,
        "controller_port": controller_port,
        "cluster_id": cluster_id,
        "started_at_ms": started_at_ms,
        "running": True,
    }
    _write_state(broker_dir, state)
    log.info(
        "broker.ready",
        bootstrap=bootstrap,
        pid=proc.pid,
        seconds=round(time.monotonic() - launched, 1),
    )
    return _info(broker_dir, state)


def _wait_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    timeout_s: float,
    launched: float,
    broker_dir: Path,
    log_offset: int,
) -> None:
    address = f"{_HOST}:{port}"
    deadline = launched + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            raise BrokerError(
                f"the broker exited with code {code} before accepting connections "
                f"on {address}; end of its log:\n{_start_tail(broker_dir, log_offset)}"
            )
        if _port_accepts(port):
            return
        if time.monotonic() >= deadline:
            log.warning("broker.start_timeout", bootstrap=address, pid=proc.pid)
            # Kill before reading the tail so the message ends the story.
            _stop_process_group(proc.pid, broker_dir, _KILL_WAIT_S)
            raise BrokerError(
                f"the broker did not accept connections on {address} within "
                f"{timeout_s:g} s and was killed; end of its log:\n"
                f"{_start_tail(broker_dir, log_offset)}"
            )
        time.sleep(_POLL_S)


def _format_storage(
    java: str, jars: Path, props: Path, log_file: Path, cluster_id: str
) -> None:
    cmd = [
        java,
        "-Xmx256m",
        # A one-shot tool: the fastest JVM start beats peak throughput.
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
        f"-Dstrata.broker.log={log_file}",
        "-cp",
        f"{jars}/*",
        "kafka.tools.StorageTool",
        "format",
        # One argument: an id kept from an earlier run may start with '-'.
        f"--cluster-id={cluster_id}",
        "-c",
        str(props),
        # Accept an already formatted directory: that is how data survives.
        "-g",
    ]
    try:
        done = subprocess.run(
            cmd,
            cwd=props.parent,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_FORMAT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(
            f"formatting the broker storage took over {_FORMAT_TIMEOUT_S:g} s"
        ) from exc
    if done.returncode != 0:
        raise BrokerError(
            f"formatting the broker storage in {props.parent} failed "
            f"(exit {done.returncode}):\n{_tail_of_text(done.stdout + done.stderr)}"
        )


def _server_properties(log_dir: Path, port: int, controller_port: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{_HOST}:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listeners": (
            f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{_HOST}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        # The defaults (replication 3, min ISR 2, 50 partitions) cannot work
        # or are slow on one node.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "3",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        # Tests and local runs want groups to form at once and short sessions.
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        # The cleaner takes this from the heap at start (128 MiB by default).
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    lines = ["# Written by strata on every `broker up`; edits are overwritten."]
    lines += [f"{key}={_escape_property(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _escape_property(value: str) -> str:
    # Java .properties treats backslash as an escape (Windows-style paths).
    return value.replace("\\", "\\\\")


def _stored_cluster_id(log_dir: Path) -> str | None:
    try:
        text = (log_dir / "meta.properties").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "cluster.id" and value.strip():
            return value.strip()
    return None


def _new_cluster_id() -> str:
    """A random cluster id in Kafka's form (URL-safe base64 of 16 bytes).

    Like Kafka's own ids, never one that starts with '-', which command-line
    tools would read as an option.
    """
    while True:
        cluster_id = (
            base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        )
        if not cluster_id.startswith("-"):
            return cluster_id


# ------------------------------------------------------------------------- ports


def _choose_ports(previous: _State | None) -> tuple[int, int]:
    port = previous["port"] if previous is not None else None
    controller = previous["controller_port"] if previous is not None else None
    if port is not None and not _port_free(port):
        port = None
    if controller is not None and (controller == port or not _port_free(controller)):
        controller = None
    while port is None or controller is None:
        fresh = _ephemeral_port()
        if fresh in (port, controller):
            continue
        if port is None:
            port = fresh
        else:
            controller = fresh
    return port, controller


def _ephemeral_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The JVM binds with SO_REUSEADDR, so sockets of the previous broker
        # left in TIME_WAIT do not make the port unusable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _port_accepts(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------- processes


def _pid_is_broker(pid: int, broker_dir: Path) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Alive but another user's: not a broker we started.
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        # Without /proc (macOS) the pid is all we can check.
        return not Path("/proc/self").exists()
    # Guards against a recycled pid: signalling its group would hit a stranger.
    # A zombie has an empty cmdline, so it counts as gone.
    args = cmdline.split(b"\0")
    return b"kafka.Kafka" in args and os.fsencode(broker_dir / _PROPERTIES_FILE) in args


def _stop_process_group(pid: int, broker_dir: Path, timeout_s: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    if _wait_gone(pid, broker_dir, timeout_s):
        return
    log.warning("broker.killing", pid=pid, waited_s=timeout_s)
    _signal_group(pid, signal.SIGKILL)
    if not _wait_gone(pid, broker_dir, _KILL_WAIT_S):
        raise BrokerError(f"broker pid {pid} survived SIGKILL")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        # Not a group leader (started some other way): signal the pid alone.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid: int, broker_dir: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_is_broker(pid, broker_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


# ------------------------------------------------------------------ state files


def _broker_dir(strata_data_dir: Path) -> Path:
    return Path(strata_data_dir).expanduser().resolve() / "broker"


@contextlib.contextmanager
def _locked(broker_dir: Path) -> Iterator[None]:
    broker_dir.mkdir(parents=True, exist_ok=True)
    with (broker_dir / _LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_state(broker_dir: Path) -> _State | None:
    path = broker_dir / _STATE_FILE
    try:
        data: object = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("broker.state_unreadable", path=str(path), error=str(exc))
        return None
    if not isinstance(data, dict):
        log.warning("broker.state_unreadable", path=str(path), error="not an object")
        return None
    try:
        return {
            "bootstrap": _typed(data, "bootstrap", str),
            "pid": _typed(data, "pid", int),
            "version": _typed(data, "version", str),
            "port": _typed(data, "port", int),
            "controller_port": _typed(data, "controller_port", int),
            "cluster_id": _typed(data, "cluster_id", str),
            "started_at_ms": _typed(data, "started_at_ms", int),
            "running": _typed(data, "running", bool),
        }
    except (KeyError, TypeError) as exc:
        log.warning("broker.state_unreadable", path=str(path), error=str(exc))
        return None


def _typed(data: dict[object, object], key: str, kind: type[_T]) -> _T:
    value = data[key]
    if not isinstance(value, kind):
        raise TypeError(f"{key}: expected {kind.__name__}")
    return value


def _write_state(broker_dir: Path, state: _State) -> None:
    path = broker_dir / _STATE_FILE
    tmp = path.with_name(f".{_STATE_FILE}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _info(broker_dir: Path, state: _State) -> BrokerInfo:
    return BrokerInfo(
        bootstrap=state["bootstrap"],
        pid=state["pid"],
        version=state["version"],
        data_dir=broker_dir,
        log_file=broker_dir / _LOG_FILE,
        started_at_ms=state["started_at_ms"],
    )


# ------------------------------------------------------------------------ tails


def _start_tail(broker_dir: Path, log_offset: int) -> str:
    """The end of what this start wrote: log4j file first, then JVM console."""
    text = ""
    log_file = broker_dir / _LOG_FILE
    with contextlib.suppress(OSError), log_file.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        # A smaller file means it rolled over during the start.
        handle.seek(log_offset if log_offset <= size else 0)
        text += handle.read().decode("utf-8", errors="replace")
    with contextlib.suppress(OSError):
        console = (broker_dir / _CONSOLE_FILE).read_bytes()
        text += "\n" + console.decode("utf-8", errors="replace")
    return _tail_of_text(text) or "(the log is empty)"


def _tail_of_text(text: str, lines: int = _TAIL_LINES) -> str:
    kept = [
        line.rstrip()
        for line in text.splitlines()
        if line.strip() and not _FRAME_RE.match(line)
    ]
    return "\n".join(kept[-lines:])
