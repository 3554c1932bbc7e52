"""Per-kernel benchmark of the fused mHC ops: time, bytes moved, bandwidth vs the measured copy bandwidth.

    python benchmarks/bench_kernels.py [--tokens 8192] [--widths 2048 4096 7168] [--streams 4]
                                       [--sweep [--write-tuning best.json] [--no-cases]]
                                       [--tuning best.json] [--out benchmarks/results]

For each shape it times (CUDA-graph replays through triton.testing.do_bench_cudagraph,
median, after warm-up, random bf16 inputs) every launch of the fused path, with the device's launch
settings (kernels.settings.launch_settings, overridden from ``--tuning``) and, for the pre kernels, with
the previous defaults (kernel_candidates.V2, "(v2)" rows):
    pre fwd           _pre_fwd_partial_kernel + _pre_fwd_finish_aggregate_kernel when fwd_split says so
                      (v2: _pre_fwd_kernel + _pre_aggregate_kernel)
    pre bwd reduce    _pre_bwd_reduce_kernel   (dH_pre, Sinkhorn backward, per-token scalars)
    pre bwd apply     _pre_bwd_apply_kernel    (dx, with the post/res op's H_res^T g formed and added, as in a layer)
                      + _pre_bwd_dphi_kernel   (dphi = vec(x)^T draw; or fused into the former, --sweep compares)
    post_res fwd / bwd  (bwd as in a layer: dy and the mapping gradients; its dx is left to the apply kernel)
and the eager reference of the same op for context. Bytes are counted two ways:
``min`` = each stream tensor read or written once (the HBM floor of the op), ``moved`` =
what the kernels move (the pre forward reads x twice, the pre backward reads x and du in
both passes). The table gives both as a fraction of the copy bandwidth: on min bytes, 100 %
would be the op at its floor; on moved bytes, how close the kernels run to copy speed.
``--sweep`` first times kernel_candidates' FWD, APPLY, REDUCE, POST_FWD and POST_BWD at ``--sweep-widths``
and picks, per kernel, the least total time (``--write-tuning``: the overrides for a new device entry
in kernels/settings.py's TABLE). ``--render FILE`` re-prints a saved run's table.

Writes ``kernels_ops_<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_candidates as cands  # noqa: E402
from results_io import write_results  # noqa: E402

from dualpipe_mhc.kernels import reference as ref  # noqa: E402
from dualpipe_mhc.kernels.mhc_chain import chain_backward, chain_forward, chain_supported  # noqa: E402
from dualpipe_mhc.kernels.mhc_post import post_res_backward, post_res_forward  # noqa: E402
from dualpipe_mhc.kernels import mhc_pre, mhc_pre_common  # noqa: E402
from dualpipe_mhc.kernels.mhc_pre import (  # noqa: E402
    pre_backward_apply,
    pre_backward_reduce,
    pre_forward,
)
from dualpipe_mhc.kernels.settings import LaunchSettings, launch_settings  # noqa: E402

ITERS = 20


def bench(fn, ms: int = 200, graph: bool = True) -> float:
    """Median milliseconds of one call. ``graph``: replayed from a CUDA graph, the GPU's time
    without the Python launch overhead (a few launches of ~10-20 us each would otherwise dominate
    the sub-0.3 ms ops and hide what the kernels cost inside a model, where launches overlap);
    otherwise launched eagerly (the eager reference, whose launch overhead is part of its cost)."""
    if graph:
        return do_bench_cudagraph(fn, rep=ms, return_mode="median")
    return do_bench(fn, warmup=50, rep=ms, return_mode="median")


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = int(gib * (1 << 30)) // 2
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), 400, graph=False)
    return 2 * a.numel() * 2 / (ms * 1e-3)


def make_case(t: int, n: int, c: int, device: str, dtype=torch.bfloat16):
    m = 2 * n + n * n
    g = torch.Generator(device=device).manual_seed(t + n + c)
    x = torch.randn(t, n, c, device=device, generator=g).to(dtype)
    phi = torch.randn(n * c, m, device=device, generator=g) / (n * c) ** 0.5
    alpha = torch.tensor([0.8, 0.6, 1.5], device=device)
    bias = torch.randn(m, device=device, generator=g)
    y = torch.randn(t, c, device=device, generator=g).to(dtype)
    du = torch.randn(t, c, device=device, generator=g).to(dtype)
    gx = torch.randn(t, n, c, device=device, generator=g).to(dtype)
    return x, phi, alpha, bias, y, du, gx


def stream_bytes(t: int, n: int, c: int, esize: int = 2) -> dict[str, tuple[int, int]]:
    """(min, moved) bytes per kernel; the fp32 per-token tensors (a few dozen floats) are included in both."""
    m = 2 * n + n * n
    dh_blocks = triton.cdiv(c, LaunchSettings().chain_bwd_block_c)
    small = lambda floats: t * floats * 4  # noqa: E731
    xs, cs = t * n * c * esize, t * c * esize
    return {
        "pre fwd": (xs + cs + small(2 * m + 1), 2 * xs + cs + small(2 * m + 1)),
        "pre bwd reduce": (xs + cs + small(4 * m), xs + cs + small(4 * m)),
        # x, du, g (with H_res, n^2 floats) -> dx
        "pre bwd apply": (3 * xs + cs + small(m + 2 + n * n), 3 * xs + cs + small(m + 2 + n * n)),
        "pre bwd": (3 * xs + cs, 4 * xs + 2 * cs),
        "post_res fwd": (2 * xs + cs, 2 * xs + cs),
        "post_res bwd": (2 * xs + 2 * cs, 2 * xs + 2 * cs),  # g, x, y -> dy
        # the junction (kernels/mhc_chain.py): x, y -> x_next and the next pre op's projection partials
        # (~3 channel splits of M + 1 floats); then that op reads x_next once: partials -> mappings, u
        "chain fwd": (2 * xs + cs + small(3 * (m + 1)), 2 * xs + cs + small(3 * (m + 1))),
        "chained pre fwd": (xs + cs + small(2 * m + 1 + 3 * (m + 1)), xs + cs + small(2 * m + 1 + 3 * (m + 1))),
        # x, y, du, g_next (H_res_next), draw, coef -> g, dy; moved also: the dH partials, n + n^2 floats a token
        # per channel block, written and summed (at the default channel block)
        "chain bwd": (3 * xs + 3 * cs + small(m + 2 + 3 * n + 2 * n * n),
                      3 * xs + 3 * cs + small(m + 2 + 3 * n + 2 * n * n + 2 * dh_blocks * (n + n * n))),
    }


def time_case(t: int, n: int, c: int, device: str, overrides: dict) -> dict[str, float]:
    x, phi, alpha, bias, y, du, gx = make_case(t, n, c, device)
    st = launch_settings(x.device, x.dtype, n, c, overrides)
    u, h_pre, h_post, h_res, proj, rstd = pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, settings=st)
    dh_post = torch.randn_like(h_post)
    dh_res = torch.randn_like(h_res)
    _, _, draw, coef = pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, ITERS, settings=st)
    res = {
        "pre fwd": bench(lambda: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, settings=st)),
        "pre bwd reduce": bench(
            lambda: pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, ITERS, settings=st)
        ),
        "pre bwd apply": bench(
            lambda: pre_backward_apply(x, phi, h_pre, du, draw, coef, res_grad=(gx, h_res), settings=st)
        ),
        "post_res fwd": bench(lambda: post_res_forward(x, y, h_post, h_res, settings=st)),
        "post_res bwd": bench(lambda: post_res_backward(gx, x, y, h_post, h_res, write_dx=False, settings=st)),
    }
    res["pre bwd"] = res["pre bwd reduce"] + res["pre bwd apply"]
    cst = st.replace(chain=True)  # the junction's rows whether or not the device's entry turns it on
    if chain_supported(x, cst):
        _, part, ss_part = chain_forward(x, y, h_post, h_res, phi, cst)
        res["chain fwd"] = bench(lambda: chain_forward(x, y, h_post, h_res, phi, cst))
        res["chained pre fwd"] = bench(
            lambda: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, settings=cst, partials=(part, ss_part))
        )
        res["chain bwd"] = bench(
            lambda: chain_backward(x, y, h_post, h_res, phi, du, h_pre, draw, coef, (gx, h_res), None, cst)
        )
    print(f"  resident programs per kernel config (apply grid sizing): {list(mhc_pre_common._resident.values())}")
    v2 = st.replace(cands.V2)  # the previous defaults, same inputs, same run
    res["pre fwd (v2)"] = bench(lambda: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, settings=v2))
    res["pre bwd apply (v2)"] = bench(
        lambda: pre_backward_apply(x, phi, h_pre, du, draw, coef, res_grad=(gx, h_res), settings=v2)
    )
    res["pre bwd (v2)"] = res["pre bwd reduce"] + res["pre bwd apply (v2)"]
    # eager reference, same inputs (fwd only, and fwd+bwd of the op)
    xr = x.detach().requires_grad_()
    pr, ar, br = (p.detach().requires_grad_() for p in (phi, alpha, bias))
    res["ref pre fwd"] = bench(lambda: ref.mhc_pre(x, phi, alpha, bias, ITERS), graph=False)
    res["ref post_res fwd"] = bench(lambda: ref.post_res(x, y, h_post, h_res), graph=False)

    def ref_pre_fwd_bwd():
        uu, hp, hr = ref.mhc_pre(xr, pr, ar, br, ITERS)
        torch.autograd.backward((uu, hp, hr), (du, dh_post, dh_res))

    res["ref pre fwd+bwd"] = bench(ref_pre_fwd_bwd, graph=False)
    return res


def sweep(t: int, n: int, c: int, device: str, only: list[str] | None = None) -> dict[str, list]:
    """Time every candidate of kernel_candidates (FWD, APPLY, REDUCE, POST_FWD, POST_BWD, CHAIN_FWD, CHAIN_BWD
    and the v2 defaults); ``only``: the kernels whose names start so ("chain", "pre bwd", ...)."""
    x, phi, alpha, bias, y, du, gx = make_case(t, n, c, device)
    base = launch_settings(x.device, x.dtype, n, c)
    u, h_pre, h_post, h_res, proj, rstd = pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS)
    dh_post, dh_res = torch.randn_like(h_post), torch.randn_like(h_res)
    _, _, draw, coef = pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, ITERS)
    calls = {
        "pre fwd": (lambda st: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, settings=st),
                    cands.FWD + [{"fwd_split": False}]),
        "pre bwd apply": (lambda st: pre_backward_apply(x, phi, h_pre, du, draw, coef, res_grad=(gx, h_res),
                                                        settings=st),
                          cands.APPLY + [cands.V2]),
        "pre bwd reduce": (lambda st: pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, ITERS,
                                                          settings=st),
                           cands.REDUCE),
        "post_res fwd": (lambda st: post_res_forward(x, y, h_post, h_res, settings=st), cands.POST_FWD),
        "post_res bwd": (lambda st: post_res_backward(gx, x, y, h_post, h_res, write_dx=False, settings=st),
                         cands.POST_BWD),
        "chain fwd": (lambda st: chain_forward(x, y, h_post, h_res, phi, st), cands.CHAIN_FWD),
        "chain bwd": (lambda st: chain_backward(x, y, h_post, h_res, phi, du, h_pre, draw, coef, (gx, h_res), None,
                                                st),
                      cands.CHAIN_BWD),
    }  # fmt: skip
    if only:
        calls = {k: v for k, v in calls.items() if any(k.startswith(o) for o in only)}
    out = {}
    for name, (fn, configs) in calls.items():
        rows = []
        for i, kw in enumerate(configs):
            st: LaunchSettings = base.replace(kw)
            try:
                ms = bench(lambda: fn(st), 100)
            except Exception as e:  # a config that does not compile (e.g. out of shared memory) is skipped
                ms = float("nan")
                print(f"  {name} {kw}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            rows.append({**kw, "candidate": i, "ms": ms})
            print(f"  sweep C={c} {name} #{i} {kw}: {ms:.4f} ms", flush=True)
        out[name] = rows
    return out


def split_parts(t: int, n: int, c: int, device: str) -> dict[str, float]:
    """The K-split forward's two launches timed one by one (ms), to say where its time goes."""
    x, phi, alpha, bias, *_ = make_case(t, n, c, device)
    m, k = 2 * n + n * n, n * c
    mp = triton.next_power_of_2(max(m, 16))
    nn_ = max(2, triton.next_power_of_2(n))
    st = launch_settings(x.device, x.dtype, n, c)
    bt, bk = st.fwd_block_t, st.fwd_block_k
    f32 = dict(device=device, dtype=torch.float32)
    outs = [torch.empty((t, c), device=device, dtype=x.dtype), torch.empty((t, n), **f32),
            torch.empty((t, n), **f32), torch.empty((t, n, n), **f32), torch.empty((t, m), **f32),
            torch.empty((t,), **f32)]  # fmt: skip
    out = {}
    for splits in (4, 8, 16):
        ks = triton.cdiv(triton.cdiv(k, splits), bk) * bk
        sp = triton.cdiv(k, ks)
        part, ss = torch.empty((sp, t, mp), **f32), torch.empty((sp, t), **f32)
        grid = (triton.cdiv(t, bt), sp)
        out[f"partial splits={sp}"] = bench(
            lambda: mhc_pre._pre_fwd_partial_kernel[grid](
                x, phi, part, ss, t, k, ks, M=m, MP=mp, BT=bt, BK=bk, UPCAST=False, num_warps=4, num_stages=3
            )
        )
        agg = (triton.cdiv(t, 16 // nn_), triton.cdiv(c, 256))
        out[f"finish+aggregate splits={sp}"] = bench(
            lambda: mhc_pre._pre_fwd_finish_aggregate_kernel[agg](
                part, ss, x, alpha, bias, *outs, t, c, sp, 1e-6,
                n=n, N=nn_, M=m, MP=mp, ITERS=ITERS, BT=16 // nn_, BC=256, num_warps=4,
            )  # fmt: skip
        )
    out["whole split pre fwd"] = bench(lambda: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, split=True))
    out["whole v2 pre fwd"] = bench(lambda: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS, split=False))
    print(f"  split parts C={c}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()), flush=True)
    return out


TUNING_PREFIX = {"pre fwd": "fwd_", "pre bwd apply": "apply_", "pre bwd reduce": "reduce_",
                 "post_res fwd": "post_fwd_", "post_res bwd": "post_bwd_", "chain fwd": "chain_fwd_",
                 "chain bwd": "chain_bwd_"}  # fmt: skip


def best_tuning(sweeps: list[dict[str, list]]) -> dict:
    """The candidate with the least total time over the swept shapes, per kernel, as LaunchSettings overrides."""
    best = {}
    for name in sweeps[0]:
        totals = {}
        for sw in sweeps:
            for row in sw[name]:
                totals[row["candidate"]] = totals.get(row["candidate"], 0.0) + row["ms"]
        ok = {k: v for k, v in totals.items() if v == v}
        pick = min(ok, key=ok.get)
        row = sweeps[0][name][pick]
        prefix = TUNING_PREFIX[name]  # a v2 row carries every key
        picked = {k: v for k, v in row.items() if k.startswith(prefix)}
        best.update(picked)
        print(f"  best {name}: candidate {pick} {picked} total {ok[pick]:.4f} ms", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--streams", type=int, nargs="+", default=[4])
    ap.add_argument("--sweep", action="store_true", help="time the tuning candidates first, at --sweep-widths")
    ap.add_argument("--sweep-widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--sweep-only", nargs="+", default=None, help="sweep only these kernels (name prefixes: chain, ...)")
    ap.add_argument("--tuning", default=None, help="JSON of launch-settings overrides to time as the default")
    ap.add_argument("--write-tuning", default=None, help="with --sweep: write the best candidates here (JSON)")
    ap.add_argument("--no-cases", action="store_true", help="with --sweep: stop after the sweep")
    ap.add_argument("--split-parts", action="store_true", help="only time the K-split forward's launches")
    ap.add_argument("--render", default=None, help="only print the table of an earlier kernels_ops_*.json")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.render:
        print("\n".join(table(json.loads(Path(args.render).read_text()))))
        return
    device = "cuda"
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth(device)
    print(f"device {name}; copy bandwidth {bw / 1e12:.2f} TB/s; torch {torch.__version__}, triton {triton.__version__}")
    results = {
        "device": name, "copy_bandwidth_Bps": bw, "torch": torch.__version__, "triton": triton.__version__,
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cases": [],
    }  # fmt: skip
    if args.split_parts:
        for c in args.widths:
            split_parts(args.tokens[0], args.streams[0], c, device)
        return
    if args.sweep:
        t, n = args.tokens[0], args.streams[0]
        sweeps = [sweep(t, n, c, device, args.sweep_only) for c in args.sweep_widths]
        best = best_tuning(sweeps)
        results["sweep"] = {"T": t, "n": n, "widths": args.sweep_widths, "by_width": sweeps, "best": best}
        if args.write_tuning:
            Path(args.write_tuning).write_text(json.dumps(best, indent=1))
        if args.no_cases:
            write_results(args.out, "kernels_sweep", name, results)
            return
    overrides = json.loads(Path(args.tuning).read_text()) if args.tuning else {}
    tuned = launch_settings(torch.device(device), torch.bfloat16, args.streams[0], args.widths[0], overrides)
    results["tuning"] = dataclasses.asdict(tuned)
    print("tuning:", results["tuning"], flush=True)
    for t in args.tokens:
        for n in args.streams:
            for c in args.widths:
                times = time_case(t, n, c, device, overrides)
                results["cases"].append({"T": t, "n": n, "C": c, "ms": times, "bytes": stream_bytes(t, n, c)})
                print("\n".join(table(results)[-len(ROWS):]), flush=True)
    write_results(args.out, "kernels_ops", name, results, table(results))
    print("\n".join(table(results)))


ROWS = ("pre fwd", "pre fwd (v2)", "pre bwd reduce", "pre bwd apply", "pre bwd apply (v2)", "pre bwd", "pre bwd (v2)",
        "post_res fwd", "post_res bwd", "chain fwd", "chained pre fwd", "chain bwd")  # fmt: skip


def table(results: dict) -> list[str]:
    """The Markdown table of a run (``kernels_ops_*.json``): bandwidth on the op's minimal bytes and on
    the bytes its kernels move, each as a fraction of the measured copy bandwidth."""
    bw = results["copy_bandwidth_Bps"]
    lines = [
        f"device: {results['device']}, copy bandwidth {bw / 1e12:.2f} TB/s (1 GiB bf16 copy, read+write); "
        "bf16 streams; CUDA-graph replay medians",
        "",
        "| T | n | C | kernel | ms | min MB | moved MB | % of copy (min bytes) | % of copy (bytes moved) | eager ref ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in results["cases"]:
        times, nbytes = case["ms"], stream_bytes(case["T"], case["n"], case["C"])
        for k in (r for r in ROWS if r in times):  # runs before the junction have no chain rows
            lo, moved = nbytes[k.removesuffix(" (v2)")]
            sec = times[k] * 1e-3
            refms = {"pre fwd": times["ref pre fwd"], "post_res fwd": times["ref post_res fwd"]}.get(k)
            refcol = f"{refms:.3f}" if refms else ""
            if k in ("pre bwd", "pre bwd (v2)"):
                refcol = f"{times['ref pre fwd+bwd'] - times['ref pre fwd']:.3f} (fwd+bwd − fwd)"
            lines.append(
                f"| {case['T']} | {case['n']} | {case['C']} | {k} | {times[k]:.3f} | {lo / 1e6:.0f} | {moved / 1e6:.0f} | "
                f"{100 * lo / sec / bw:.0f} % | {100 * moved / sec / bw:.0f} % | {refcol} |"
            )
    return lines


if __name__ == "__main__":
    main()
