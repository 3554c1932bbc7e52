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

HELP = "simulate 1F1B / ZB1P / DualPipe / DualPipeV at n = 1 and the config's n: step time, bubble, exposed comm, memory"
DEFAULT_CONFIG = "paper-27b"
# Each schedule swept or asked for is checked by run_sweep, so pipeline.schedule's own rules
# (a count DualPipeV cannot take, say) do not refuse a run of 1F1B (cli.py reads this).
SWEEPS_SCHEDULES = True
GIB = 2**30


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


def run_sweep(cfg, schedules: list[str], streams: list[int], strict: bool, profile: str | None = None,
              traffic: str = "fused", progress=None) -> tuple[list[dict[str, Any]], list[str], dict]:
    """Simulate every (schedule, n); returns rows, notes about skipped schedules, and results by key."""
    from dualpipe_mhc.scheduler import Costs, ScheduleError, build_schedule, simulate, validate
    from dualpipe_mhc.scheduler.analytic import costs_from_config
    from dualpipe_mhc.scheduler.simulate import check_simulation_size, largest_simulated_microbatches

    progress = progress or (lambda _phase: None)

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    results = {}
    ranks, microbatches = cfg.pipeline.ranks, cfg.pipeline.microbatches
    measured = Costs.from_profile(profile, cfg.link.bandwidth, cfg.link.latency) if profile is not None else None
    too_big = {}
    for name in schedules:  # sizes first: building is linear in the size too
        try:
            check_simulation_size(name, ranks, microbatches)
        except ScheduleError as exc:
            too_big[name] = exc
    if too_big and (strict or len(too_big) == len(schedules)):
        # Nothing to sweep: one line, naming the schedule that fits the most micro-batches.
        raise too_big[max(too_big, key=lambda n: largest_simulated_microbatches(n, ranks))]
    scheds = []
    for name in schedules:  # every schedule checked before any is simulated
        try:
            if name in too_big:
                raise too_big[name]
            progress(f"building {name}")
            sched = build_schedule(name, ranks, microbatches)
            # A profile was measured on one stage count: a swept schedule may need other stages.
            if measured is not None and measured.num_stages != sched.num_stages:
                raise ScheduleError(
                    f"profile {profile} has {measured.num_stages} stages but {name} on {ranks} ranks has "
                    f"{sched.num_stages}; profile that schedule or pick one with --schedule"
                )
            if measured is None and cfg.model.layers < sched.num_stages:
                raise ScheduleError(
                    f"{name} on {ranks} ranks has {sched.num_stages} stages, more than model.layers="
                    f"{cfg.model.layers}; use model.layers>={sched.num_stages} or fewer ranks"
                )
        except ScheduleError as exc:
            if strict:
                raise
            notes.append(f"{name} skipped: {exc}")
            continue
        scheds.append((name, sched))
    if not scheds and notes:  # nothing left to simulate: refuse, naming every reason
        raise ScheduleError("nothing to simulate: " + "; ".join(notes))
    for name, sched in scheds:
        progress(f"validating {name}")
        validate(sched)
        base_step = None
        for n in (streams if measured is None else [None]):
            if measured is not None:
                costs = measured
            else:
                costs = costs_from_config(cfg, sched.num_stages, streams=n, traffic=traffic)
            progress(f"simulating {name}" + (f" n={n}" if n is not None else ""))
            result = simulate(sched, costs)
            results[(name, n)] = result
            if n == 1:
                base_step = result.step_time
            rows.append(_row(name, n, result, base_step))
    return rows, notes, results


def _row(name: str, n: int | None, result, base_step: float | None) -> dict[str, Any]:
    return {
        "schedule": name,
        "streams": n,
        "step_time_s": result.step_time,
        "bubble_fraction": result.bubble_fraction,
        "exposed_comm_s": max(result.exposed_comm),
        "hidden_comm_s": max(result.hidden_comm),
        "peak_activation_gib": max(result.peak_activation_bytes) / GIB,
        "peak_inflight": max(result.peak_inflight),
        "overhead_vs_n1": (result.step_time / base_step - 1.0) if base_step and n != 1 else None,
        "per_rank": {
            "bubble_s": result.bubble,
            "exposed_comm_s": result.exposed_comm,
            "peak_activation_bytes": result.peak_activation_bytes,
        },
    }


def print_table(rows: list[dict[str, Any]], cfg, notes: list[str], source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from dualpipe_mhc.scheduler.builders import DISPLAY_NAMES

    m, p = cfg.model, cfg.pipeline
    title = f"{m.layers} layers, C={m.width}: {p.ranks} ranks x {p.microbatches} micro-batches of {cfg.tokens_per_microbatch()} tokens"
    caption = (
        f"{cfg.hardware.preset}, link {cfg.link.bandwidth / 1e9:g} GB/s one-way + {cfg.link.latency * 1e6:g} us, "
        f"{source} costs; exposed = comm wait on the worst rank; peak = activations on the fullest rank; "
        "overhead = step time over n = 1"
    )
    table = Table(title=title, caption=caption, title_style="bold")
    for col in ("schedule", "n", "step s", "bubble %", "exposed ms", "peak GiB", "overhead %"):
        table.add_column(col, justify="left" if col == "schedule" else "right")
    for row in rows:
        overhead = row["overhead_vs_n1"]
        table.add_row(
            DISPLAY_NAMES.get(row["schedule"], row["schedule"]),
            "-" if row["streams"] is None else str(row["streams"]),
            f"{row['step_time_s']:.3f}",
            f"{100 * row['bubble_fraction']:.1f}",
            f"{1e3 * row['exposed_comm_s']:.1f}",
            f"{row['peak_activation_gib']:.1f}",
            "-" if overhead is None else f"{100 * overhead:+.2f}",
        )
    console = Console()
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")


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
    schedules, strict = _schedules(args)
    streams = _streams(cfg, args)
    profile = getattr(args, "profile", None)
    traffic = getattr(args, "traffic", "fused") or "fused"
    rows, notes, results = run_sweep(
        cfg, schedules, streams, strict, profile, traffic, progress=_progress(cfg, schedules, streams, profile)
    )
    source = "profile" if profile else "analytic"
    print_table(rows, cfg, notes, source)
    files: dict[str, dict[str, str]] = {}
    if getattr(args, "out", None):
        files = _write_files(Path(args.out), results)
        print(f"wrote {sum(len(v) for v in files.values())} files to {args.out}")
    return {
        "command": "simulate",
        "costs": source,
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
        "files": files,
    }


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
