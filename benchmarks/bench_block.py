"""Whole-block benchmark: mHC (n streams) vs the plain residual block, fwd+bwd, time and peak memory.

    python benchmarks/bench_block.py [--shapes a b] [--layers 4] [--batch 4] [--seq 2048] [--passes 1]
                                     [--variants plain "mhc fused" ...] [--out benchmarks/results]

Shapes (docs/DESIGN.md §6, issue 4):
    a   C = 2048, 16 heads, GELU MLP hidden 4C = 8192
    b   C = 4096, 32 heads, SwiGLU MLP hidden 11008
Each: ``--layers`` dualpipe_mhc.model.Block layers run as a stage runs them (``recompute.run_blocks``:
each told the next), B x S tokens (default 4 x 2048 = 8192),
bf16 weights and streams, mHC mapping parameters (phi, alpha, bias) in fp32, Sinkhorn 20 iterations.
Variants, each timed fwd+bwd (input gradient included, as in a pipeline stage), and the baseline
each one's overhead is quoted against:
    plain              residual kind 'plain', n = 1: the lean block (fused RMSNorm, cached rotary)
    plain compile      the plain block with every sublayer F (Attention, Mlp) torch.compile'd       vs plain
    mhc eager          n = 4, the PyTorch reference ops                                            vs plain
    mhc compile        n = 4, torch.compile of the whole stack with the reference ops              vs plain
    mhc fused          n = 4, the Triton kernels (the device's launch settings, kernels/settings.py,
                       overridden from ``--tuning``)                                                vs plain
    mhc fused compile  'mhc fused' with every sublayer F torch.compile'd as in 'plain compile'; the
                       mHC ops stay the Triton kernels, outside the compiled graphs                vs plain compile
    mhc fused v2       n = 4, the Triton kernels with the previous defaults (kernel_candidates.V2)  vs plain
    mhc fused chain    'mhc fused' with the junction across sublayers (launch setting chain=True)    vs plain
    mhc fused chain fwd 'mhc fused' with the forward junction alone (chain=True, chain_bwd=False)   vs plain
    mhc fused recompute 'mhc fused' recomputing in blocks of 2 layers (dualpipe_mhc.recompute)      vs plain
    dsv4 fused         n = 4, residual kind 'dsv4' (DeepSeek-V4's mappings) on the same Triton kernels and
                       launch settings as 'mhc fused' (its HyperHead is outside the block: not timed) vs plain
    mhc liger          n = 4, Liger-Kernel 0.8.5's LigerMHC (Triton) around the same Attention and Mlp
                       (the optional extra ``.[bench]``; skipped, with one line, without it)       vs plain
Timing: triton.testing.do_bench (CUDA events, median, warm-up first, L2 flushed between runs), twice
in a row per variant; with ``--passes K`` all variants are built first and timed in turn K times
(the median over passes is quoted, and the table gives the per-pass overhead range).
Peak memory: torch.cuda.max_memory_allocated during one fwd+bwd, minus what was allocated before it;
quoted also as a ratio to the baseline's peak (target for the fused block: at most 1.35 x plain's).

Byte floors: the extra HBM bytes mHC must move per token and sublayer over the plain residual,
at copy bandwidth, as a share of the baseline's measured time:
    minimal op-local  (8n + 5) C elements - 6 C (plain residual: x + y fwd, dx accumulation bwd)
        fwd  pre: x, u;  post/res: x, y, x_next                   3nC + 2C
        bwd  post/res: g = dx_next, x, y, dy;  pre: du, x, g, dx   5nC + 3C
             (the post/res op's dx = H_res^T g is formed inside the pre op's dx pass, never stored)
    chain             (7n + 6) C elements - 6 C: the cross-sublayer fused design. Forward: post/res_l
        and the projection partials of pre_{l+1} share one pass, so x_{l+1} is read once for u;
        backward: pre_{l+1}'s apply is fused into post/res_l's backward, x_{l+1} rebuilt in
        registers from x_l and y_l. (It replaces the floor of the op-local kernels, (10n + 6) C.)
Writes ``kernels_block_<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_results  # noqa: E402

SHAPES = {
    "a": dict(width=2048, heads=16, mlp="gelu", hidden=8192),
    "b": dict(width=4096, heads=32, mlp="swiglu", hidden=11008),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    residual: str  # 'plain', 'mhc', 'dsv4', or 'liger' (LigerMHC around the same sublayers)
    kernels: str = "reference"  # the HyperConnection's ops: 'reference' or 'triton'
    compile: str = ""  # '' none, 'stack' the whole stack, 'sublayer' each Attention / Mlp alone
    baseline: str | None = "plain"  # the variant its overhead and peak ratio are quoted against
    recompute: int | None = None  # L_r: recompute the mHC intermediates in blocks of this many layers


VARIANTS = {
    "plain": Variant("plain", baseline=None),
    "plain compile": Variant("plain", compile="sublayer"),
    "mhc eager": Variant("mhc"),
    "mhc compile": Variant("mhc", compile="stack"),
    "mhc fused": Variant("mhc", "triton"),
    "mhc fused compile": Variant("mhc", "triton", compile="sublayer", baseline="plain compile"),
    "mhc fused v2": Variant("mhc", "triton"),
    "mhc fused chain": Variant("mhc", "triton"),  # with the junction across sublayers (launch setting chain)
    "mhc fused chain fwd": Variant("mhc", "triton"),  # the forward junction alone (chain, not chain_bwd)
    "mhc fused recompute": Variant("mhc", "triton", recompute=2),
    "dsv4 fused": Variant("dsv4", "triton"),
    "mhc liger": Variant("liger"),
}
LIGER_PIN = "liger-kernel==0.8.5"
# the floors' element counts per token and sublayer, (a, b) for a * n + b, and the plain residual's 6
FLOORS = {"min": (8, 5), "chain": (7, 6)}
PLAIN_RESIDUAL_ELEMENTS = 6


def _import_model():
    """dualpipe_mhc.model, on a host without pydantic too: model.py needs config.ModelConfig only as a type."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        stub = types.ModuleType("dualpipe_mhc.config")
        stub.ModelConfig = object
        stub.RESIDUALS = _residual_kinds()  # mhc.py validates the residual kind against it
        sys.modules["dualpipe_mhc.config"] = stub
    from dualpipe_mhc import model

    return model


def _residual_kinds() -> tuple[str, ...]:
    """config.py's ResidualKind literal, read from its source (importing it needs pydantic)."""
    src = (Path(__file__).resolve().parents[1] / "dualpipe_mhc" / "config.py").read_text()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["ResidualKind"]:
            return tuple(ast.literal_eval(node.value.slice))
    raise RuntimeError("dualpipe_mhc/config.py defines no ResidualKind literal")


def liger_mhc_class():
    """Liger-Kernel's LigerMHC, or None (and one line saying so) when the optional extra is missing."""
    try:
        from liger_kernel.transformers.mhc import LigerMHC
    except ImportError as err:
        print(f"mhc liger: skipped, {LIGER_PIN} is not importable ({err}); pip install -e '.[bench]'", flush=True)
        return None
    return LigerMHC


class LigerBlock(torch.nn.Module):
    """model.Block with Liger-Kernel's ``LigerMHC`` as the hyper-connection of both sublayers.

    LigerMHC computes one sublayer's mHC as 'mhc' does here: proj = (vec(x) @ phi) / rms(vec(x)),
    three scalar alphas and a bias, H_pre = sigmoid (pre_eps 0), H_post = 2 sigmoid, u = H_pre x,
    then F(u), then x_next = H_res x + H_post^T F(u), 20 Sinkhorn iterations. The differences:
    its Sinkhorn is DeepSeek-V4's eps-guarded form (a row softmax + eps, a column normalisation,
    then 19 rounds of row, column; each denominator + 1e-6) on H_res itself, where 'mhc' runs 20
    rounds of column, row on exp(logits) without eps: the same count of normalisations and the
    same bytes; and its phi is bf16 (its tensor-core path, the documented default for speed),
    where 'mhc' keeps phi in fp32. Initialised as :class:`~dualpipe_mhc.mhc.HyperConnection`
    'mhc' (phi ~ N(0, 1/(nC)), alphas 0.01, the same biases), so the streams stay near identity.
    ``phi_dtype`` float32 with ``allow_fp32`` is its fp32 path (what Triton's CPU interpreter runs).
    """

    def __init__(self, cfg, liger_mhc, phi_dtype: torch.dtype = torch.bfloat16, allow_fp32: bool = False) -> None:
        super().__init__()
        model = _import_model()
        n, c = cfg.streams, cfg.width
        wrap = dict(hc=n, c=c, tmax=cfg.sinkhorn_iters, phi_dtype=phi_dtype, allow_fp32=allow_fp32)
        self.attn = liger_mhc(model.Attention(c, cfg.heads), **wrap)
        self.mlp = liger_mhc(model.Mlp(c, cfg.hidden, cfg.mlp), **wrap)
        with torch.no_grad():
            for hc in (self.attn, self.mlp):
                hc.phi.normal_(0.0, (n * c) ** -0.5)
                hc.b.copy_(model.HyperConnection.initial_bias(n, "mhc"))
                for a in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
                    a.fill_(model.ALPHA_INIT)

    def forward(self, x: torch.Tensor, then: torch.nn.Module | None = None) -> torch.Tensor:  # then: no use here
        return self.mlp(self.attn(x))


class Stack(torch.nn.Sequential):
    """The blocks as a model's stage runs them (``recompute.run_blocks``): each told the block after it
    (the fused mHC ops may fuse across that seam), recomputing in blocks of ``recompute`` layers if set."""

    recompute: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dualpipe_mhc.recompute import run_blocks

        return run_blocks(list(self), x, 0, self.recompute)


def build_stack(
    shape: dict, layers: int, streams: int, variant: Variant, device: str = "cuda", liger_mhc=None
) -> torch.nn.Module:
    """``layers`` blocks of ``variant`` in bf16 on ``device`` (mappings in fp32; LigerMHC as Liger keeps them),
    compiled as the variant says."""
    model = _import_model()
    n = 1 if variant.residual == "plain" else streams
    cfg = types.SimpleNamespace(
        width=shape["width"], heads=shape["heads"], mlp=shape["mlp"], hidden=shape["hidden"],
        streams=n, residual=variant.residual, sinkhorn_iters=20,
    )  # fmt: skip
    torch.manual_seed(0)
    if variant.residual == "liger":
        blocks = [LigerBlock(cfg, liger_mhc) for _ in range(layers)]
    else:
        blocks = [model.Block(cfg, kernels=variant.kernels) for _ in range(layers)]
    stack = Stack(*blocks)
    stack.recompute = variant.recompute
    for mod in stack.modules():  # the model's own initialisation: N(0, 0.02) projections
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=0.02)
    stack = stack.to(device, torch.bfloat16)
    for mod in stack.modules():
        if isinstance(mod, model.HyperConnection) and mod.kind != "plain":
            for p in (mod.phi, mod.alpha, mod.bias):
                p.data = p.data.float()  # mappings in fp32 (docs/DESIGN.md §4 mixed precision)
        elif liger_mhc is not None and isinstance(mod, liger_mhc):
            for p in (mod.b, mod.alpha_pre, mod.alpha_post, mod.alpha_res):
                p.data = p.data.float()  # LigerMHC's own dtypes: phi bf16, the rest fp32
    if variant.compile == "stack":
        stack = torch.compile(stack, dynamic=False)
    elif variant.compile == "sublayer":
        for mod in stack.modules():
            if isinstance(mod, (model.Attention, model.Mlp)):
                mod.compile(dynamic=False)  # in place: F alone, the residual ops stay outside the graph
    return stack


def _bench_step(stack, x: torch.Tensor, grad: torch.Tensor, rep_ms: int, warmup: int) -> float:
    from triton.testing import do_bench

    params = [p for p in stack.parameters()]

    def step():
        stack(x).backward(grad)

    return do_bench(step, warmup=warmup, rep=rep_ms, grad_to_none=params + [x], return_mode="median")


def peak_gib(step, leaves: list[torch.Tensor]) -> float:
    """GiB the CUDA allocator peaked at during one ``step()`` above what was allocated before it,
    the ``leaves``' gradients cleared first (so the step allocates them, as a first micro-batch does)."""
    for p in leaves:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _peak_gib(stack, x: torch.Tensor, grad: torch.Tensor) -> float:
    return peak_gib(lambda: stack(x).backward(grad), list(stack.parameters()) + [x])


def _warm_up(stack, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds spent: compiles the kernels (and torch.compile's graphs) before any timing."""
    t0 = time.time()
    for _ in range(3):
        stack(x).backward(grad)
    torch.cuda.synchronize()
    return time.time() - t0


def measure(stack, x: torch.Tensor, grad: torch.Tensor, rep_ms: int) -> dict[str, float]:
    warm_s = _warm_up(stack, x, grad)
    ms = _bench_step(stack, x, grad, rep_ms, warmup=100)
    ms2 = _bench_step(stack, x, grad, rep_ms, warmup=10)
    return {"ms": ms, "ms_repeat": ms2, "peak_GiB": _peak_gib(stack, x, grad), "warm_up_s": warm_s}


def measure_interleaved(built: dict, rep_ms: int, passes: int, tunings: dict) -> dict[str, dict]:
    """Every variant timed once a pass, in turn, ``passes`` times: a drift of the machine (clocks,
    a neighbour) then hits all variants alike. ms = the median over passes; all passes kept."""
    from dualpipe_mhc.kernels.settings import overriding

    times: dict[str, list[float]] = {v: [] for v in built}
    warm: dict[str, float] = {}
    for p in range(passes):
        for variant, (stack, x, grad) in built.items():
            with overriding(tunings.get(variant, {})):
                if p == 0:
                    warm[variant] = _warm_up(stack, x, grad)
                times[variant].append(_bench_step(stack, x, grad, rep_ms, warmup=100 if p == 0 else 10))
        print(f"  pass {p}: " + ", ".join(f"{v} {t[-1]:.2f}" for v, t in times.items()), flush=True)
    rows = {}
    for variant, (stack, x, grad) in built.items():
        with overriding(tunings.get(variant, {})):
            peak = _peak_gib(stack, x, grad)
        rows[variant] = {
            "ms": statistics.median(times[variant]), "ms_passes": times[variant], "peak_GiB": peak,
            "warm_up_s": warm[variant],
        }  # fmt: skip
    return rows


def floor_bytes(kind: str, sublayers: int, tokens: int, streams: int, width: int, elem_bytes: int = 2) -> int:
    """Extra HBM bytes of the mHC block over the plain one under floor ``kind`` (FLOORS)."""
    a, b = FLOORS[kind]
    return sublayers * tokens * (a * streams + b - PLAIN_RESIDUAL_ELEMENTS) * width * elem_bytes


def summarise(rows: dict[str, dict], floors_ms: dict[str, float]) -> dict[str, dict]:
    """Per variant: its baseline, overhead (median, and per pass when both were timed in passes), peak ratio,
    and the floors as a share of the baseline's time; a baseline that was not run leaves those out.
    Also ``liger_over_fused``, the ratio of 'mhc liger' to 'mhc fused' overhead, when both ran."""
    out = {}
    for variant, r in rows.items():
        base_name = VARIANTS[variant].baseline
        base = rows.get(base_name) if base_name else None
        s: dict = {"baseline": base_name if base else None}
        if base:
            s["overhead"] = r["ms"] / base["ms"] - 1
            if "ms_passes" in r and "ms_passes" in base:  # the overhead within each pass
                s["overhead_passes"] = [v / p - 1 for v, p in zip(r["ms_passes"], base["ms_passes"])]
            s["peak_ratio"] = r["peak_GiB"] / base["peak_GiB"] if base["peak_GiB"] > 0 else math.nan
            if VARIANTS[variant].residual != "plain":
                s["floors"] = {k: f / base["ms"] for k, f in floors_ms.items()}
        out[variant] = s
    fused, liger = out.get("mhc fused", {}).get("overhead"), out.get("mhc liger", {}).get("overhead")
    if fused is not None and liger is not None:
        out["liger_over_fused"] = liger / fused if fused > 0 else math.inf
    return out


def _pct(v: float) -> str:
    return f"{100 * v:+.1f} %"


def table_rows(label: str, rows: dict[str, dict], summary: dict[str, dict]) -> list[str]:
    """The markdown rows of one shape (the header is TABLE_HEAD)."""
    lines = []
    for variant, r in rows.items():
        s = summary[variant]
        over = ratio = floor = target = ""
        if s["baseline"]:
            over = _pct(s["overhead"])
            if "overhead_passes" in s:
                per = sorted(s["overhead_passes"])
                over += f" (passes {_pct(per[0])} to {_pct(per[-1])})"
            ratio = f"{s['peak_ratio']:.2f} x"
        if "floors" in s:
            f = s["floors"]
            floor = f"{_pct(f['min'])} / {_pct(f['chain'])}"
            target = f"{_pct(1.3 * f['min'])} / {_pct(1.3 * f['chain'])}"
        lines.append(
            f"| {label} | {variant} | {s['baseline'] or ''} | {r['ms']:.2f} | {over} | {floor} | {target} | "
            f"{r['peak_GiB']:.2f} | {ratio} |"
        )
    return lines


TABLE_HEAD = [
    "| shape | variant | baseline | ms | overhead vs baseline | floor (min op-local / chain) | 1.3 x floor "
    "| peak GiB | peak vs baseline |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def target_notes(key: str, summary: dict[str, dict]) -> list[str]:
    """One line per shape on the issue's ratio targets, for what was run."""
    notes = []
    if "liger_over_fused" in summary:
        notes.append(f"liger overhead / fused overhead {summary['liger_over_fused']:.1f} x (target >= 5 x)")
    for v in ("mhc fused", "mhc fused compile"):
        if "peak_ratio" in summary.get(v, {}):
            notes.append(f"{v} peak / {summary[v]['baseline']} peak {summary[v]['peak_ratio']:.2f} x (target <= 1.35 x)")
    return [f"- shape {key}: " + "; ".join(notes)] if notes else []


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


def _set_compile_limits() -> None:
    # every compiled Attention / Mlp and shape is one more cache entry of the same code object
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["a", "b"], choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--rep-ms", type=int, default=1500)
    ap.add_argument("--passes", type=int, default=1,
                    help="> 1: build every variant first, time them in turn this many times, quote the median")
    ap.add_argument("--variants", nargs="+", default=["plain", "mhc fused", "mhc eager", "mhc compile"],
                    choices=list(VARIANTS), metavar="VARIANT", help=f"any of: {', '.join(VARIANTS)}")
    ap.add_argument("--copy-bandwidth", type=float, default=None, help="B/s; measured here when not given")
    ap.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of plain and fused")
    ap.add_argument("--tuning", default=None, help="JSON of launch-settings overrides for 'mhc fused'")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    for v in args.variants:
        base = VARIANTS[v].baseline
        if base and base not in args.variants:
            print(f"note: {v!r} is quoted against {base!r}, which is not in --variants: no overhead for it")
    return args


def runnable_variants(variants: list[str]) -> tuple[list[str], object]:
    """``variants`` less 'mhc liger' when Liger-Kernel is missing, and LigerMHC (or None)."""
    if "mhc liger" not in variants:
        return variants, None
    liger = liger_mhc_class()
    return (variants if liger is not None else [v for v in variants if v != "mhc liger"]), liger


def main() -> None:
    args = parse_args()
    variants, liger = runnable_variants(args.variants)
    if any(VARIANTS[v].compile for v in variants):
        _set_compile_limits()
    name = torch.cuda.get_device_name()

    from kernel_candidates import V2
    from triton.testing import do_bench

    from dualpipe_mhc.kernels.settings import launch_settings, overriding

    tunings = {
        "mhc fused": json.loads(Path(args.tuning).read_text()) if args.tuning else {},
        "mhc fused v2": V2,
    }
    tunings["dsv4 fused"] = tunings["mhc fused compile"] = tunings["mhc fused"]
    tunings["mhc fused chain"] = {**tunings["mhc fused"], "chain": True}
    tunings["mhc fused chain fwd"] = {**tunings["mhc fused"], "chain": True, "chain_bwd": False}
    tunings["mhc fused recompute"] = tunings["mhc fused"]
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
        "variants": variants, "baselines": {v: VARIANTS[v].baseline for v in variants},
        "shapes": {}, "tuning": {
            k: dataclasses.asdict(launch_settings(torch.device("cuda"), torch.bfloat16, n, 0, v))
            for k, v in tunings.items()
        },
    }  # fmt: skip
    if liger is not None:
        from importlib.metadata import version

        results["liger_kernel"] = version("liger-kernel")
    lines = [
        f"device: {name}; copy bandwidth {bw / 1e12:.2f} TB/s; {args.layers} layers, {args.batch} x {args.seq} tokens, "
        f"bf16, n = {n}, fwd+bwd (median of do_bench"
        + (f", median of {args.passes} interleaved passes)" if args.passes > 1 else ")"),
        "",
        *TABLE_HEAD,
    ]
    notes: list[str] = []
    for key in args.shapes:
        shape = SHAPES[key]
        c = shape["width"]
        extra = {k: floor_bytes(k, 2 * args.layers, tokens, n, c) for k in FLOORS}
        rows, built = {}, {}
        for variant in variants:
            spec = VARIANTS[variant]
            streams = 1 if spec.residual == "plain" else n
            stack = build_stack(shape, args.layers, n, spec, liger_mhc=liger)
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
        for variant in [v for v in variants if args.profile and VARIANTS[v].kernels == "triton"]:
            stack = build_stack(shape, args.layers, n, VARIANTS[variant])
            x = torch.randn(args.batch, args.seq, n, c, device="cuda").to(torch.bfloat16).requires_grad_()
            with overriding(tunings.get(variant, {})):
                grad = torch.randn_like(x)
                top = kernel_breakdown(lambda: stack(x).backward(grad))
            rows[variant]["kernels_ms"] = top[:40]
            print(f"    {variant} top kernels (ms):", [(k[:60], round(v, 3)) for k, v in top[:15]], flush=True)
            del stack, x
            torch.cuda.empty_cache()
        floors_ms = {k: e / bw * 1e3 for k, e in extra.items()}
        summary = summarise(rows, floors_ms)
        for variant, r in rows.items():
            r.update(summary[variant])
        results["shapes"][key] = {
            **shape, "variants": rows, "extra_bytes_min": extra["min"], "extra_bytes_chain": extra["chain"],
            "floor_ms_min": floors_ms["min"], "floor_ms_chain": floors_ms["chain"],
            **({"liger_over_fused": summary["liger_over_fused"]} if "liger_over_fused" in summary else {}),
        }  # fmt: skip
        label = f"{key} (C={c}, {shape['mlp']} {shape['hidden']})"
        shape_lines = table_rows(label, rows, summary)
        lines += shape_lines
        notes += target_notes(key, summary)
        print("\n".join(shape_lines + target_notes(key, summary)), flush=True)
        # written after every shape, so a cut-short run keeps what it measured
        write_results(args.out, "kernels_block", name, results, lines + ([""] + notes if notes else []))
    print("\n".join(lines + ([""] + notes if notes else [])))


if __name__ == "__main__":
    main()
