"""Simulated pipeline bubbles of a config under model.split = even and balanced, against the
published formulas (docs/DESIGN.md §5) on the average stage.

    python benchmarks/split_bubbles.py [--config paper-27b] [--json FILE]

Analytic costs on the config's hardware preset and link. The formulas assume identical stages:
here F, B (full backward) and W are the mean over the stages (total work / PP), which is what a
perfectly balanced pipeline would have; the simulated bubble is the idle time of the most idle
and of the least idle rank (a rank holding the head is busier than the rest).
"""

from __future__ import annotations

import argparse
import json

from dualpipe_mhc.config import load_config
from dualpipe_mhc.scheduler import build_schedule, simulate
from dualpipe_mhc.scheduler.analytic import costs_from_config, model_stage_layers

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def formula(name: str, pp: int, f: float, b: float, w: float, fb: float) -> float:
    """Bubble per rank from docs/DESIGN.md §5; ``b`` is the full backward, ``fb`` an F&B pair."""
    if name == "1f1b":
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    return (pp / 2 - 1) * (fb + b - 3 * w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper-27b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for split in ("even", "balanced"):
        for name in SCHEDULES:
            for streams in (1, None):
                cfg = load_config(args.config, [f"model.split={split}", f"pipeline.schedule={name}"])
                p = cfg.pipeline
                sched = build_schedule(name, ranks=p.ranks, microbatches=p.microbatches)
                costs = costs_from_config(cfg, sched.num_stages, streams=streams)
                res = simulate(sched, costs)
                pp = sched.num_stages
                f, bi, w = sum(costs.f) / pp, sum(costs.b) / pp, sum(costs.w) / pp
                b = bi + w
                rows.append({
                    "split": split, "schedule": name, "streams": streams or cfg.model.streams, "stages": pp,
                    "layers_per_stage": model_stage_layers(cfg.model, pp),
                    "step_time_s": res.step_time,
                    "bubble_max_s": max(res.bubble), "bubble_min_s": min(res.bubble),
                    "formula_s": formula(name, pp, f, b, w, costs.fb_overlap * (f + b)),
                    "bubble_fraction": sum(res.bubble) / (res.step_time * sched.ranks),
                })
    print(f"{args.config}: simulated bubble per rank (max / min over ranks) against the formula on the mean stage")
    print(f"{'split':9} {'schedule':10} {'n':>2} {'step s':>7} {'bubble max s':>13} {'min s':>7} {'formula s':>10} {'bubble %':>9}")
    for r in rows:
        print(f"{r['split']:9} {r['schedule']:10} {r['streams']:>2} {r['step_time_s']:7.3f} {r['bubble_max_s']:13.3f} "
              f"{r['bubble_min_s']:7.3f} {r['formula_s']:10.3f} {100 * r['bubble_fraction']:9.1f}")
    for split in ("even", "balanced"):
        for pp in sorted({r["stages"] for r in rows}):
            print(f"{split} split, {pp} stages: {next(r['layers_per_stage'] for r in rows if r['split'] == split and r['stages'] == pp)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": args.config, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
