"""structlog configuration: JSON lines when not on a terminal, readable on one.

Log lines go to stderr so that ``--json`` output on stdout stays one object.
Never pass payload plaintext or key material as a field.
"""

from __future__ import annotations

import logging
import sys
import time

import structlog


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Set up structlog and route the standard library's logging through it.

    Args:
        level: the lowest level printed.
        json: force JSON (True) or console (False); by default JSON unless
            stderr is a terminal.
    """
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiokafka logs through the standard library; keep its warnings, drop its chatter.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=shared
        )
    )
    handler.addFilter(QuietRepeats("aiokafka"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # The first group operation on a fresh broker creates __consumer_offsets;
    # aiokafka logs the expected "coordinator not available" retry as an error.
    logging.getLogger("aiokafka.consumer.group_coordinator").addFilter(
        _transient_filter
    )
    logging.getLogger("aiokafka").addFilter(_connect_filter)


def _transient_filter(record: logging.LogRecord) -> bool:
    return "GroupCoordinatorNotAvailable" not in record.getMessage()


def _connect_filter(record: logging.LogRecord) -> bool:
    # A broker that cannot be reached at start is reported once, by Strata,
    # as a BrokerError naming the address and the time waited.
    return not record.getMessage().startswith("Unable connect to")


class QuietRepeats(logging.Filter):
    """Let a library's repeated complaint through once a window, not once a retry.

    aiokafka logs each failed retry, ten times a second while a broker is
    away; the first record of a kind passes, like ones (same logger, level
    and message template) are held back for ``window_s`` seconds, and the
    next one to pass says how many were held back.
    """

    def __init__(
        self, prefix: str, *, window_s: float = 30.0, kinds: int = 256
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.window_s = window_s
        self.kinds = kinds
        #: (logger, level, template) -> [when one last passed, held back since]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self.window_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = (
                f"{record.msg} (and {int(seen[1])} like it in the last "
                f"{now - seen[0]:.0f}s)"
            )
        if seen is None and len(self._seen) >= self.kinds:
            del self._seen[next(iter(self._seen))]
        self._seen[kind] = [now, 0]
        return True
