"""A worker's HTTP endpoint: Prometheus metrics, readiness and liveness.

::

    GET /metrics   the worker's registry in Prometheus text format
    GET /health    200 {"ready": true, ...} once the worker holds partitions
                   and no store blocks it; 503 with the reasons otherwise
    GET /live      200 while the process answers

It is the standard library's threading HTTP server in a daemon thread, so a
slow scrape never stalls the event loop. Handlers only read counters and a
few attributes of the worker, which the GIL keeps consistent one by one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from projections.l1 import L1Cache
from strata.errors import UsageError
from strata.metrics import WorkerMetrics
from strata.paths import StorePaths

log = structlog.get_logger(__name__)


class _Flag(Protocol):
    def is_set(self) -> bool: ...


class WorkerView(Protocol):
    """What the endpoint reads from a worker."""

    @property
    def assigned(self) -> _Flag: ...

    @property
    def blocked(self) -> Mapping[str, str]: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def metrics(self) -> WorkerMetrics: ...

    @property
    def l1(self) -> L1Cache: ...

    @property
    def paths(self) -> StorePaths: ...


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a worker is ready, and if not, why."""

    ready: bool
    reasons: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"ready": self.ready, "reasons": self.reasons, "blocked": self.blocked}


def worker_readiness(worker: WorkerView) -> Readiness:
    """Ready when partitions are assigned, no store blocks, and no stop is asked."""
    blocked = dict(worker.blocked)
    reasons = []
    if not worker.assigned.is_set():
        reasons.append("no partitions assigned yet")
    if blocked:
        reasons.append(f"blocked on {', '.join(sorted(blocked))}")
    if worker.stopping:
        reasons.append("stopping")
    return Readiness(not reasons, reasons, blocked)


class HealthServer:
    """Serves /metrics, /health and /live for one registry.

    Args:
        registry: the metrics to expose.
        readiness: called on each /health request.
        host: the address to bind; loopback unless told otherwise.
        port: the port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], Readiness],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served on (once started)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:9108``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises:
            UsageError: the port cannot be bound (in use, not permitted).
        """
        try:
            server = ThreadingHTTPServer((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise UsageError(
                f"metrics port {self._requested_port} on {self.host}: "
                f"{exc.strerror or exc}"
            ) from exc
        server.daemon_threads = True
        server.health = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="strata-health", daemon=True
        )
        self._thread.start()
        log.info("health.serving", url=self.url)

    def stop(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_version = "strata-health"

    def do_GET(self) -> None:
        health: HealthServer = self.server.health  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(
                HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(health.registry)
            )
        elif path == "/health":
            state = health.readiness()
            status = HTTPStatus.OK if state.ready else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, "application/json", json.dumps(state.to_dict()).encode())
        elif path == "/live":
            self._send(HTTPStatus.OK, "application/json", b'{"live": true}')
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health.request", request=format % args)


def serve_worker(
    worker: WorkerView,
    port: int,
    *,
    host: str = "127.0.0.1",
    tier_cache_s: float = 10.0,
) -> HealthServer:
    """Expose a worker's metrics (with its L1 and tier sizes) and readiness.

    Raises:
        UsageError: the port cannot be bound.
    """
    worker.metrics.watch_l1(worker.l1)
    worker.metrics.watch_tiers(worker.paths, worker.l1, max_age_s=tier_cache_s)
    server = HealthServer(
        worker.metrics.registry, lambda: worker_readiness(worker), host=host, port=port
    )
    server.start()
    return server
