"""The stage registry: what each benchmark measures, and the targets it is held to.

A stage is a function that takes the :class:`~bench.context.Context` and
returns the measurements of one run. Modules in ``bench/`` register stages
with :func:`stage`, figures computed from other figures with :func:`ratio`,
and targets with :func:`target`. The harness imports every module of the
package, so a new benchmark (rotation rate, ledger verify rate, read latency
per tier, ...) is a new module and nothing else::

    @stage("verify", "ledger verify rate", order=80)
    def verify(ctx: Context) -> list[Measurement]:
        ...
        return [Measurement("verify.ledger", entries / seconds, "entries/s",
                            "strata ledger verify")]
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.context import Context

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_SYMBOLS = {">=": "≥", ">": ">", "<=": "≤", "<": "<"}


class Skip(Exception):  # noqa: N818 - reads as `raise Skip("reason")`
    """Raised by a stage that cannot run here; the reason goes in the results."""


@dataclass(frozen=True)
class Measurement:
    """One figure of one run.

    Attributes:
        name: dotted and stable, ``stage.what`` (results are keyed by it).
        value: the number measured.
        unit: ``events/s``, ``MiB``, ``ratio``, ...
        label: what a reader of the table needs to know it is.
        workload: fields that differ from the run's workload (``events``...).
    """

    name: str
    value: float
    unit: str
    label: str
    workload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A bound a figure is held to: ``figure OP value``."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target operator {self.op!r} is not one of {list(_OPS)}")

    def met(self, figure: float) -> bool:
        """Whether the figure satisfies the bound."""
        return _OPS[self.op](figure, self.value)

    @property
    def text(self) -> str:
        """The bound as the table prints it, e.g. ``≥ 0.7``."""
        return f"{_SYMBOLS[self.op]} {self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"op": self.op, "value": self.value, "text": self.text}


@dataclass(frozen=True)
class Stage:
    """A registered benchmark stage."""

    name: str
    help: str
    measure: Callable[[Context], list[Measurement]]
    order: int
    #: None: as many runs as ``--runs``; a number caps them (a profile runs once).
    max_runs: int | None
    default: bool


@dataclass(frozen=True)
class Ratio:
    """A figure computed per run from two others: ``numerator / denominator``.

    ``minus_one`` turns a ratio into an overhead (``0.12`` for 12 % slower).
    """

    name: str
    numerator: str
    denominator: str
    label: str
    unit: str = "ratio"
    minus_one: bool = False

    def compute(self, numerator: float, denominator: float) -> float:
        """The derived value of one run."""
        value = numerator / denominator if denominator else float("nan")
        return value - 1.0 if self.minus_one else value


STAGES: dict[str, Stage] = {}
RATIOS: dict[str, Ratio] = {}
TARGETS: dict[str, Target] = {}


def stage(
    name: str,
    help: str,
    *,
    order: int = 100,
    max_runs: int | None = None,
    default: bool = True,
) -> Callable[[Callable[[Context], list[Measurement]]], Callable[..., Any]]:
    """Register a stage under ``name`` (what ``--only`` and ``--skip`` take).

    Args:
        name: short, lower case, unique.
        help: one line for ``--list``.
        order: stages run in ascending order within each run.
        max_runs: cap on runs; None follows ``--runs``.
        default: False keeps the stage out of a plain ``python -m bench``.
    """

    def register(
        fn: Callable[[Context], list[Measurement]],
    ) -> Callable[[Context], list[Measurement]]:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        STAGES[name] = Stage(name, help, fn, order, max_runs, default)
        return fn

    return register


def ratio(
    name: str,
    numerator: str,
    denominator: str,
    label: str,
    *,
    minus_one: bool = False,
    unit: str = "ratio",
) -> None:
    """Register a figure derived per run from two measured figures."""
    RATIOS[name] = Ratio(name, numerator, denominator, label, unit, minus_one)


def target(name: str, op: str, value: float) -> None:
    """Hold figure ``name`` (measured or derived) to ``name OP value``."""
    TARGETS[name] = Target(op, value)


def ordered_stages() -> list[Stage]:
    """Every registered stage in run order."""
    return sorted(STAGES.values(), key=lambda s: (s.order, s.name))
