"""The runtime on real GPUs: gradient equality, step time per schedule, hidden communication,
measured vs simulated (issue 5's GPU runs).

One Ray actor per GPU (NCCL), the same workers reused for every case. Three parts:

1. **Gradient check** — a small model (8 layers, C=256) through each of 1F1B, ZB1P,
   DualPipe and DualPipeV, one step, every parameter gradient against the same model in
   one process on GPU 0 (same dtype and kernels): float32 (||diff|| / scale <= 1e-4 per
   tensor) and bfloat16 (<= 3e-2), scale = || sum over micro-batches of |grad_mb| ||, which
   is ||ref|| unless the micro-batches' gradients cancel (see TOLERANCE).
2. **Step time** — the benchmark model (default C=2048, 8 layers, SwiGLU 5632, 4096
   tokens per micro-batch, n=4, bf16) for every schedule on the native link and shaped to
   H800 NVLink (200 GB/s one way, 3 us): median step time, bubble, time blocked on
   inputs, modelled transfer time and the hidden fraction, and the simulator fed this
   run's measured per-action costs (goal: within 10 %).
3. **Link calibration** (``--calibrate``) — ``calibrate-link``'s measurement on two GPUs.

Meant for nvidia-h200-x2 / x4 (or H100 x2 / x4)::

    python benchmarks/run_pipeline_gpu.py --ranks 2 --out benchmarks/results
    python benchmarks/run_pipeline_gpu.py --ranks 4 --out benchmarks/results --calibrate
    python benchmarks/run_pipeline_gpu.py --ranks 2 --quick        # smoke run, ~2 min

Writes ``pipeline_gpu_<device>_<ranks>r.json`` and ``.md`` under ``--out``; every figure
names the device it ran on. Nothing here runs on the CPU-only box: it exits with a
message when the Ray cluster has fewer GPUs than ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
LINKS = {
    "native": ["link.preset=h200-nvlink", "link.shape=false"],
    "h800": ["link.preset=h800-nvlink", "link.shape=true"],
}
# ||pipeline - reference|| / scale per parameter tensor, the reference being one process in the
# same dtype: only the summation order differs (DualPipe's cross-rank sum, micro-batch order).
# scale = || sum_mb |grad_mb| ||, the size of the terms summed: where the micro-batches' gradients
# cancel (mHC's alpha scalars: terms ~1e-4 summing to ~1e-6), a bf16 sum is rounding noise in any
# order and ||reference|| would measure that noise, not the pipeline. Dropping one of m
# micro-batches still moves a tensor by about scale / m.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="GPUs = pipeline ranks (default 2)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated (default all four)")
    p.add_argument("--links", default="native,h800", help=f"comma-separated of {sorted(LINKS)}")
    p.add_argument("--width", type=int, default=2048, help="C of the benchmark model (heads = C/128)")
    p.add_argument("--mlp-hidden", type=int, default=5632, help="SwiGLU hidden width (default 5632)")
    p.add_argument("--layers", type=int, default=8, help="layers of the benchmark model (>= 2 x ranks)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per micro-batch (default 4096)")
    p.add_argument("--microbatches", type=int, default=0, help="default: 4 x ranks")
    p.add_argument("--steps", type=int, default=6, help="steps per case (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the medians (default 2)")
    p.add_argument("--calibrate", action="store_true", help="also measure the links (2 GPUs)")
    p.add_argument("--skip-grad-check", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, C=1024, 2048 tokens")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown")
    p.add_argument("--cpu-smoke", action="store_true", help="check this script on CPU workers (gloo, tiny model)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.steps, args.warmup, args.width, args.mlp_hidden, args.seq_len = 2, 1, 64, 128, 32
    elif args.quick:
        args.steps, args.warmup, args.width, args.mlp_hidden, args.seq_len = 3, 1, 1024, 2816, 2048
    args.layers = max(args.layers, 2 * args.ranks)
    args.microbatches = args.microbatches or 4 * args.ranks
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    placement = getattr(args, "placement", None) or (
        ["cluster.use_gpus=no", "cluster.backend=gloo"] if args.cpu_smoke
        else ["cluster.use_gpus=yes", "cluster.backend=nccl", "cluster.share_gpus=no"])
    return [
        f"pipeline.ranks={args.ranks}", f"pipeline.microbatches={args.microbatches}", "pipeline.microbatch_size=1",
        "run.timeout_s=300", "hardware.preset=h200",
    ] + placement


def grad_config(args, schedule: str, dtype: str):
    from dualpipe_mhc.config import load_config

    return load_config(None, base_overrides(args) + [
        f"pipeline.schedule={schedule}", f"model.width={64 if args.cpu_smoke else 256}", "model.heads=4",
        f"model.seq_len={32 if args.cpu_smoke else 256}",
        "model.vocab_size=256", f"run.dtype={dtype}", "run.kernels=auto",
        f"model.layers={max(8, 2 * args.ranks)}",
    ] + list(getattr(args, "grad_overrides", [])))  # e.g. the fused kernels and recomputation


def bench_config(args, schedule: str, link: str):
    from dualpipe_mhc.config import load_config

    return load_config(None, base_overrides(args) + LINKS[link] + [
        f"pipeline.schedule={schedule}", f"model.width={args.width}", f"model.heads={max(1, args.width // 128)}",
        f"model.layers={args.layers}", "model.mlp=swiglu", f"model.mlp_hidden={args.mlp_hidden}",
        f"model.seq_len={args.seq_len}", "model.vocab_size=32768", "model.streams=4", "model.residual=mhc",
        "run.dtype=bfloat16", "run.kernels=auto", f"run.steps={args.steps}",
    ])


def reference_grads(cfg, num_stages: int) -> tuple[float, dict, dict]:
    """One process, the same dtype and kernels, on this host's first GPU (the CPU without one):
    the loss, the gradients accumulated in micro-batch order in the parameter dtype (as
    autograd accumulates them), and per tensor the scale || sum_mb |grad_mb| ||."""
    import torch

    from dualpipe_mhc.cluster.data import step_microbatches
    from dualpipe_mhc.cluster.worker import DTYPES
    from dualpipe_mhc.model import build_model

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg.model, cfg.run.seed, kernels=cfg.run.kernels, dtype=DTYPES[cfg.run.dtype]).to(device)
    chunks = model.stage_chunks(num_stages)
    m, total = cfg.pipeline.microbatches, 0.0
    named = [(s, n, p) for s, c in enumerate(chunks) for n, p in c.named_parameters()]
    acc: dict = {}
    size: dict = {}
    for tokens, targets in step_microbatches(cfg.run.seed, 0, m, cfg.pipeline.microbatch_size,
                                             cfg.model.seq_len, cfg.model.vocab_size):
        model.zero_grad(set_to_none=True)
        loss = model(tokens.to(device), targets.to(device)) / m
        loss.backward()
        total += loss.item()
        for s, n, p in named:
            if p.grad is None:
                continue
            if (s, n) in acc:
                acc[s, n].add_(p.grad)  # what autograd's accumulation does, in the parameter dtype
                size[s, n].add_(p.grad.float().abs())
            else:
                acc[s, n], size[s, n] = p.grad.clone(), p.grad.float().abs()
    grads: dict = {s: {} for s in range(num_stages)}
    scale: dict = {s: {} for s in range(num_stages)}
    for s, n in acc:
        grads[s][n], scale[s][n] = acc[s, n].float().cpu(), float(size[s, n].norm())
    del model, chunks, acc, size
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return total, grads, scale


def grad_check(pipe, args) -> list[dict]:
    """Per tensor ||pipeline - reference|| / ||reference||, worst over every parameter; the loss
    within the same tolerance. A parameter the pipeline has no gradient for fails the case.
    The reference never recomputes: recomputation inside the stages must not change a gradient."""
    from dualpipe_mhc.cluster.train import pipeline_schedule

    rows = []
    for schedule in args.schedule_list:
        for dtype in ("float32", "bfloat16"):
            cfg = grad_config(args, schedule, dtype)
            sched = pipeline_schedule(cfg)
            pipe.configure(cfg, sched)
            res = pipe.step(0, apply_optimizer=False)
            got = pipe.gradients()
            ref_loss, ref, scale = reference_grads(cfg, sched.num_stages)
            worst, where, worst_plain = 0.0, "", 0.0
            for s, named in ref.items():
                for n, g in named.items():
                    mine = got.get(s, {}).get(n)
                    if mine is None:
                        worst, where = float("inf"), f"stage {s} {n} (no gradient)"
                        continue
                    if scale[s][n] == 0.0:
                        continue
                    diff = float((mine - g).norm())
                    err = diff / scale[s][n]
                    worst_plain = max(worst_plain, diff / max(float(g.norm()), 1e-30))
                    if err > worst:
                        worst, where = err, f"stage {s} {n}"
            loss_err = abs(res.loss / ref_loss - 1)
            tol = TOLERANCE[dtype]
            row = {"schedule": schedule, "ranks": args.ranks, "dtype": dtype, "loss": res.loss,
                   "reference_loss": ref_loss, "loss_rel_err": loss_err, "max_grad_rel_err": worst,
                   "worst_tensor": where, "max_grad_err_vs_ref_norm": worst_plain, "tolerance": tol,
                   "ok": worst <= tol and loss_err <= tol}
            rows.append(row)
            print(f"grad check {schedule:9s} {args.ranks}r {dtype:8s} loss {res.loss:.5f} (ref {ref_loss:.5f})  "
                  f"max grad err {worst:.2e} at {where}  {'ok' if row['ok'] else 'FAIL'}", flush=True)
    return rows


def bench(pipe, args) -> list[dict]:
    from dualpipe_mhc.cluster.measure import incoming_transfer_seconds, measured_costs, step_times
    from dualpipe_mhc.cluster.train import pipeline_schedule, train
    from dualpipe_mhc.scheduler import simulate

    rows = []
    for link in args.link_list:
        for schedule in args.schedule_list:
            cfg = bench_config(args, schedule, link)
            sched = pipeline_schedule(cfg)
            outcome = train(cfg, pipe=pipe)
            kept = outcome.results[args.warmup:] or outcome.results
            times = step_times(sched, kept)  # per-rank medians (scheduler.measured's definitions)
            step, busy, wait, exposed = times.step_time, times.busy, times.input_wait, times.exposed_comm
            costs = measured_costs(cfg, sched, outcome.results, warmup=args.warmup)
            sim = simulate(sched, costs)
            act = costs.act_bytes[0]
            comm = incoming_transfer_seconds(cfg, sched)
            hidden = [1 - min(e, c) / c if c else 1.0 for e, c in zip(exposed, comm)]
            peak = [max((rk.get("peak_memory_bytes") or 0) for rk in [r.ranks[i] for r in kept]) for i in range(sched.ranks)]
            row = {
                "schedule": schedule, "link": link, "bandwidth_gbps": cfg.link.bandwidth / 1e9, "shaped": cfg.link.shape,
                "step_time_s": step, "step_times_s": [r.step_time for r in outcome.results],
                "bubble_fraction": sum(step - b for b in busy) / (len(busy) * step),
                "busy_s": busy, "input_wait_s": wait, "exposed_comm_s": exposed, "modelled_comm_s": comm,
                "hidden_comm_fraction": hidden,
                "simulated_step_s": sim.step_time, "sim_error_pct": 100 * (sim.step_time / step - 1),
                "costs": {"f_s": costs.f, "b_s": costs.b, "w_s": costs.w, "fb_overlap": costs.fb_overlap},
                "act_bytes": act, "peak_memory_bytes": peak, "final_loss": outcome.results[-1].loss,
            }
            rows.append(row)
            print(f"{schedule:9s} {link:6s} step {1e3 * step:8.2f} ms  bubble {100 * row['bubble_fraction']:5.1f} %  "
                  f"sim {1e3 * sim.step_time:8.2f} ms ({row['sim_error_pct']:+.1f} %)  "
                  f"hidden comm {100 * statistics.fmean(hidden):5.1f} %", flush=True)
    return rows


def calibrate_links(args) -> dict:
    from dualpipe_mhc.cluster.calibration import calibrate
    from dualpipe_mhc.cluster.launch import WorkerGroup

    if args.cpu_smoke:
        sizes, group = [1 << 20, 4 << 20], WorkerGroup.launch(2, False, "gloo", 60)
        links = {"slow": (100e6, 1e-3)}
    else:
        sizes, group = [1 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30], WorkerGroup.launch(2, True, "nccl", 300)
        links = {"h800-nvlink": (200e9, 3e-6), "ib-400g": (50e9, 5e-6)}
    try:
        return calibrate(group, links, sizes, repeats=5)
    finally:
        group.kill()


def write_markdown(path: Path, report: dict) -> None:
    lines = [f"# Pipeline runtime on {report['device']} x {report['ranks']}", "",
             f"Command: `{report['command']}`  ", f"torch {report['torch']}, ray {report['ray']}, "
             f"{report['date']}", ""]
    if report["grad_check"]:
        lines += ["## Gradient check (one step, vs one process in the same dtype)", "",
                  "| schedule | dtype | max grad rel err | tolerance | ok |", "|---|---|---|---|---|"]
        lines += [f"| {r['schedule']} | {r['dtype']} | {r['max_grad_rel_err']:.2e} | {r['tolerance']:g} | {r['ok']} |"
                  for r in report["grad_check"]]
    lines += ["", f"## Step time ({report['model']})", "",
              "| schedule | link | step ms | bubble % | hidden comm % | simulated ms | sim error % |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['link']} | {1e3 * r['step_time_s']:.2f} | {100 * r['bubble_fraction']:.1f} | "
              f"{100 * statistics.fmean(r['hidden_comm_fraction']):.1f} | {1e3 * r['simulated_step_s']:.2f} | "
              f"{r['sim_error_pct']:+.1f} |" for r in report["bench"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.schedule_list = [s for s in args.schedules.split(",") if s]
    args.link_list = [x for x in args.links.split(",") if x]
    import ray
    import torch

    from dualpipe_mhc.cluster.launch import connect, gpus_available
    from dualpipe_mhc.cluster.runtime import Pipeline
    from dualpipe_mhc.cluster.train import pipeline_schedule

    connect(None)
    if not args.cpu_smoke and gpus_available() < args.ranks:
        print(f"needs {args.ranks} GPUs, the Ray cluster has {gpus_available()}: not run", file=sys.stderr)
        return 1
    t0 = time.time()
    first = grad_config(args, args.schedule_list[0], "float32")
    pipe = Pipeline.start(first, pipeline_schedule(first))
    try:
        device = ray.get(pipe.group.actors[0].device_name.remote())
        print(f"{args.ranks} x {device}: {pipe.group.descriptions}", flush=True)
        grads = [] if args.skip_grad_check else grad_check(pipe, args)
        rows = bench(pipe, args)
    finally:
        pipe.close()
    calib = calibrate_links(args) if args.calibrate else None
    report = {
        "device": device, "ranks": args.ranks, "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__, "ray": ray.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": f"C={args.width}, {args.layers} layers, SwiGLU {args.mlp_hidden}, {args.seq_len} tokens x "
                 f"{args.microbatches} micro-batches, n=4 mHC, bf16",
        "grad_check": grads, "bench": rows, "link_calibration": calib, "wall_s": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.replace(" ", "-").replace("/", "-")
    (out / f"pipeline_gpu_{tag}_{args.ranks}r.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out / f"pipeline_gpu_{tag}_{args.ranks}r.md", report)
    print(f"wrote {out}/pipeline_gpu_{tag}_{args.ranks}r.json/.md in {report['wall_s']:.0f} s")
    return 0 if all(r["ok"] for r in grads) else 2


if __name__ == "__main__":
    sys.exit(main())
