"""mHC recomputation at the paper-27b layer shape: time, kept memory and the transient during B.

    python benchmarks/bench_recompute.py [--layers 4] [--tokens 4096] [--blocks 1 2 4] [--passes 3]
                                         [--norm eager fused] [--profile] [--out DIR]

A stack of ``--layers`` dualpipe_mhc.model.Block layers (C 6144, 48 heads, SwiGLU 16384: the
paper-27b config's layer), one micro-batch of ``--tokens`` tokens, bf16 weights and streams, mHC
mappings in fp32, fused Triton kernels. Variants, each fwd+bwd with the input gradient (as in a
pipeline stage):
    plain          residual kind 'plain', n = 1
    mhc            n = 4, no recomputation
    mhc L_r=k      n = 4, ``recompute.run_blocks`` with block_layers k
Timing: triton.testing.do_bench medians, every variant timed in turn ``--passes`` times (the median
over passes is quoted). Memory, from torch.cuda's allocator around one fwd+bwd:
    kept      allocated after F minus before F (what the stage holds until its B; the output included)
    peak B    the allocator's peak during B minus what was allocated before F
    transient peak B minus kept: what the backward needs beyond what F kept
Parameter gradients are allocated before (a first step runs), as they are across a pipeline step's
micro-batches. The planner's model of the same stage (``scheduler.analytic.stage_kept_bytes``,
``backward_transient_bytes``) is printed beside.
``--norm eager`` swaps the sublayers' pre-norm (torch's fused rms_norm) for the spelled-out one the
model had before (an A/B of the norm; the eager one is also recomputed, at its own cost).
``--profile``: CUDA time per kernel of one step for mhc and mhc L_r=1, and the time inside the rebuilds.
``--predict FILE``: no GPU; recompute the planner's columns of a result file with the model as it is.
Writes ``recompute_<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_block import build_stack, kernel_breakdown  # noqa: E402
from results_io import write_results  # noqa: E402

PAPER27B = dict(width=6144, heads=48, mlp="swiglu", hidden=16384)
GIB = 2**30


def _forward(stack, x, block_layers):
    from dualpipe_mhc.recompute import run_blocks

    return run_blocks(list(stack), x, first_layer=0, block_layers=block_layers)


def _step(stack, x, grad, block_layers):
    _forward(stack, x, block_layers).backward(grad)


def _clear(stack, x):
    for p in list(stack.parameters()) + [x]:
        p.grad = None


def memory(stack, x, grad, block_layers) -> dict[str, float]:
    # Gradient buffers exist before B, as across a pipeline step's micro-batches: they are state,
    # not part of what B needs on top of what F kept.
    _clear(stack, x)
    _step(stack, x, grad, block_layers)
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = _forward(stack, x, block_layers)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear(stack, x)
    return {"kept_GiB": kept / GIB, "peak_B_GiB": peak / GIB, "transient_GiB": (peak - kept) / GIB}


def kernel_times(stack, x, grad, block_layers) -> dict[str, float]:
    """CUDA ms per kernel (and per record_function range) over one fwd+bwd."""
    top = dict(kernel_breakdown(lambda: _step(stack, x, grad, block_layers), with_cpu_ranges=True))
    _clear(stack, x)
    return top


def _annotate_replay() -> None:
    """Name the rebuilds in profiles: torch.profiler's range 'mhc_recompute_rebuild'."""
    from dualpipe_mhc import recompute

    rebuild = recompute._Segment._rebuild
    if getattr(rebuild, "_annotated", False):
        return

    def annotated(self, name):
        with torch.profiler.record_function("mhc_recompute_rebuild"):
            return rebuild(self, name)

    annotated._annotated = True
    recompute._Segment._rebuild = annotated


def _spelled_out_rms_norm(self, x):
    """The pre-norm as the model had it before torch's fused rms_norm (six kernels, fp32 copies kept)."""
    cd = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cd)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _use_norm(kind: str) -> None:
    """'fused': the model's own RMSNorm (torch's rms_norm); 'eager': the spelled-out one, for an A/B."""
    from dualpipe_mhc import model

    if not hasattr(model.RMSNorm, "_model_forward"):
        model.RMSNorm._model_forward = model.RMSNorm.forward
    model.RMSNorm.forward = model.RMSNorm._model_forward if kind == "fused" else _spelled_out_rms_norm


def _prediction(layers: int, tokens: int, streams: int, block_layers: int | None) -> dict[str, float]:
    """What the planner's memory model (scheduler/analytic.py) says of the same stage."""
    from dualpipe_mhc.scheduler.analytic import ModelShape, backward_transient_bytes, stage_kept_bytes

    shape = ModelShape(
        layers=layers, width=PAPER27B["width"], hidden=PAPER27B["hidden"], seq_len=tokens, vocab=0, tokens=tokens,
        streams=streams, residual="plain" if streams == 1 else "mhc", mlp=PAPER27B["mlp"],
    )  # fmt: skip
    return {
        "kept_GiB": stage_kept_bytes(shape, 0, layers, block_layers) / GIB,
        "transient_GiB": backward_transient_bytes(shape, layers, block_layers) / GIB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--blocks", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=600)
    ap.add_argument("--norm", nargs="+", default=["fused"], choices=["eager", "fused"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--predict", metavar="JSON", help="no GPU: redo the planner's columns of a result file")
    args = ap.parse_args()
    if args.predict:
        print(write_table(json.loads(Path(args.predict).read_text()), Path(args.predict).parent))
        return

    name = torch.cuda.get_device_name()
    _annotate_replay()
    n, c = args.streams, PAPER27B["width"]
    stacks = {
        "plain": build_stack(PAPER27B, args.layers, 1, "plain", "reference"),
        "mhc": build_stack(PAPER27B, args.layers, n, "mhc", "triton"),
    }
    inputs = {}
    for key, streams in (("plain", 1), ("mhc", n)):
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(1, args.tokens, streams, c, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
        inputs[key] = (x, torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16))
    variants = {"plain": ("plain", None), "mhc": ("mhc", None)}
    variants.update({f"mhc L_r={k}": ("mhc", k) for k in args.blocks})

    results = {
        "device": name, "torch": torch.__version__, "layers": args.layers, "tokens": args.tokens, "streams": n,
        "shape": PAPER27B, "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "norms": {},
    }  # fmt: skip
    for norm in args.norm:
        _use_norm(norm)
        for key, block in variants.values():  # warm-up: kernels compiled, allocator settled
            for _ in range(2):
                _step(stacks[key], *inputs[key], block)
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for p in range(args.passes):
            for v, (key, block) in variants.items():
                stack, (x, grad) = stacks[key], inputs[key]
                params = list(stack.parameters()) + [x]
                ms = do_bench(lambda: _step(stack, x, grad, block), warmup=50, rep=args.rep_ms,
                              grad_to_none=params, return_mode="median")  # fmt: skip
                times[v].append(ms)
            print(f"  {norm} pass {p}: " + ", ".join(f"{v} {t[-1]:.2f}" for v, t in times.items()), flush=True)
        rows = {}
        for v, (key, block) in variants.items():
            rows[v] = {
                "ms": statistics.median(times[v]), "ms_passes": times[v],
                **memory(stacks[key], *inputs[key], block),
            }  # fmt: skip
        if args.profile:
            for v in ["mhc"] + [f"mhc L_r={k}" for k in args.blocks[:1]]:
                key, block = variants[v]
                top = kernel_times(stacks[key], *inputs[key], block)
                rows[v]["kernels_ms"] = list(top.items())[:60]
                print(f"    {norm} {v} top (ms):", [(k[:70], round(t, 3)) for k, t in list(top.items())[:25]])
        results["norms"][norm] = rows
        results["passes"] = args.passes
        print(write_table(results, Path(args.out)), flush=True)


def write_table(results: dict, out: Path) -> str:
    """``recompute_<device>.json`` and ``.md`` under ``out``; the planner's columns from the model as it is now."""
    lines = [
        f"device: {results['device']}; {results['layers']} layers of C {PAPER27B['width']}, {PAPER27B['heads']} "
        f"heads, SwiGLU {PAPER27B['hidden']}; {results['tokens']} tokens; bf16; n = {results['streams']}; fwd+bwd "
        f"median of do_bench over {results.get('passes', 3)} interleaved passes",
        "",
        "| norm | variant | fwd+bwd ms | vs plain | kept GiB | peak in B GiB | transient GiB "
        "| planner kept / transient GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for norm, rows in results["norms"].items():
        plain = rows["plain"]["ms"]
        for v, r in rows.items():
            block = int(v.split("=")[1]) if "L_r=" in v else None
            r["planner"] = _prediction(results["layers"], results["tokens"], 1 if v == "plain" else results["streams"],
                                       block)
            over = f"+{100 * (r['ms'] / plain - 1):.1f} %" if v != "plain" else ""
            pred = r["planner"]
            lines.append(
                f"| {norm} | {v} | {r['ms']:.1f} | {over} | {r['kept_GiB']:.2f} | {r['peak_B_GiB']:.2f} | "
                f"{r['transient_GiB']:.2f} | {pred['kept_GiB']:.2f} / {pred['transient_GiB']:.2f} |"
            )
    return write_results(out, "recompute", results["device"], results, lines)


if __name__ == "__main__":
    main()
