"""Host-memory peak of building one pipeline rank's chunks on the CPU (meta, then materialised).

    python benchmarks/stage_build_memory.py [--config paper-27b] [--rank R] [--dtype bfloat16] [--json FILE]

Builds only the stages ``rank`` holds under the config's schedule, as ``run``'s workers do
(:func:`dualpipe_mhc.model.build_stage`), and prints the process's peak resident set
(ru_maxrss) beside the bytes of the parameters it built: the difference is the
interpreter, torch and the float32 draw blocks. Default rank: the one holding the most
parameter bytes (DualPipeV's rank 0 holds the embedding and the head).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from dualpipe_mhc.config import load_config
from dualpipe_mhc.model import build_stage, stage_layer_ranges
from dualpipe_mhc.scheduler import build_schedule
from dualpipe_mhc.scheduler.analytic import shape_from_config, stage_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _maxrss_bytes() -> int:
    # Linux reports KiB, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper-27b")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = load_config(args.config)
    p = cfg.pipeline
    sched = build_schedule(p.schedule, ranks=p.ranks, microbatches=p.microbatches)
    params = stage_params(shape_from_config(cfg), sched.num_stages)
    rank_params = {r: sum(params[s] for s in sched.chunks_of(r).values()) for r in range(p.ranks)}
    rank = max(rank_params, key=rank_params.get) if args.rank is None else args.rank
    stages = sorted(sched.chunks_of(rank).values())
    before = _maxrss_bytes()
    start = time.perf_counter()
    chunks = [build_stage(cfg.model, s, sched.num_stages, cfg.run.seed, "reference", DTYPES[args.dtype]) for s in stages]
    seconds = time.perf_counter() - start
    built = sum(t.numel() * t.element_size() for c in chunks for t in c.parameters())
    peak = _maxrss_bytes()
    ranges = stage_layer_ranges(cfg.model, sched.num_stages)
    out = {
        "config": args.config, "schedule": p.schedule, "ranks": p.ranks, "rank": rank, "stages": stages,
        "layers": [ranges[s] for s in stages], "dtype": args.dtype, "device": "cpu",
        "parameter_bytes": built, "maxrss_before_build_bytes": before, "maxrss_peak_bytes": peak,
        "overhead_bytes": peak - built, "build_seconds": seconds, "torch": torch.__version__,
    }
    print(
        f"{args.config} rank {rank} (stages {stages}, layers {[ranges[s] for s in stages]}), {args.dtype} on cpu: "
        f"parameters {built / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB "
        f"(before the build {before / 2**30:.2f} GiB), {seconds:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
