"""The command line of ``python -m bench``: choose stages, run them, report.

Runs are the outer loop and stages the inner one, so the figures a ratio
pairs were measured close together in time on a noisy machine. A stage that
cannot run here (a package missing) is reported as skipped with its reason;
one that fails is reported as failed, and the others go on.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shutil
import sys
import time
import traceback
from pathlib import Path

import bench
from bench.context import Broker, Context, Workload, make_workdir
from bench.registry import STAGES, Skip, Stage, ordered_stages
from bench.results import Results

HERE = Path(__file__).resolve().parent


def discover() -> None:
    """Import every module of the package, which registers their stages."""
    for module in pkgutil.iter_modules(bench.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"bench.{module.name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The harness's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Strata benchmarks against raw Kafka clients on a real broker.",
    )
    parser.add_argument("--only", help="comma-separated stages to run (see --list)")
    parser.add_argument("--skip", help="comma-separated stages to leave out")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--events", type=int, default=100_000, help="events per topic")
    parser.add_argument(
        "--size", type=int, default=1024, help="payload bytes per event"
    )
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument(
        "--keys", type=int, default=1000, help="distinct keys per tenant"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each stage")
    parser.add_argument(
        "--rss-events",
        type=int,
        default=1_000_000,
        help="events on the topic of the rss stage",
    )
    parser.add_argument(
        "--rss-runs", type=int, default=None, help="runs of the rss stage (--runs)"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="where results.json and the PNG go"
    )
    parser.add_argument(
        "--keep-topics",
        action="store_true",
        help="leave this run's topics on the broker",
    )
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the scratch folder of data dirs"
    )
    args = parser.parse_args(argv)
    for name in (
        "events",
        "size",
        "partitions",
        "tenants",
        "keys",
        "runs",
        "rss_events",
    ):
        if getattr(args, name) < (0 if name == "size" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def select(args: argparse.Namespace) -> list[Stage]:
    """The stages to run, in order; exits 2 naming an unknown stage."""
    wanted = _names(args.only) if args.only else None
    unwanted = _names(args.skip) if args.skip else set()
    unknown = ((wanted or set()) | unwanted) - set(STAGES)
    if unknown:
        sys.stderr.write(
            f"bench: unknown stage(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(s.name for s in ordered_stages())}\n"
        )
        sys.exit(2)
    return [
        s
        for s in ordered_stages()
        if (s.name in wanted if wanted is not None else s.default)
        and s.name not in unwanted
    ]


def _names(text: str) -> set[str]:
    return {n.strip() for n in text.split(",") if n.strip()}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen stages; return 1 if one failed, else 0 (targets only report)."""
    discover()
    args = parse_args(argv)
    if args.list:
        width = max(len(s.name) for s in ordered_stages())
        for s in ordered_stages():
            runs = f"max {s.max_runs} run" if s.max_runs else "--runs"
            print(f"{s.name:<{width}}  {s.help} [{runs}]")
        return 0
    stages = select(args)
    from strata.logging import configure_logging

    configure_logging("WARNING", json=False)
    workload = Workload(
        args.events, args.size, args.partitions, args.tenants, args.keys
    )
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = make_workdir(args.keep_work)
    results = Results(workload.to_dict(), args.runs)
    try:
        with Broker(workdir) as broker:
            ctx = Context(
                broker.bootstrap,
                workdir,
                workload,
                args.runs,
                args.out,
                options={"rss_events": args.rss_events},
            )
            print(
                f"bench {ctx.prefix_root} on {broker.bootstrap}: "
                f"{', '.join(s.name for s in stages)}; {args.runs} runs",
                flush=True,
            )
            try:
                run_all(ctx, stages, results, rss_runs=args.rss_runs)
            finally:
                if not args.keep_topics:
                    _cleanup(ctx)
    finally:
        if args.keep_work:
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, args.out)
    return 1 if results.failed else 0


def run_all(
    ctx: Context, stages: list[Stage], results: Results, *, rss_runs: int | None
) -> None:
    """Every run of every stage, runs outermost."""
    timings: dict[str, list[float]] = {}
    for run in range(ctx.runs):
        ctx.run = run
        for s in stages:
            limit = rss_runs if s.name == "rss" and rss_runs else s.max_runs
            if (limit is not None and run >= limit) or s.name in (
                results.skipped.keys() | results.failed.keys()
            ):
                continue
            print(f"run {run + 1}/{ctx.runs} {s.name} ...", flush=True)
            began = time.perf_counter()
            try:
                measured = s.measure(ctx)
            except Skip as exc:
                results.skipped[s.name] = str(exc)
                print(f"  skipped: {exc}", flush=True)
                continue
            except Exception as exc:
                results.failed[s.name] = f"{type(exc).__name__}: {exc}"
                print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                continue
            timings.setdefault(s.name, []).append(round(time.perf_counter() - began, 1))
            for m in measured:
                results.add(s.name, run, m)
                print(f"  {m.label}: {m.value:,.3f} {m.unit}", flush=True)
    results.extra.update(ctx.extras)
    results.extra["stage_seconds"] = timings


def report(results: Results, out: Path) -> None:
    """Derive the ratios, write results.json and the chart, print the table."""
    from bench.chart import draw

    results.derive()
    results.write_json(out / "results.json")
    drawn = draw(results, out / "results.png")
    print()
    print(results.table())
    print()
    print(
        f"wrote {out / 'results.json'}"
        + (f" and {out / 'results.png'}" if drawn else "")
    )


def _cleanup(ctx: Context) -> None:
    try:
        deleted = ctx.delete_topics()
    except Exception as exc:
        print(f"could not delete this run's topics: {exc}", flush=True)
        return
    if deleted:
        print(f"deleted {len(deleted)} topics of {ctx.prefix_root}", flush=True)
