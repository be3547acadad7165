"""``results.png``: rates, ratios against their targets, and the worker's memory curve.

Bars are medians, whiskers span min to max over the runs. Drawn with
matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.results import Results


def draw(results: Results, path: Path) -> bool:
    """Write the chart; False (and no file) when matplotlib is missing or nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figures = list(results.figures.values())
    rates = [
        f for f in figures if f.unit == "events/s" and not f.stage.startswith("profile")
    ]
    ratios = [f for f in figures if f.unit == "ratio" and not f.name.startswith("rss.")]
    curves: list[dict[str, Any]] = results.extra.get("rss_curves", [])
    panels = [p for p in (rates, ratios, curves) if p]
    if not panels:
        return False
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 2.2 + sum(_height(p) for p in panels)),
        gridspec_kw={"height_ratios": [_height(p) for p in panels]},
        squeeze=False,
    )
    row = iter(axes[:, 0])
    if rates:
        _bars(next(row), rates, "events/s (median, min-max)")
    if ratios:
        _bars(next(row), ratios, "ratio (median, min-max); | marks the target")
    if curves:
        _curves(next(row), curves)
    w = results.workload
    fig.suptitle(
        f"Strata benchmarks: {w['events']:,} events of {w['size']} B, "
        f"{w['partitions']} partitions, {w['tenants']} tenants, "
        f"{results.runs} runs",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _height(panel: list[Any]) -> float:
    return 2.8 if panel and isinstance(panel[0], dict) else 0.35 * len(panel) + 0.8


def _bars(ax: Any, figures: list[Any], xlabel: str) -> None:
    labels = [f.label for f in figures]
    medians = [f.median for f in figures]
    low = [f.median - min(f.values) for f in figures]
    high = [max(f.values) - f.median for f in figures]
    colours = [
        "#999999" if f.met is None else ("#2a9d4b" if f.met else "#d1495b")
        for f in figures
    ]
    ys = range(len(figures))
    ax.barh(ys, medians, xerr=[low, high], color=colours, capsize=3)
    for y, f in zip(ys, figures, strict=True):
        goal = f.target
        if goal is not None:
            ax.plot([goal.value, goal.value], [y - 0.4, y + 0.4], color="black", lw=2)
        ax.text(max(f.values), y, f"  {_short(f.median)}", va="center", fontsize=8)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.margins(x=0.12)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _curves(ax: Any, curves: list[dict[str, Any]]) -> None:
    for n, curve in enumerate(curves):
        points = curve["samples"]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            label=f"run {n + 1}",
            lw=1.2,
        )
    ax.axhline(256, color="#d1495b", ls="--", lw=1, label="target 256 MiB")
    ax.set_xlabel("events applied by the worker process", fontsize=9)
    ax.set_ylabel("RSS (MiB)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)


def _short(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f}k"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.3g}"
