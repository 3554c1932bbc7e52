"""``dualpipe-mhc simulate``: compare pipeline schedules for an mHC model before running anything.

For each schedule (1F1B, ZB1P, DualPipe, DualPipeV) and each stream count (n = 1, the
plain-residual baseline, and the config's n) it builds and validates the schedule, costs
it from the model shape over the hardware and link presets (or from a measured profile),
simulates one step and prints step time, bubble, exposed communication, peak activation
memory and the n-stream overhead. ``--out DIR`` adds a Perfetto trace per run and a PNG
per schedule (at the largest n).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Each schedule swept or asked for is checked by run_sweep, so pipeline.schedule's own rules
# (a count DualPipeV cannot take, say) do not refuse a run of 1F1B (cli.py reads this).
SWEEPS_SCHEDULES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schedule", action="append", metavar="NAME",
        help="1f1b, zb1p, dualpipe or dualpipev (repeat or comma-separate; default: all four)",
    )
    parser.add_argument("--streams", metavar="N,N", help="stream counts to compare (default: 1 and model.streams)")
    parser.add_argument("--profile", metavar="FILE", help="measured per-stage costs (dualpipe-mhc-profile/1 JSON) instead of the analytic model")
    parser.add_argument("--traffic", choices=("fused", "unfused"), default="fused", help="mHC kernel memory-traffic model (default: fused)")


def _schedules(args: argparse.Namespace) -> tuple[list[str], bool]:
    from dualpipe_mhc.scheduler import SCHEDULES

    if not getattr(args, "schedule", None):
        return list(SCHEDULES), False
    names = [n.strip().lower() for item in args.schedule for n in item.split(",") if n.strip()]
    for name in names:
        if name not in SCHEDULES:
            raise ValueError(f"--schedule {name!r} is unknown; use one of {sorted(SCHEDULES)}")
    return names, True


def _streams(cfg, args: argparse.Namespace) -> list[int]:
    raw = getattr(args, "streams", None)
    if raw:
        try:
            values = [int(v) for v in raw.split(",")]
        except ValueError:
            raise ValueError(f"--streams {raw!r} is invalid; use comma-separated ints such as 1,4") from None
        if any(v < 1 for v in values):
            raise ValueError(f"--streams {raw!r} is invalid: every n must be >= 1")
        # Ascending and once each: the n = 1 row must come first to be the overhead's baseline.
        return sorted(set(values))
    n = cfg.model.streams if cfg.model.residual != "plain" else 1
    return sorted({1, n})


def table(report: dict[str, Any]):
    """The sweep's table from its JSON report; fits 80 columns."""
    from rich.table import Table

    from dualpipe_mhc.scheduler.builders import DISPLAY_NAMES

    c = report["config"]
    title = (f"{c['layers']} layers, C={c['width']}: {c['ranks']} ranks x {c['microbatches']} micro-batches "
             f"of {c['tokens_per_microbatch']} tokens")
    caption = (
        f"{c['hardware']}, link {c['link_bandwidth_gbps']:g} GB/s one-way + {c['link_latency_us']:g} us, "
        f"{report['costs']} costs; exposed = comm wait on the worst rank; peak = activations on the fullest rank; "
        "overhead = step time over n = 1"
    )
    out = Table(title=title, caption=caption, title_style="bold")
    for col in ("schedule", "n", "step s", "bubble %", "exposed ms", "peak GiB", "overhead %"):
        out.add_column(col, justify="left" if col == "schedule" else "right", overflow="fold")
    for row in report["rows"]:
        overhead = row["overhead_vs_n1"]
        out.add_row(
            DISPLAY_NAMES.get(row["schedule"], row["schedule"]),
            "-" if row["streams"] is None else str(row["streams"]),
            f"{row['step_time_s']:.3f}",
            f"{100 * row['bubble_fraction']:.1f}",
            f"{1e3 * row['exposed_comm_s']:.1f}",
            f"{row['peak_activation_gib']:.1f}",
            "-" if overhead is None else f"{100 * overhead:+.2f}",
        )
    return out


def _progress(cfg, schedules: list[str], streams: list[int], profile: str | None):
    """A line per phase on stderr where the sweep is long enough to watch (a few seconds and
    up: 100k compute halves, benchmarks/bench_simulator_scaling.py), else nothing."""
    import time

    from dualpipe_mhc.scheduler.builders import compute_halves

    p = cfg.pipeline
    sims = 1 if profile else len(streams)
    work = sum(compute_halves(n, p.ranks, p.microbatches) * (2 + sims) for n in schedules)  # build, validate, sims
    if work < 100_000:
        return None
    start = time.perf_counter()

    def line(phase: str) -> None:
        print(f"simulate: {phase} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    return line


def main(cfg, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from dualpipe_mhc.scheduler.planner import resolve_block_layers
    from dualpipe_mhc.scheduler.sweep import run_sweep

    schedules, strict = _schedules(args)
    streams = _streams(cfg, args)
    profile = getattr(args, "profile", None)
    traffic = getattr(args, "traffic", "fused") or "fused"
    rows, notes, results = run_sweep(
        cfg, schedules, streams, strict, profile, traffic, progress=_progress(cfg, schedules, streams, profile),
        recompute_block=resolve_block_layers(cfg),
    )
    report = {
        "command": "simulate",
        "costs": "profile" if profile else "analytic",
        "traffic": traffic,
        "config": {
            "layers": cfg.model.layers, "width": cfg.model.width, "streams": cfg.model.streams,
            "ranks": cfg.pipeline.ranks, "microbatches": cfg.pipeline.microbatches,
            "tokens_per_microbatch": cfg.tokens_per_microbatch(),
            "link_bandwidth_gbps": cfg.link.bandwidth / 1e9, "link_latency_us": cfg.link.latency * 1e6,
            "hardware": cfg.hardware.preset,
        },
        "rows": rows,
        "skipped": notes,
        "files": {},
    }
    console = Console()
    console.print(table(report))
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    if getattr(args, "out", None):
        report["files"] = _write_files(Path(args.out), results)
        console.print(f"wrote {sum(len(v) for v in report['files'].values())} files to {args.out}")
    return report


def _write_files(out: Path, results: dict) -> dict[str, dict[str, str]]:
    from dualpipe_mhc.scheduler.builders import DISPLAY_NAMES
    from dualpipe_mhc.scheduler.trace import write_chrome_trace, write_timeline_png

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    top_n = max((n for _, n in results if n is not None), default=None)
    for (name, n), result in results.items():
        tag = f"{name}_n{n}" if n is not None else name
        title = f"{DISPLAY_NAMES.get(name, name)}" + (f", n = {n}" if n is not None else "")
        files[tag] = {"trace": str(write_chrome_trace(result, out / f"trace_{tag}.json", title))}
        # Drawing costs ~1 s a picture: one per schedule, at the widest stream count.
        if n == top_n:
            files[tag]["png"] = str(write_timeline_png(result, out / f"timeline_{tag}.png", title))
    return files
