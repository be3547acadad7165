"""structlog configuration: JSON lines when not on a terminal, readable on one.

Log lines go to stderr so that ``--json`` output on stdout stays one object.
Never pass payload plaintext or key material as a field.
"""

from __future__ import annotations

import logging
import sys

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
