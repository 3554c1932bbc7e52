"""How the simulator's time and memory grow with the schedule's size: the measurement behind
the size bound of ``scheduler.simulate.check_simulation_size`` (issue 11 item 9).

    python benchmarks/bench_simulator_scaling.py    # writes benchmarks/results/simulator_scaling_cpu.json

For each schedule at 8 ranks and a few micro-batch counts it runs, in a fresh process each
(so the peak resident memory is that size's own), what ``dualpipe-mhc simulate`` does per
schedule: build, validate, simulate with events recorded (once per stream count, two here).
It reports seconds and peak-RSS bytes per compute half (F, B and W halves; an F&B pair is
two), and the largest per-half figures over all runs, which the bound is derived from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulator import machine  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from dualpipe_mhc.scheduler import Costs, build_schedule, simulate, validate
name, ranks, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
sched = build_schedule(name, ranks, mb)
validate(sched)
costs = Costs.uniform(sched.num_stages, 0.040, 0.045, 0.037, act_bytes=4096 * 4 * 6144 * 2, link_bandwidth=200e9)
results = [simulate(sched, costs) for _ in range(2)]  # n = 1 and the config's n, as the CLI does
seconds = time.perf_counter() - start
halves = sum(len(a.halves()) for a in sched)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"schedule": name, "ranks": ranks, "microbatches": mb, "compute_halves": halves,
                  "seconds": seconds, "peak_rss_bytes_over_import": peak - base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--microbatches", default="512,2048,8192")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulator_scaling_cpu.json"))
    args = parser.parse_args()
    runs = []
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        for mb in (int(v) for v in args.microbatches.split(",")):
            got = subprocess.run([sys.executable, "-c", CHILD, name, str(args.ranks), str(mb)],
                                 check=True, capture_output=True, text=True)
            run = json.loads(got.stdout)
            run["seconds_per_half"] = run["seconds"] / run["compute_halves"]
            run["bytes_per_half"] = run["peak_rss_bytes_over_import"] / run["compute_halves"]
            runs.append(run)
            print(f"{name:9s} {args.ranks} x {mb:6d}: {run['compute_halves']:8d} halves, {run['seconds']:6.2f} s, "
                  f"{run['peak_rss_bytes_over_import'] / 2**20:7.1f} MiB, {1e6 * run['seconds_per_half']:.1f} us "
                  f"and {run['bytes_per_half']:.0f} B per half")
    report = {
        "benchmark": "simulator_scaling",
        "what": "build + validate + 2 x simulate (events recorded) per schedule, fresh process per size",
        "runs": runs,
        "max_seconds_per_half": max(r["seconds_per_half"] for r in runs),
        "max_bytes_per_half": max(r["bytes_per_half"] for r in runs),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"max {1e6 * report['max_seconds_per_half']:.1f} us and {report['max_bytes_per_half']:.0f} B "
          f"per compute half -> {args.out}")


if __name__ == "__main__":
    main()
