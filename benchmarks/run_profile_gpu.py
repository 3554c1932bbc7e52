"""mHC n = 4 vs plain n = 1 on real GPUs: the issue's headline figure (+6.7 % in the paper).

For every schedule x link in the grid, ``dualpipe-mhc profile``'s machinery runs the
same config as mHC and as the plain residual (optionally HC) on ``--ranks`` GPUs of
one host and writes, under ``--out``:

    profile_<device>_<ranks>r_<schedule>_<link>.json / .png    one profile report each
    summary_<device>_<ranks>r.json / .md                       the grid in one table

Links: ``h800`` shapes the transport to H800 NVLink (200 GB/s one way, docs/DESIGN.md §6),
``native`` leaves NCCL alone (NVLink of the host, ~370 GB/s measured on H200 x2).

Meant for nvidia-h200-x2 / x4 (or H100 x2 / x4), e.g.::

    python benchmarks/run_profile_gpu.py --ranks 2 --out benchmarks/results
    python benchmarks/run_profile_gpu.py --ranks 4 --out benchmarks/results --schedules dualpipev,dualpipe
    python benchmarks/run_profile_gpu.py --ranks 2 --quick          # a few-minute smoke run

Every number in the summary comes from the reports; the markdown names the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LINKS = {
    "h800": ["link.preset=h800-nvlink", "link.shape=true"],
    "native": ["link.preset=h200-nvlink", "link.shape=false"],
}


CPU_SMOKE = [  # the same grid on CPU actors over gloo: checks the script end to end, measures nothing
    "run.dtype=float32", "run.kernels=reference", "cluster.use_gpus=no", "cluster.backend=gloo", "hardware.preset=cpu",
]


def model_overrides(args: argparse.Namespace) -> list[str]:
    gpu = ["cluster.use_gpus=yes", "cluster.backend=nccl", "cluster.share_gpus=no", "hardware.preset=h200",
           "run.dtype=bfloat16", "run.kernels=auto"]  # one GPU per rank: ranks sharing one are run_pipeline_1gpu.py's
    return [
        f"model.width={args.width}", f"model.heads={args.width // 128}", f"model.layers={args.layers}",
        "model.mlp=swiglu", f"model.mlp_hidden={args.mlp_hidden}", f"model.seq_len={args.seq_len}",
        "model.vocab_size=32768", "model.streams=4", "model.residual=mhc",
        f"pipeline.ranks={args.ranks}", f"pipeline.microbatches={args.microbatches}", "pipeline.microbatch_size=1",
        f"run.steps={args.steps}", "run.timeout_s=600",
    ] + (CPU_SMOKE if args.cpu_smoke else gpu) + (
        [] if args.recompute == "none" else ["recompute.enabled=true", f"recompute.block_layers={args.recompute}"]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="GPUs = pipeline ranks (default 2)")
    p.add_argument("--schedules", default="dualpipev,dualpipe", help="comma-separated (default dualpipev,dualpipe)")
    p.add_argument("--links", default="h800,native", help=f"comma-separated of {sorted(LINKS)} (default both)")
    p.add_argument("--width", type=int, default=4096, help="C (default 4096; heads = C/128)")
    p.add_argument("--mlp-hidden", type=int, default=11008, help="SwiGLU hidden width (default 11008)")
    p.add_argument("--layers", type=int, default=16, help="transformer layers (default 16)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per micro-batch (default 4096)")
    p.add_argument("--microbatches", type=int, default=0, help="default: 4 x ranks")
    p.add_argument("--steps", type=int, default=6, help="steps per variant, the first is warm-up (default 6)")
    p.add_argument("--recompute", default="auto", help="L_r: an int, 'auto' (the planner) or 'none' (default auto)")
    p.add_argument("--with-hc", action="store_true", help="also run unconstrained HC")
    p.add_argument("--quick", action="store_true", help="small model, 3 steps: checks the pipeline end to end")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU actors (gloo): checks this script")
    p.add_argument("--out", default="benchmarks/results", help="directory for reports (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.mlp_hidden, args.layers, args.seq_len, args.steps = 1024, 2816, 8, 1024, 3
    if args.cpu_smoke:
        args.width, args.mlp_hidden, args.layers, args.seq_len, args.steps = 128, 320, 8, 32, 2
    args.microbatches = args.microbatches or 4 * args.ranks
    bad = [link for link in args.links.split(",") if link not in LINKS]
    if bad:
        p.error(f"--links {args.links!r}: unknown {bad}; use a comma-separated subset of {sorted(LINKS)}")
    if args.recompute not in ("auto", "none") and not args.recompute.isdigit():
        p.error(f"--recompute {args.recompute!r} is invalid: use a positive int, 'auto' or 'none'")
    return args


def device_name() -> str:
    """The first GPU's name from NVML ("cpu" without one); the driver process never initialises CUDA."""
    from dualpipe_mhc.cluster.nvml import NvmlSampler

    sampler = NvmlSampler(0).start()
    sampler.stop()
    if not sampler.available:
        return "cpu"
    return (sampler.name or "gpu").replace("NVIDIA ", "").replace(" ", "-")


def planner_prediction(cfg, block_layers: int | None) -> dict | str:
    """The planner's worst-rank memory for the L_r the run used, to set beside the measured peak.

    The runtime keeps bf16 weights, bf16 gradients and AdamW's two moments in the parameter
    dtype: 8 bytes per parameter in bf16 (16 in fp32), no sharding.
    """
    try:
        from dualpipe_mhc.scheduler.planner import InfeasiblePlan, plan_recompute

        state = 8.0 if cfg.run.dtype == "bfloat16" else 16.0
        try:
            rows = plan_recompute(cfg, state_bytes_per_param=state, budget_gib=1e9).rows
        except InfeasiblePlan as exc:
            rows = exc.rows
        row = next(r for r in rows if r.block_layers == block_layers)
        return {"block_layers": block_layers, "activation_gib": row.activation_gib, "total_gib": row.total_gib,
                "state_bytes_per_param": state}
    except Exception as exc:  # the comparison is a bonus; the profile itself must not fail on it
        return f"unavailable: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dualpipe_mhc.cluster.profile import PipelineRunner

    device = device_name()
    if device == "cpu" and not args.cpu_smoke:
        print("no CUDA device: this benchmark is for GPU hosts (use `dualpipe-mhc profile` on the CPU)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for link in args.links.split(","):
        # One worker group per link: the workers build their transport (and its shaper) once.
        runner = PipelineRunner()
        try:
            for schedule in args.schedules.split(","):
                rows.append(profile_one(args, argv, out, device, runner, schedule, link))
        finally:
            runner.close()
    write_summary(out / f"summary_{device}_{args.ranks}r", device, args, rows)
    return 0


def profile_one(args, argv, out: Path, device: str, runner, schedule: str, link: str) -> dict:
    from dualpipe_mhc.cluster.profile import profile
    from dualpipe_mhc.cluster.profile_plot import plot
    from dualpipe_mhc.config import load_config

    overrides = model_overrides(args) + [f"pipeline.schedule={schedule}"] + LINKS[link]
    cfg = load_config(None, overrides)
    name = f"profile_{device}_{args.ranks}r_{schedule}_{link}"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(overrides)}", flush=True)
    report = profile(cfg, with_hc=args.with_hc, runner=runner, progress=lambda v: print(f"  {v} ...", flush=True))
    report["planner_peak_memory"] = planner_prediction(cfg, report["recompute_block_layers"])
    report["command"] = "python benchmarks/run_profile_gpu.py " + " ".join(argv or sys.argv[1:])
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, out / f"{name}.png")
    print(f"  {report['verdict']}", flush=True)
    return summary_row(schedule, link, report)


def summary_row(schedule: str, link: str, report: dict) -> dict:
    v = report["variants"]
    delta = report["delta_vs_plain"]["mhc"]
    mem = v["mhc"]["peak_memory_bytes"]
    return {
        "schedule": schedule,
        "link": link,
        "plain_step_ms": v["plain"]["step_time_s"] * 1e3,
        "mhc_step_ms": v["mhc"]["step_time_s"] * 1e3,
        "mhc_overhead_pct": report["overhead_pct"]["mhc"],
        "hc_overhead_pct": report["overhead_pct"].get("hc"),
        "delta_busy_ms": delta["busy_s"] * 1e3,
        "delta_bubble_ms": delta["bubble_s"] * 1e3,
        "delta_exposed_comm_ms": delta["exposed_comm_s"] * 1e3,
        "energy_j_per_step": {k: x["energy_j_per_step"] for k, x in v.items()},
        "mhc_peak_memory_gib": [m / 2**30 for m in mem] if isinstance(mem, list) else mem,
        "planner_peak_memory": report.get("planner_peak_memory"),
        "planner_vs_measured_pct": _planner_error(report),
        "verdict": report["verdict"],
    }


def _planner_error(report: dict) -> float | str:
    """(planned - measured) / measured of the worst rank's peak, in %."""
    plan, mem = report.get("planner_peak_memory"), report["variants"]["mhc"]["peak_memory_bytes"]
    if not isinstance(plan, dict) or not isinstance(mem, list):
        return "unavailable"
    measured = max(mem) / 2**30
    return 100.0 * (plan["total_gib"] - measured) / measured


def write_summary(stem: Path, device: str, args: argparse.Namespace, rows: list[dict]) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1,
                                                    default=str) + "\n")
    lines = [
        f"# mHC n=4 vs plain n=1 on {args.ranks} x {device}",
        "",
        f"C={args.width}, SwiGLU {args.mlp_hidden}, {args.layers} layers, {args.seq_len} tokens x "
        f"{args.microbatches} micro-batches, {'fp32 on CPU' if args.cpu_smoke else 'bf16'}, recompute "
        f"{args.recompute}, {args.steps} steps (first = warm-up).",
        "Paper: +6.7 % (H800, 27B MoE). Deltas are mHC minus plain, mean over ranks.",
        "",
        "| schedule | link | plain ms | mHC ms | overhead | Δ compute ms | Δ bubble ms | Δ exposed comm ms "
        "| energy J/step plain / mHC | mHC peak GiB | planner vs measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["energy_j_per_step"]
        energy = " / ".join(f"{e[k]:.0f}" if isinstance(e[k], float) else str(e[k]) for k in ("plain", "mhc"))
        mem = r["mhc_peak_memory_gib"]
        mem = "/".join(f"{m:.1f}" for m in mem) if isinstance(mem, list) else str(mem)
        lines.append(
            f"| {r['schedule']} | {r['link']} | {r['plain_step_ms']:.1f} | {r['mhc_step_ms']:.1f} | "
            f"{r['mhc_overhead_pct']:+.1f} % | {r['delta_busy_ms']:+.1f} | {r['delta_bubble_ms']:+.1f} | "
            f"{r['delta_exposed_comm_ms']:+.1f} | {energy} | {mem} | {_pct(r['planner_vs_measured_pct'])} |"
        )
    lines += ["", *[f"- {r['schedule']} / {r['link']}: {r['verdict']}" for r in rows], ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


def _pct(value) -> str:
    return f"{value:+.1f} %" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
