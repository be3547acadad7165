"""Helpers every command module uses: settings, async running, output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from strata.config import Settings, load_settings
from strata.paths import require_data_dir

T = TypeVar("T")

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout.")
]


def settings(**overrides: Any) -> Settings:
    """The validated settings, with explicit command-line overrides applied."""
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def store_settings(**overrides: Any) -> Settings:
    """:func:`settings`, for a command that works on an existing data dir.

    Raises:
        UsageError: the data dir does not exist (see
            :func:`strata.paths.require_data_dir`).
    """
    loaded = settings(**overrides)
    require_data_dir(loaded.data_dir)
    return loaded


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


def emit(
    as_json: bool, obj: dict[str, Any], human: Callable[[], None] | None = None
) -> None:
    """Print ``obj`` as one JSON line, or call ``human`` to print it for a person."""
    if as_json or human is None:
        sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    else:
        human()


def say(message: str) -> None:
    """Progress for a person on a terminal; silent otherwise so stdout stays clean."""
    if sys.stderr.isatty():
        typer.secho(message, err=True, fg="cyan")


def progress_bar(*extra: ProgressColumn, disable: bool = False) -> Progress:
    """A transient progress bar on stderr, so stdout carries only the command's output.

    Args:
        extra: columns shown after the done/total count (a rate, say).
        disable: draw nothing (not a terminal, or ``--json``).
    """
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=disable,
    )
