"""Figures gathered over runs: median, min and max, targets, the JSON file and the table.

Ratios are computed run by run (the numerator and denominator of one run were
measured minutes apart on the same broker, so they share its noise), then
summarised like any other figure.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.registry import RATIOS, TARGETS, Measurement, Target


@dataclass
class Figure:
    """Every run's value of one named figure."""

    name: str
    unit: str
    label: str
    stage: str
    workload: dict[str, Any]
    values: list[float] = field(default_factory=list)
    #: Position of each value among the runs, so ratios pair the same run.
    runs: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median over runs."""
        return statistics.median(self.values)

    @property
    def target(self) -> Target | None:
        """The bound this figure is held to, if any."""
        return TARGETS.get(self.name)

    @property
    def met(self) -> bool | None:
        """Whether the median meets the target; None without a target."""
        goal = self.target
        if goal is None or not math.isfinite(self.median):
            return None
        return goal.met(self.median)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        goal = self.target
        return {
            "name": self.name,
            "label": self.label,
            "stage": self.stage,
            "unit": self.unit,
            "median": _finite(self.median),
            "min": _finite(min(self.values)),
            "max": _finite(max(self.values)),
            "runs": len(self.values),
            "values": [_finite(v) for v in self.values],
            "workload": self.workload,
            "target": goal.to_dict() if goal else None,
            "met": self.met,
        }


@dataclass
class Results:
    """Everything one invocation of the harness found."""

    workload: dict[str, Any]
    runs: int
    figures: dict[str, Figure] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, stage: str, run: int, measurement: Measurement) -> None:
        """Record one measurement of one run."""
        figure = self.figures.get(measurement.name)
        if figure is None:
            figure = Figure(
                measurement.name,
                measurement.unit,
                measurement.label,
                stage,
                {**self.workload, **measurement.workload},
            )
            self.figures[measurement.name] = figure
        figure.values.append(measurement.value)
        figure.runs.append(run)

    def derive(self) -> None:
        """Compute every registered ratio whose two figures were measured."""
        for spec in RATIOS.values():
            top = self.figures.get(spec.numerator)
            bottom = self.figures.get(spec.denominator)
            if top is None or bottom is None:
                continue
            by_run = dict(zip(bottom.runs, bottom.values, strict=True))
            figure = Figure(
                spec.name,
                spec.unit,
                spec.label,
                "derived",
                top.workload,
            )
            for run, value in zip(top.runs, top.values, strict=True):
                if run in by_run:
                    figure.values.append(spec.compute(value, by_run[run]))
                    figure.runs.append(run)
            if figure.values:
                self.figures[spec.name] = figure

    def to_dict(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "workload": self.workload,
            "runs": self.runs,
            "figures": {name: f.to_dict() for name, f in self.figures.items()},
            "skipped": self.skipped,
            "failed": self.failed,
            **self.extra,
        }

    def write_json(self, path: Path) -> None:
        """Write ``results.json``."""
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    def table(self) -> str:
        """Every figure with its target and whether it is met, as plain text."""
        rows = [("figure", "median", "min", "max", "unit", "runs", "target", "status")]
        for f in self.figures.values():
            goal = f.target
            status = "-" if f.met is None else ("met" if f.met else "NOT MET")
            rows.append(
                (
                    f.label,
                    _fmt(f.median),
                    _fmt(min(f.values)),
                    _fmt(max(f.values)),
                    f.unit,
                    str(len(f.values)),
                    goal.text if goal else "",
                    status,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for n, row in enumerate(rows):
            cells = [
                cell.ljust(w) if i in (0, 4, 6, 7) else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        for name, reason in self.failed.items():
            lines.append(f"FAILED {name}: {reason}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _finite(value: float) -> float | None:
    """JSON has no NaN: a figure that could not be computed is null."""
    return value if math.isfinite(value) else None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import os

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    packages = ("aiokafka", "confluent-kafka", "quixstreams", "fastavro", "strata")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()),
        "packages": {name: version(name) for name in packages},
    }
