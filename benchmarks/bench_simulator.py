"""Time the simulator on a 64-rank, 512-micro-batch DualPipe step (issue 3: under 2 s on the 2-core box).

    python benchmarks/bench_simulator.py            # writes benchmarks/results/simulator_cpu.json

Builds and validates once, warms up once, then reports the median (and min/max) of several
repeats for: building the schedule, simulating it (events recorded, as the CLI does),
without events, and with the Event objects materialised (what trace export adds). Costs: uniform stages, H800-style link, n = 4 activations of a C = 6144,
4096-token micro-batch, so the link queues are exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from dualpipe_mhc.scheduler import Costs, build_schedule, simulate, validate


def _time(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "repeats": repeats}


def machine() -> dict:
    """Where a CPU benchmark ran: the box is shared, so its load rides along with the figures."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=512)
    parser.add_argument("--schedule", default="dualpipe")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulator_cpu.json"))
    args = parser.parse_args()

    sched = build_schedule(args.schedule, args.ranks, args.microbatches)
    validate(sched)
    act_bytes = 4096 * 4 * 6144 * 2  # T x n x C x bf16
    costs = Costs.uniform(sched.num_stages, 0.040, 0.045, 0.037, act_bytes=act_bytes, link_bandwidth=200e9, link_latency=3e-6)
    actions = sum(len(a) for a in sched.actions)
    report = {
        "benchmark": "simulator",
        "schedule": args.schedule,
        "ranks": args.ranks,
        "microbatches": args.microbatches,
        "compute_actions": actions,
        "build": _time(lambda: build_schedule(args.schedule, args.ranks, args.microbatches), args.repeats),
        "simulate_with_events": _time(lambda: simulate(sched, costs), args.repeats),
        "simulate_without_events": _time(lambda: simulate(sched, costs, record_events=False), args.repeats),
        "simulate_and_materialise_events": _time(lambda: simulate(sched, costs).events, args.repeats),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    sim = report["simulate_with_events"]["median_s"]
    report["actions_per_s"] = actions / sim
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.schedule} {args.ranks} ranks x {args.microbatches} micro-batches ({actions} compute actions): "
        f"build {report['build']['median_s']:.3f} s, simulate {sim:.3f} s median "
        f"({report['simulate_without_events']['median_s']:.3f} s without events, "
        f"{report['simulate_and_materialise_events']['median_s']:.3f} s with Event objects), "
        f"{report['actions_per_s'] / 1e3:.0f}k actions/s -> {args.out}"
    )


if __name__ == "__main__":
    main()
