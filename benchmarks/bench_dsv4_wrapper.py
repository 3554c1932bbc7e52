"""DeepSeek-V4's mHC wrapper alone: transformers' eager module vs this project's fused kernels, fwd+bwd.

    python benchmarks/bench_dsv4_wrapper.py [--width 7168] [--tokens 4096] [--streams 4] [--rep-ms 1000]
                                            [--out benchmarks/results]

One sublayer site with an identity sublayer (F(u) = u), bf16 streams x [T, n, D], mapping parameters in
fp32 (fn/phi, base/bias, scale/alpha), Sinkhorn 20 rounds; fwd+bwd with a random output gradient,
x's gradient and every parameter's included. Variants:
    transformers eager  transformers' DeepseekV4HyperConnection and the decoder layer's mixing
                        (post ⊗ F(collapsed) + comb^T x, in bf16), as V4 users run it (skipped with the
                        reason printed when transformers lacks deepseek_v4; needs >= 5.23)
    dsv4 reference      residual kind 'dsv4', this project's PyTorch reference ops (eager)
    dsv4 fused          residual kind 'dsv4', the Triton kernels
    mhc fused           residual kind 'mhc', the Triton kernels (the paper's mappings), for comparison
Before timing, each variant's output and dx are compared with 'dsv4 reference' on the same weights
(relative error, reported). Timing: triton.testing.do_bench median (warm-up, L2 flushed); peak memory:
torch.cuda.max_memory_allocated during one fwd+bwd, minus what was allocated before it. Bandwidth: the
fused kernels move about (10n + 6) D bf16 elements per token fwd+bwd (benchmarks/bench_block.py), quoted
against a measured device copy. Writes ``dsv4_wrapper_<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_block import peak_gib  # noqa: E402
from results_io import write_results  # noqa: E402

ITERS = 20


def _weights(n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fn [M, nD], base [M], scale [3] as a trained V4 site might hold them (non-trivial scales)."""
    g = torch.Generator().manual_seed(seed)
    m = (2 + n) * n
    base = torch.randn(m, generator=g)
    base[2 * n :] += 3.0 * torch.eye(n).flatten()
    return {"fn": torch.randn(m, n * d, generator=g) / (n * d) ** 0.5, "base": base,
            "scale": torch.tensor([0.8, 0.6, 1.5])}  # fmt: skip


def transformers_step(n: int, d: int, w: dict):
    """(module, step(x) -> output) for transformers' site, or (None, reason)."""
    try:
        from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection
    except Exception as exc:  # noqa: BLE001  (any failure to import skips the row, with the reason)
        import importlib.metadata as md

        try:
            version = md.version("transformers")
        except md.PackageNotFoundError:
            version = "not installed"
        return None, f"transformers {version}: {type(exc).__name__}: {exc}"
    cfg = DeepseekV4Config(hidden_size=d, hc_mult=n, hc_sinkhorn_iters=ITERS, hc_eps=1e-6, rms_norm_eps=1e-6)
    site = DeepseekV4HyperConnection(cfg)
    with torch.no_grad():
        site.fn.copy_(w["fn"]), site.base.copy_(w["base"]), site.scale.copy_(w["scale"])
    site = site.cuda()

    def step(x):  # x: [T, n, D] -> [1, T, n, D] as the decoder layer holds it
        xb = x.unsqueeze(0)
        post, comb, collapsed = site(xb)
        out = post.to(x.dtype).unsqueeze(-1) * collapsed.unsqueeze(-2) + torch.matmul(
            comb.to(x.dtype).transpose(-1, -2), xb
        )
        return out.squeeze(0)

    return site, step


def project_step(n: int, d: int, w: dict, kind: str, kernels: str):
    from dualpipe_mhc.mhc import HyperConnection

    layer = HyperConnection(torch.nn.Identity(), width=d, streams=n, kind=kind, sinkhorn_iters=ITERS, kernels=kernels)
    with torch.no_grad():
        layer.phi.copy_(w["fn"].t()), layer.bias.copy_(w["base"]), layer.alpha.copy_(w["scale"])
    layer = layer.cuda()  # parameters stay fp32, the streams bf16
    return layer, layer


def _run(step, params, x, grad):
    for p in params + [x]:
        p.grad = None
    out = step(x)
    out.backward(grad)
    return out


def measure(step, params, x, grad, rep_ms: int) -> dict:
    for _ in range(3):
        _run(step, params, x, grad)
    torch.cuda.synchronize()
    ms = do_bench(lambda: step(x).backward(grad), warmup=50, rep=rep_ms, grad_to_none=params + [x],
                  return_mode="median")  # fmt: skip
    return {"ms": ms, "peak_GiB": peak_gib(lambda: step(x).backward(grad), params + [x])}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=7168, help="D (DeepSeek-V4: 7168)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--rep-ms", type=int, default=1000)
    ap.add_argument(
        "--variants", nargs="+", default=["transformers eager", "dsv4 reference", "dsv4 fused", "mhc fused"]
    )
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    n, d, t = args.streams, args.width, args.tokens
    name = torch.cuda.get_device_name()
    a = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 2 / (do_bench(lambda: b.copy_(a), warmup=50, rep=400, return_mode="median") * 1e-3)
    del a, b
    moved = t * (10 * n + 6) * d * 2
    w = _weights(n, d)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(t, n, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(t, n, d, device="cuda", generator=g).to(torch.bfloat16)
    print(f"device {name}; copy {bw / 1e12:.2f} TB/s; T {t}, n {n}, D {d}, bf16 streams", flush=True)

    ref_layer, ref_step = project_step(n, d, w, "dsv4", "reference")
    ref_out = _run(ref_step, list(ref_layer.parameters()), x, grad).detach()
    ref_dx = x.grad.clone()
    del ref_layer, ref_step
    torch.cuda.empty_cache()

    import importlib.metadata as md

    try:
        hf_version = md.version("transformers")
    except md.PackageNotFoundError:
        hf_version = None
    results = {
        "device": name, "copy_bandwidth_Bps": bw, "tokens": t, "streams": n, "width": d, "sinkhorn_iters": ITERS,
        "torch": torch.__version__, "transformers": hf_version,
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "fused_bytes_moved": moved,
        "variants": {}, "skipped": {},
    }  # fmt: skip
    for variant in args.variants:
        if variant == "transformers eager":
            module, step = transformers_step(n, d, w)
            if module is None:
                print(f"  skipping {variant}: {step}", flush=True)
                results["skipped"][variant] = step
                continue
        else:
            kind, impl = variant.split()
            module, step = project_step(n, d, w, kind, "triton" if impl == "fused" else "reference")
        params = list(module.parameters())
        out = _run(step, params, x, grad)
        check = {
            "out_rel_err_vs_dsv4_reference": _rel(out, ref_out), "dx_rel_err_vs_dsv4_reference": _rel(x.grad, ref_dx)
        }
        del out
        row = {**measure(step, params, x, grad, args.rep_ms), **check}
        if "fused" in variant:
            row["GBps"] = moved / (row["ms"] * 1e-3) / 1e9
            row["pct_of_copy"] = 100 * moved / (row["ms"] * 1e-3) / bw
        results["variants"][variant] = row
        print(f"  {variant}: {row}", flush=True)
        del module, step, params
        torch.cuda.empty_cache()

    rows = results["variants"]
    hf = rows.get("transformers eager")
    lines = [
        f"device: {name}; copy bandwidth {bw / 1e12:.2f} TB/s; the mHC wrapper alone (identity sublayer), T {t}, "
        f"n {n}, D {d}, bf16 streams, fp32 mappings, fwd+bwd (median of do_bench); torch {torch.__version__}, "
        f"transformers {hf_version}",
        "",
        "| variant | ms | x faster than transformers | peak GiB | peak / transformers' | % of copy (fused) "
        "| out / dx rel. err. vs dsv4 reference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in rows.items():
        speed = f"{hf['ms'] / r['ms']:.1f}" if hf else ""
        mem = f"{r['peak_GiB'] / hf['peak_GiB']:.2f}" if hf else ""
        pct = f"{r['pct_of_copy']:.0f}" if "pct_of_copy" in r else ""
        errs = f"{r['out_rel_err_vs_dsv4_reference']:.1e} / {r['dx_rel_err_vs_dsv4_reference']:.1e}"
        lines.append(f"| {variant} | {r['ms']:.2f} | {speed} | {r['peak_GiB']:.2f} | {mem} | {pct} | {errs} |")
    for variant, why in results["skipped"].items():
        lines.append(f"| {variant} | skipped: {why} | | | | | |")
    write_results(args.out, "dsv4_wrapper", name, results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
