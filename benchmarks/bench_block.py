"""Whole-block benchmark: mHC (n streams) vs the plain residual block, fwd+bwd, time and peak memory.

    python benchmarks/bench_block.py [--shapes a b] [--layers 4] [--batch 4] [--seq 2048] [--passes 1]
                                     [--out benchmarks/results]

Shapes (docs/DESIGN.md §6, issue 4):
    a   C = 2048, 16 heads, GELU MLP hidden 4C = 8192
    b   C = 4096, 32 heads, SwiGLU MLP hidden 11008
Each: ``--layers`` dualpipe_mhc.model.Block layers, B x S tokens (default 4 x 2048 = 8192),
bf16 weights and streams, mHC mapping parameters (phi, alpha, bias) in fp32, Sinkhorn 20 iterations.
Variants, each timed fwd+bwd (input gradient included, as in a pipeline stage):
    plain         residual kind 'plain', n = 1
    mhc eager     n = 4, the PyTorch reference ops
    mhc compile   n = 4, torch.compile of the same stack with the reference ops
    mhc fused     n = 4, the Triton kernels (the device's launch settings, kernels/settings.py, overridden from ``--tuning``)
    mhc fused v2  n = 4, the Triton kernels with the previous defaults (kernel_candidates.V2), for A/B
    dsv4 fused    n = 4, residual kind 'dsv4' (DeepSeek-V4's mappings) on the same Triton kernels and launch
                  settings as 'mhc fused' (its stream reduction, the HyperHead, is outside the block: not timed)
Timing: triton.testing.do_bench (CUDA events, median, warm-up first, L2 flushed between runs), twice
in a row per variant; with ``--passes K`` all variants are built first and timed in turn K times
(the median over passes is quoted, and the table gives the per-pass overhead range).
Peak memory: torch.cuda.max_memory_allocated during one fwd+bwd, minus what was allocated before it.

Byte floor: the extra HBM bytes mHC must move per token and sublayer over the plain residual,
at copy bandwidth, over the plain block's measured time:
    minimal fused design  (8n + 5) C  elements  - 6 C (plain residual: x + y fwd, dx accumulation bwd)
        fwd  pre: x, u;  post/res: x, y, x_next                   3nC + 2C
        bwd  post/res: g = dx_next, x, y, dy;  pre: du, x, g, dx   5nC + 3C
             (the post/res op's dx = H_res^T g is formed inside the pre op's dx pass, never stored)
    these kernels         (10n + 6) C elements - 6 C (pre fwd and pre bwd read x and du twice)
Writes ``kernels_block_<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_results  # noqa: E402

SHAPES = {
    "a": dict(width=2048, heads=16, mlp="gelu", hidden=8192),
    "b": dict(width=4096, heads=32, mlp="swiglu", hidden=11008),
}


def _import_model():
    """dualpipe_mhc.model, on a host without pydantic too: model.py needs config.ModelConfig only as a type."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        stub = types.ModuleType("dualpipe_mhc.config")
        stub.ModelConfig = object
        sys.modules["dualpipe_mhc.config"] = stub
    from dualpipe_mhc import model

    return model


def build_stack(
    shape: dict, layers: int, streams: int, residual: str, kernels: str, device: str = "cuda"
) -> torch.nn.Module:
    model = _import_model()
    cfg = types.SimpleNamespace(
        width=shape["width"], heads=shape["heads"], mlp=shape["mlp"], hidden=shape["hidden"],
        streams=streams, residual=residual, sinkhorn_iters=20,
    )  # fmt: skip
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*(model.Block(cfg, kernels=kernels) for _ in range(layers)))
    for mod in stack.modules():  # the model's own initialisation: N(0, 0.02) projections
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=0.02)
    stack = stack.to(device, torch.bfloat16)
    for name, p in stack.named_parameters():
        if name.endswith(("phi", "alpha", "bias")) and ("attn." in name or "mlp." in name):
            p.data = p.data.float()  # mappings in fp32 (docs/DESIGN.md §4 mixed precision)
    return stack


def _bench_step(stack, x: torch.Tensor, grad: torch.Tensor, rep_ms: int, warmup: int) -> float:
    params = [p for p in stack.parameters()]

    def step():
        stack(x).backward(grad)

    return do_bench(step, warmup=warmup, rep=rep_ms, grad_to_none=params + [x], return_mode="median")


def _peak_gib(stack, x: torch.Tensor, grad: torch.Tensor) -> float:
    for p in list(stack.parameters()) + [x]:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stack(x).backward(grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _warm_up(stack, x: torch.Tensor, grad: torch.Tensor) -> None:
    for _ in range(3):  # compiles the kernels (and torch.compile's graph) before any timing
        stack(x).backward(grad)
    torch.cuda.synchronize()


def measure(stack, x: torch.Tensor, grad: torch.Tensor, rep_ms: int) -> dict[str, float]:
    _warm_up(stack, x, grad)
    ms = _bench_step(stack, x, grad, rep_ms, warmup=100)
    ms2 = _bench_step(stack, x, grad, rep_ms, warmup=10)
    return {"ms": ms, "ms_repeat": ms2, "peak_GiB": _peak_gib(stack, x, grad)}


def measure_interleaved(built: dict, rep_ms: int, passes: int, tunings: dict) -> dict[str, dict]:
    """Every variant timed once a pass, in turn, ``passes`` times: a drift of the machine (clocks,
    a neighbour) then hits all variants alike. ms = the median over passes; all passes kept."""
    from dualpipe_mhc.kernels.settings import overriding

    times: dict[str, list[float]] = {v: [] for v in built}
    for p in range(passes):
        for variant, (stack, x, grad) in built.items():
            with overriding(tunings.get(variant, {})):
                if p == 0:
                    _warm_up(stack, x, grad)
                times[variant].append(_bench_step(stack, x, grad, rep_ms, warmup=100 if p == 0 else 10))
        print(f"  pass {p}: " + ", ".join(f"{v} {t[-1]:.2f}" for v, t in times.items()), flush=True)
    rows = {}
    for variant, (stack, x, grad) in built.items():
        with overriding(tunings.get(variant, {})):
            peak = _peak_gib(stack, x, grad)
        rows[variant] = {"ms": statistics.median(times[variant]), "ms_passes": times[variant], "peak_GiB": peak}
    return rows


def kernel_breakdown(step, with_cpu_ranges: bool = False) -> list[tuple[str, float]]:
    """CUDA time per kernel name over one call of ``step`` (torch.profiler), largest first;
    ``with_cpu_ranges`` also attributes it to the CPU-side ranges (record_function names)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if with_cpu_ranges else [])
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    rows = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0.0)
        if t > 0:
            rows[evt.key] = rows.get(evt.key, 0.0) + t / 1e3
    return sorted(rows.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["a", "b"], choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--rep-ms", type=int, default=1500)
    ap.add_argument("--passes", type=int, default=1,
                    help="> 1: build every variant first, time them in turn this many times, quote the median")
    ap.add_argument("--variants", nargs="+", default=["plain", "mhc fused", "mhc eager", "mhc compile"])
    ap.add_argument("--copy-bandwidth", type=float, default=None, help="B/s; measured here when not given")
    ap.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of plain and fused")
    ap.add_argument("--tuning", default=None, help="JSON of launch-settings overrides for 'mhc fused'")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    name = torch.cuda.get_device_name()
    import dataclasses

    from kernel_candidates import V2

    from dualpipe_mhc.kernels.settings import launch_settings, overriding

    tunings = {
        "mhc fused": json.loads(Path(args.tuning).read_text()) if args.tuning else {},
        "mhc fused v2": V2,
    }
    tunings["dsv4 fused"] = tunings["mhc fused"]
    bw = args.copy_bandwidth
    if bw is None:
        a = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
        b = torch.empty_like(a)
        bw = 2 * a.numel() * 2 / (do_bench(lambda: b.copy_(a), warmup=50, rep=400, return_mode="median") * 1e-3)
        del a, b
    tokens = args.batch * args.seq
    n = args.streams
    print(f"device {name}; copy {bw / 1e12:.2f} TB/s; {args.layers} layers, {tokens} tokens, n = {n}", flush=True)
    results = {
        "device": name, "copy_bandwidth_Bps": bw, "layers": args.layers, "batch": args.batch, "seq": args.seq,
        "streams": n, "torch": torch.__version__, "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "shapes": {}, "tuning": {
            k: dataclasses.asdict(launch_settings(torch.device("cuda"), torch.bfloat16, n, 0, v))
            for k, v in tunings.items()
        },
    }  # fmt: skip
    lines = [
        f"device: {name}; copy bandwidth {bw / 1e12:.2f} TB/s; {args.layers} layers, {args.batch} x {args.seq} tokens, "
        f"bf16, n = {n}, fwd+bwd (median of do_bench)",
        "",
        "| shape | variant | ms | overhead vs plain | floor (min / these kernels) | 1.3 x floor (min / these kernels) "
        "| peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in args.shapes:
        shape = SHAPES[key]
        c = shape["width"]
        sublayers = 2 * args.layers
        extra_min = sublayers * tokens * ((8 * n + 5) - 6) * c * 2
        extra_ours = sublayers * tokens * ((10 * n + 6) - 6) * c * 2
        rows, built = {}, {}
        for variant in args.variants:
            streams, residual = (1, "plain") if variant == "plain" else (n, variant.split()[0])
            kernels = "triton" if " fused" in variant else "reference"
            stack = build_stack(shape, args.layers, streams, residual, kernels)
            if variant == "mhc compile":
                stack = torch.compile(stack)
            g = torch.Generator(device="cuda").manual_seed(1)
            x = torch.randn(args.batch, args.seq, streams, c, device="cuda", generator=g).to(torch.bfloat16)
            x.requires_grad_()
            grad = torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16)
            if args.passes > 1:  # timed below, all variants in turn
                built[variant] = (stack, x, grad)
                continue
            t0 = time.time()
            with overriding(tunings.get(variant, {})):
                rows[variant] = measure(stack, x, grad, args.rep_ms)
            rows[variant]["wall_s"] = time.time() - t0
            print(f"  {key} {variant}: {rows[variant]}", flush=True)
            del stack, x, grad
            torch.cuda.empty_cache()
        if built:
            rows = measure_interleaved(built, args.rep_ms, args.passes, tunings)
            del built
            torch.cuda.empty_cache()
        # Profiled after every timing of the shape: a variant timed right after a torch.profiler
        # pass ran up to 16 % slow at shape a (H100, 2026-11-25: 43.4 vs 37.1 ms, either variant).
        for variant in [v for v in args.variants if args.profile and " fused" in v]:
            stack = build_stack(shape, args.layers, n, variant.split()[0], "triton")
            x = torch.randn(args.batch, args.seq, n, c, device="cuda").to(torch.bfloat16).requires_grad_()
            with overriding(tunings.get(variant, {})):
                grad = torch.randn_like(x)
                top = kernel_breakdown(lambda: stack(x).backward(grad))
            rows[variant]["kernels_ms"] = top[:40]
            print(f"    {variant} top kernels (ms):", [(k[:60], round(v, 3)) for k, v in top[:15]], flush=True)
            del stack, x
            torch.cuda.empty_cache()
        plain = rows.get("plain", {}).get("ms")
        floor_min = extra_min / bw * 1e3
        floor_ours = extra_ours / bw * 1e3
        results["shapes"][key] = {
            **shape, "variants": rows, "extra_bytes_min": extra_min, "extra_bytes_these_kernels": extra_ours,
            "floor_ms_min": floor_min, "floor_ms_these_kernels": floor_ours,
        }  # fmt: skip
        for variant, r in rows.items():
            over = f"+{100 * (r['ms'] / plain - 1):.1f} %" if plain and variant != "plain" else ""
            if over and "ms_passes" in r:  # the overhead within each pass, lowest to highest
                per = sorted(v / p - 1 for v, p in zip(r["ms_passes"], rows["plain"]["ms_passes"]))
                over += f" (passes {100 * per[0]:+.1f} to {100 * per[-1]:+.1f} %)"
            floor = f"+{100 * floor_min / plain:.1f} % / +{100 * floor_ours / plain:.1f} %" if plain else ""
            target = f"+{130 * floor_min / plain:.1f} % / +{130 * floor_ours / plain:.1f} %" if plain else ""
            lines.append(
                f"| {key} (C={c}, {shape['mlp']} {shape['hidden']}) | {variant} | {r['ms']:.2f} | {over} | "
                f"{floor if ' fused' in variant else ''} | "
                f"{target if ' fused' in variant else ''} | "
                f"{r['peak_GiB']:.2f} |"
            )
        print("\n".join(lines[-len(rows):]), flush=True)
        # written after every shape, so a cut-short run keeps what it measured
        write_results(args.out, "kernels_block", name, results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
