"""The pipeline on one GPU: 2 and 4 ranks share the device (``cluster.share_gpus``, issue 14).

Ranks that share a GPU cannot use NCCL ("Duplicate GPU detected"); their messages go
through pinned host buffers and gloo. This script checks that such a run is still the
single-process computation, then runs the two commands a one-GPU user would:

1. **Gradient check** — every schedule (1F1B, ZB1P, DualPipe, DualPipeV) at 2 and 4 ranks
   sharing the GPU, with the fused mHC kernels (``run.kernels=triton``) and mHC
   recomputation inside the stages (``recompute.block_layers=2``): loss and every
   parameter gradient after one step against one process in the same dtype, which never
   recomputes — float32 (relative error per tensor <= 1e-4) and bfloat16 (<= 3e-2). The
   harness is ``run_pipeline_gpu.py``'s. ZB1P, DualPipe and DualPipeV defer weight
   gradients (W), so their rows check the zero-bubble split through the fused autograd
   Functions end to end.
   With 2 ranks it also prices the host-staged route (``calibrate-link``'s ping-pong), and
   a probe measures what a CUDA IPC route would copy instead (device to device from the
   peer's memory; the runtime does not use it).
2. **W split** — ``tests/test_shared_gpu.py -m gpu -k weight_split``: B's input-only
   backward then W against the full backward of a stage, fused kernels, with and without
   recomputation, fp32 and bf16.
3. **CLI** — ``dualpipe-mhc run`` and ``dualpipe-mhc profile`` on a small bf16 config,
   2 ranks sharing the GPU: both must exit 0; NVML power and energy per step (profile:
   sampled by the workers, the shared GPU counted once; run: the driver samples the GPU
   over the whole command).

Writes ``pipeline_1gpu_<device>.json`` and ``.md`` under ``--out`` and prints a table
last; exits 1 if any check failed. About 3-5 minutes on one H200::

    python benchmarks/run_pipeline_1gpu.py --out "$OUT"
    python benchmarks/run_pipeline_1gpu.py --quick --out /tmp/1gpu      # 2 ranks, no CLI part
    python benchmarks/run_pipeline_1gpu.py --cpu-smoke --out /tmp/1gpu  # this script on CPU actors

Step times of ranks that share a GPU measure no real link (see the README): the figures
here are correctness and energy, not overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import run_pipeline_gpu as harness  # noqa: E402  (the one-process comparison, shared with multi-GPU runs)

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
SHARED = ["cluster.use_gpus=yes", "cluster.share_gpus=yes", "cluster.backend=auto"]
CPU = ["cluster.use_gpus=no", "cluster.backend=gloo"]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4", help="rank counts sharing the GPU, comma-separated (default 2,4)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated (default all four)")
    p.add_argument("--block-layers", type=int, default=2, help="mHC recomputation block L_r (default 2)")
    p.add_argument("--cli-steps", type=int, default=3, help="steps of the run / profile commands (default 3)")
    p.add_argument("--quick", action="store_true", help="2 ranks only, no CLI part")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script on CPU actors: host staging forced, reference kernels, no W-split test")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown")
    args = p.parse_args(argv)
    args.rank_list = [2] if args.quick else [int(r) for r in args.ranks.split(",") if r]
    args.schedule_list = [s for s in args.schedules.split(",") if s]
    bad = [s for s in args.schedule_list if s not in SCHEDULES]
    if bad or any(r < 2 for r in args.rank_list) or args.block_layers < 1:
        p.error(f"--schedules must be of {SCHEDULES}, --ranks >= 2 and --block-layers >= 1; got "
                f"{args.schedules!r}, {args.ranks!r}, {args.block_layers}")
    return args


def grad_phase(args) -> tuple[list[dict], list[str], dict | None]:
    """The harness's gradient check for every rank count, the ranks sharing the GPU."""
    from dualpipe_mhc.cluster.runtime import Pipeline
    from dualpipe_mhc.cluster.train import pipeline_schedule

    rows, workers, link = [], [], None
    for ranks in args.rank_list:
        ns = argparse.Namespace(
            ranks=ranks, microbatches=2 * ranks, cpu_smoke=args.cpu_smoke, schedule_list=args.schedule_list,
            placement=CPU if args.cpu_smoke else SHARED,
            grad_overrides=[
                "run.kernels=" + ("reference" if args.cpu_smoke else "triton"),
                "recompute.enabled=true", f"recompute.block_layers={args.block_layers}",
                f"model.layers={2 * args.block_layers * ranks}",  # every stage of DualPipeV holds one full block
            ],
        )
        first = harness.grad_config(ns, args.schedule_list[0], "float32")
        pipe = Pipeline.start(first, pipeline_schedule(first), host_staging=args.cpu_smoke)
        try:
            workers += pipe.group.descriptions
            print(f"{ranks} ranks: {pipe.group.descriptions}", flush=True)
            staged = all("host transfers" in d for d in pipe.group.descriptions)
            rows += [r | {"host_staged": staged, "ok": r["ok"] and staged} for r in harness.grad_check(pipe, ns)]
            if ranks == 2:
                link = staged_link(pipe.group, args)
        finally:
            pipe.close()
    return rows, workers, link


def staged_link(group, args) -> dict:
    """``calibrate-link``'s ping-pong over the host-staged route of two ranks on the GPU: what a
    message between ranks that share a GPU costs (D2H, gloo through host memory, H2D)."""
    from dualpipe_mhc.cluster.calibration import calibrate

    sizes = [1 << 20, 4 << 20] if args.cpu_smoke else [1 << 20, 16 << 20, 64 << 20, 256 << 20]
    raw = calibrate(group, {}, sizes, repeats=3)["raw"]
    fit = raw["link"]
    print(f"host-staged link: {fit['bandwidth_gbps']:.2f} GB/s one way + {fit['latency_us']:.0f} us  "
          + ", ".join(f"{p['bytes'] >> 20} MiB {p['achieved_gbps']:.2f} GB/s" for p in raw["points"]), flush=True)
    return raw


class IpcProbe:
    """One end of a CUDA IPC copy between two processes on the GPU (a Ray actor each)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.kept: list = []  # the producer keeps every shared tensor until the probe ends

    def share(self, nbytes: int):
        from torch.multiprocessing.reductions import reduce_tensor

        t = self.torch.ones(nbytes // 4, device="cuda")
        self.torch.cuda.synchronize()
        self.kept.append(t)
        return reduce_tensor(t)  # (rebuild function, picklable args): handle, offset, ref counter, event

    def copy(self, shared, repeats: int) -> dict:
        torch = self.torch
        rebuild, rebuild_args = shared
        t0 = time.perf_counter()
        src = rebuild(*rebuild_args)  # opens the IPC handle (cached per allocation afterwards)
        opened = time.perf_counter() - t0
        dst = torch.empty_like(src)
        dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        ok = bool(torch.equal(dst, torch.ones_like(dst)))
        del src
        return {"open_s": opened, "copy_s": start.elapsed_time(end) / 1e3 / repeats, "ok": ok}


def ipc_copy_probe() -> dict | str:
    """What a CUDA IPC route between ranks on one GPU would move: a device-to-device copy from
    the peer's memory, beside the host-staged route's figure. Measured, not used by the runtime."""
    import ray

    try:
        probe = ray.remote(num_gpus=0.5, num_cpus=1, runtime_env={"env_vars": ENV})(IpcProbe)
        producer, consumer = probe.remote(), probe.remote()
        rows = []
        for nbytes in (1 << 20, 16 << 20, 64 << 20, 256 << 20):
            shared = ray.get(producer.share.remote(nbytes), timeout=60)
            r = ray.get(consumer.copy.remote(shared, 5), timeout=60)
            rows.append({"bytes": nbytes, "gbps": nbytes / r["copy_s"] / 1e9, **r})
        for a in (producer, consumer):
            ray.kill(a)
        print("CUDA IPC copy: " + ", ".join(f"{r['bytes'] >> 20} MiB {r['gbps']:.0f} GB/s (open "
                                            f"{1e3 * r['open_s']:.1f} ms)" for r in rows), flush=True)
        return {"points": rows, "ok": all(r["ok"] for r in rows)}
    except Exception as exc:  # a figure for the record, not a check of the pipeline
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"CUDA IPC probe failed: {type(exc).__name__}: {first}", flush=True)
        return f"failed: {type(exc).__name__}: {exc}"


def weight_split_phase() -> dict:
    """The GPU test of the B/W split through the fused autograd Functions, run by pytest."""
    cmd = [sys.executable, "-m", "pytest", "tests/test_shared_gpu.py", "-m", "gpu", "-k", "weight_split", "-q", "-rs"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **ENV), timeout=300)
    tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [""]
    passed = re.search(r"(\d+) passed", tail[0])
    ok = out.returncode == 0 and passed is not None and "skipped" not in tail[0]
    print(f"W split (pytest): {tail[0]}  {'ok' if ok else 'FAIL'}", flush=True)
    return {"command": " ".join(cmd[1:]), "summary": tail[0], "ok": ok,
            "output_tail": "" if ok else (out.stdout + out.stderr)[-4000:]}


def cli_config(args) -> list[str]:
    if args.cpu_smoke:
        model = ["model.width=64", "model.heads=4", "model.seq_len=32", "run.dtype=float32", "run.kernels=reference"]
        place = CPU + ["hardware.preset=cpu", "link.preset=gloo-cpu"]
    else:
        model = ["model.width=1024", "model.heads=8", "model.seq_len=1024", "run.dtype=bfloat16", "run.kernels=triton"]
        place = SHARED + ["hardware.preset=h200", "link.preset=h200-nvlink"]
    return model + place + [
        "model.layers=8", "model.vocab_size=4096", "model.streams=4", "model.residual=mhc",
        "pipeline.schedule=dualpipev", "pipeline.ranks=2", "pipeline.microbatches=8", "pipeline.microbatch_size=1",
        "recompute.enabled=true", f"recompute.block_layers={args.block_layers}", f"run.steps={args.cli_steps}",
        "run.timeout_s=300",
    ]


def cli_phase(args, out: Path) -> dict:
    """``dualpipe-mhc run`` and ``profile`` as a user types them; NVML from their reports and the driver."""
    from dualpipe_mhc.cluster.nvml import NvmlSampler

    sets = [a for kv in cli_config(args) for a in ("--set", kv)]
    res: dict = {"config": cli_config(args)}
    for command in ("run", "profile"):
        report_file = out / f"cli_{command}.json"
        cmd = [sys.executable, "-m", "dualpipe_mhc.cli", command, *sets, "--json", str(report_file),
               "--out", str(out / f"cli_{command}"), "--no-plot"]
        sampler = NvmlSampler(0, period_s=0.05).start()  # the GPU's power over the whole command
        if sampler.available:
            sampler.begin_step()
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ENV), timeout=300)
        wall = time.perf_counter() - t0
        whole = sampler.end_step() if sampler.available else {"energy_j": "unavailable", "mean_power_w": "unavailable"}
        sampler.stop()
        entry: dict = {"command": "dualpipe-mhc " + " ".join(cmd[3:]), "exit_code": done.returncode, "wall_s": wall,
                       "ok": done.returncode == 0 and report_file.exists(),
                       "driver_nvml_whole_command": {k: whole.get(k) for k in ("energy_j", "mean_power_w",
                                                                               "duration_s")},
                       "note_lines": [ln for ln in done.stderr.splitlines() if "share" in ln]}
        if not entry["ok"]:
            entry["output_tail"] = (done.stdout + done.stderr)[-4000:]
        else:
            report = json.loads(report_file.read_text())
            entry.update(_cli_figures(command, report))
        res[command] = entry
        print(f"dualpipe-mhc {command}: exit {done.returncode} in {wall:.0f} s  "
              f"{'ok' if entry['ok'] else 'FAIL'}", flush=True)
    return res


def _cli_figures(command: str, report: dict) -> dict:
    if command == "run":
        return {"workers": report.get("workers"), "step_times_s": [s["step_time_s"] for s in report["steps"]],
                "losses": [s["loss"] for s in report["steps"]], "measured": report.get("measured")}
    v = report["variants"]
    return {"workers_note": report.get("nvml_note"), "overhead_pct": report["overhead_pct"]["mhc"],
            "variants": {name: {k: x.get(k) for k in ("step_time_s", "energy_j_per_step", "energy_j_per_step_per_gpu",
                                                      "mean_power_w_per_gpu", "energy_source")}
                         for name, x in v.items()}}


def write_markdown(path: Path, report: dict) -> None:
    lines = [f"# Pipeline on one {report['device']}: ranks sharing the GPU", "",
             f"Command: `{report['command']}`  ", f"torch {report['torch']}, ray {report['ray']}, {report['date']}, "
             f"{report['wall_s']:.0f} s", "", "## Gradients vs one process (fused kernels, recompute "
             f"L_r={report['block_layers']} in the stages; the reference does not recompute)", "",
             "| ranks | schedule | dtype | loss rel err | max grad rel err | worst tensor | tolerance | ok |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ranks']} | {r['schedule']} | {r['dtype']} | {r['loss_rel_err']:.1e} | "
              f"{r['max_grad_rel_err']:.2e} | {r['worst_tensor']} | {r['tolerance']:g} | {r['ok']} |"
              for r in report["grad_check"]]
    link = report["staged_link"]
    if link:
        lines += ["", f"Host-staged link between two ranks on the GPU (calibrate-link's ping-pong): "
                      f"{link['link']['bandwidth_gbps']:.2f} GB/s one way + {link['link']['latency_us']:.0f} us; "
                      + ", ".join(f"{p['bytes'] >> 20} MiB: {p['achieved_gbps']:.2f} GB/s" for p in link["points"])]
    ipc = report.get("cuda_ipc_probe")
    if isinstance(ipc, dict):
        lines += ["", "CUDA IPC device-to-device copy from the other rank's memory (measured only; the runtime "
                      "stages through the host): " + ", ".join(f"{p['bytes'] >> 20} MiB: {p['gbps']:.0f} GB/s"
                                                                for p in ipc["points"])]
    elif ipc:
        lines += ["", f"CUDA IPC probe: {ipc}"]
    ws = report["weight_split"]
    if ws is not None:
        lines += ["", f"W split through the fused autograd Functions (`{ws['command']}`): {ws['summary']} — "
                      f"{'ok' if ws['ok'] else 'FAIL'}"]
    cli = report["cli"]
    if cli is not None:
        lines += ["", "## Commands on the shared GPU", "", f"Config: `{' '.join(cli['config'])}`", ""]
        for command in ("run", "profile"):
            e = cli[command]
            lines.append(f"- `dualpipe-mhc {command}`: exit {e['exit_code']}, {e['wall_s']:.0f} s; driver NVML over "
                         f"the command: {_fmt(e['driver_nvml_whole_command'].get('energy_j'), 'J')}, "
                         f"{_fmt(e['driver_nvml_whole_command'].get('mean_power_w'), 'W')} mean")
        prof = cli["profile"]
        if prof["ok"]:
            lines += ["", "| variant | step ms | energy J/step (GPU once) | mean power W |", "|---|---|---|---|"]
            lines += [f"| {k} | {1e3 * v['step_time_s']:.1f} | {_fmt(v['energy_j_per_step'], '')} | "
                      f"{_fmt(v['mean_power_w_per_gpu'], '')} |" for k, v in prof["variants"].items()]
            lines += ["", f"mHC overhead {prof['overhead_pct']:+.1f} % — two ranks contending for one GPU, no real "
                          "link: not the paper's figure."]
    path.write_text("\n".join(lines) + "\n")


def _fmt(value, unit: str) -> str:
    if isinstance(value, list):
        return "/".join(_fmt(v, unit) for v in value)
    return f"{value:.1f}{' ' + unit if unit else ''}" if isinstance(value, (int, float)) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(ENV)
    import ray
    import torch

    from dualpipe_mhc.cluster.launch import connect, gpus_available

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: this benchmark is for a GPU host (use --cpu-smoke to check the script)", file=sys.stderr)
        return 2
    t0 = time.time()
    started = connect(None)
    try:
        if not args.cpu_smoke and gpus_available() < 1:
            print("the Ray cluster has no GPU: not run", file=sys.stderr)
            return 2
        grads, workers, link = grad_phase(args)
        ipc = None if args.cpu_smoke else ipc_copy_probe()
    finally:
        if started:
            ray.shutdown()  # the CLI commands start their own cluster
    device = "cpu" if args.cpu_smoke else torch.cuda.get_device_name(0)
    weight_split = None if args.cpu_smoke else weight_split_phase()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = None if args.quick else cli_phase(args, out)
    report = {
        "device": device, "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
        "ray": ray.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "block_layers": args.block_layers, "workers": workers, "grad_check": grads, "staged_link": link,
        "cuda_ipc_probe": ipc,
        "weight_split": weight_split,
        "cli": cli, "wall_s": time.time() - t0,
    }
    checks = [r["ok"] for r in grads] + ([weight_split["ok"]] if weight_split else [])
    checks += [cli[c]["ok"] for c in ("run", "profile")] if cli else []
    report["ok"] = all(checks)
    tag = device.replace("NVIDIA ", "").replace(" ", "-").replace("/", "-")
    stem = out / f"pipeline_1gpu_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_markdown(stem.with_suffix(".md"), report)
    print(f"\nwrote {stem}.json/.md in {report['wall_s']:.0f} s\n")
    print(f"{'ranks':>5} {'schedule':9} {'dtype':8} {'loss err':>9} {'grad err':>9}  ok")
    for r in grads:
        print(f"{r['ranks']:>5} {r['schedule']:9} {r['dtype']:8} {r['loss_rel_err']:9.1e} "
              f"{r['max_grad_rel_err']:9.2e}  {r['ok']}")
    if link:
        print(f"host-staged link: {link['link']['bandwidth_gbps']:.2f} GB/s + {link['link']['latency_us']:.0f} us")
    if weight_split:
        print(f"W split: {weight_split['summary']}  {weight_split['ok']}")
    if cli:
        for c in ("run", "profile"):
            print(f"dualpipe-mhc {c}: exit {cli[c]['exit_code']}  {cli[c]['ok']}")
        if cli["profile"]["ok"]:
            e = {k: v["energy_j_per_step"] for k, v in cli["profile"]["variants"].items()}
            print(f"profile energy J/step: {e}")
    print(f"ALL CHECKS {'PASSED' if report['ok'] else 'FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
