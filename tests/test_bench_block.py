"""benchmarks/bench_block.py on the CPU: the variants' baselines, the table's arithmetic, the byte floors,
the stacks it builds (dtypes, what is compiled), the skip without Liger-Kernel, and LigerBlock against a
float64 reference of LigerMHC's mHC (its Triton kernels in the interpreter, fp32; bf16 on a GPU)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_block as bb  # noqa: E402

TINY = dict(width=32, heads=4, mlp="swiglu", hidden=48)


def _row(ms, peak, passes=None):
    r = {"ms": ms, "peak_GiB": peak}
    if passes is not None:
        r["ms_passes"] = passes
    return r


def test_each_variant_is_quoted_against_its_baseline() -> None:
    rows = {
        "plain": _row(20.0, 2.0, [20.0, 21.0, 19.0]),
        "plain compile": _row(18.0, 1.8, [18.0, 18.0, 18.0]),
        "mhc fused": _row(22.0, 2.6, [22.0, 22.0, 22.0]),
        "mhc fused compile": _row(19.8, 2.7, [19.8, 19.8, 19.8]),
        "mhc liger": _row(40.0, 5.0, [40.0, 40.0, 40.0]),
    }
    s = bb.summarise(rows, {"min": 1.0, "chain": 0.8})
    assert s["plain"] == {"baseline": None}
    assert s["plain compile"]["baseline"] == "plain"
    assert s["plain compile"]["overhead"] == pytest.approx(-0.1)
    assert s["mhc fused"]["baseline"] == "plain"
    assert s["mhc fused"]["overhead"] == pytest.approx(0.1)
    assert sorted(s["mhc fused"]["overhead_passes"]) == pytest.approx([22 / 21 - 1, 0.1, 22 / 19 - 1])
    assert s["mhc fused"]["peak_ratio"] == pytest.approx(1.3)
    assert s["mhc fused"]["floors"] == pytest.approx({"min": 0.05, "chain": 0.04})
    assert s["mhc fused compile"]["baseline"] == "plain compile"
    assert s["mhc fused compile"]["overhead"] == pytest.approx(0.1)
    assert s["mhc fused compile"]["peak_ratio"] == pytest.approx(1.5)
    assert s["mhc fused compile"]["floors"]["min"] == pytest.approx(1 / 18)
    assert s["mhc liger"]["overhead"] == pytest.approx(1.0)
    assert s["liger_over_fused"] == pytest.approx(10.0)

    lines = bb.table_rows("a", rows, s)
    assert len(lines) == len(rows) and all(line.count("|") == bb.TABLE_HEAD[0].count("|") for line in lines)
    fused = next(line for line in lines if "| mhc fused |" in line)
    assert "| plain | 22.00 | +10.0 % (passes +4.8 % to +15.8 %) | +5.0 % / +4.0 % | +6.5 % / +5.2 % | 2.60 | 1.30 x |" in fused
    assert "| mhc fused compile | plain compile | 19.80 | +10.0 %" in lines[3]
    notes = bb.target_notes("a", s)
    assert notes == [
        "- shape a: liger overhead / fused overhead 10.0 x (target >= 5 x); mhc fused peak / plain peak 1.30 x "
        "(target <= 1.35 x); mhc fused compile peak / plain compile peak 1.50 x (target <= 1.35 x)"
    ]


def test_a_missing_baseline_leaves_the_overhead_blank() -> None:
    rows = {"mhc fused compile": _row(19.8, 2.7), "mhc fused": _row(22.0, 2.6)}  # single-pass rows, no plain
    s = bb.summarise(rows, {"min": 1.0, "chain": 0.8})
    assert s["mhc fused compile"] == {"baseline": None} and "liger_over_fused" not in s
    assert bb.table_rows("b", rows, s)[0] == "| b | mhc fused compile |  | 19.80 |  |  |  | 2.70 |  |"
    assert bb.target_notes("b", s) == []


def test_byte_floors_per_token_and_sublayer() -> None:
    # n = 4: the minimal op-local design moves 62 C extra bytes, the chain 56 C (issue 15's figure)
    assert bb.floor_bytes("min", 1, 1, 4, 1) == 62
    assert bb.floor_bytes("chain", 1, 1, 4, 1) == 56
    assert bb.floor_bytes("chain", 8, 8192, 4, 2048) == 8 * 8192 * 56 * 2048


def test_unknown_variant_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bb.parse_args(["--variants", "plain", "mhc fast"])
    assert exc.value.code == 2
    assert "mhc fast" in capsys.readouterr().err


def test_liger_missing_skips_the_variant_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.mhc", None)  # import raises ImportError
    variants, liger = bb.runnable_variants(["plain", "mhc liger", "mhc fused"])
    assert variants == ["plain", "mhc fused"] and liger is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("mhc liger: skipped") and bb.LIGER_PIN in out[0]
    assert bb.runnable_variants(["plain"]) == (["plain"], None)  # never imported when not asked for


def test_stacks_keep_their_dtypes_and_compile_what_the_variant_says() -> None:
    model = bb._import_model()
    plain = bb.build_stack(TINY, 2, 4, bb.VARIANTS["plain"], device="cpu")
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    mhc = bb.build_stack(TINY, 2, 4, bb.VARIANTS["mhc fused"], device="cpu")
    fp32 = {name.rsplit(".", 1)[-1] for name, p in mhc.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {"phi", "alpha", "bias"}
    sub = bb.build_stack(TINY, 2, 4, bb.VARIANTS["mhc fused compile"], device="cpu")
    compiled = [m for m in sub.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == 4 and all(isinstance(m, (model.Attention, model.Mlp)) for m in compiled)
    assert isinstance(bb.build_stack(TINY, 1, 4, bb.VARIANTS["mhc compile"], device="cpu"), torch._dynamo.eval_frame.OptimizedModule)


def _fake_liger_mhc():
    """LigerMHC's constructor interface and parameters, without its kernels (the real one, when installed, is
    checked below)."""

    class FakeLigerMHC(torch.nn.Module):
        def __init__(self, layer, *, hc, c, tmax, phi_dtype, allow_fp32):
            super().__init__()
            self.layer, self.hc, self.c, self.tmax = layer, hc, c, tmax
            self.phi = torch.nn.Parameter(torch.zeros(hc * c, hc * hc + 2 * hc, dtype=phi_dtype))
            self.b = torch.nn.Parameter(torch.zeros(hc * hc + 2 * hc))
            self.alpha_pre, self.alpha_post, self.alpha_res = (torch.nn.Parameter(torch.tensor(1.0)) for _ in range(3))

    return FakeLigerMHC


def test_liger_block_wraps_the_same_sublayers_in_liger_dtypes() -> None:
    fake = _fake_liger_mhc()
    model = bb._import_model()
    stack = bb.build_stack(TINY, 2, 4, bb.VARIANTS["mhc liger"], device="cpu", liger_mhc=fake)
    block = stack[0]
    assert isinstance(block.attn.layer, model.Attention) and isinstance(block.mlp.layer, model.Mlp)
    assert (block.attn.hc, block.attn.c, block.attn.tmax) == (4, TINY["width"], 20)
    assert block.attn.phi.dtype == torch.bfloat16 and block.attn.layer.qkv.weight.dtype == torch.bfloat16
    assert {p.dtype for p in (block.mlp.b, block.mlp.alpha_pre, block.mlp.alpha_res)} == {torch.float32}
    # the stack goes to bf16 whole, then the mappings back to fp32 (as build_stack does for 'mhc')
    assert torch.equal(block.mlp.b, model.HyperConnection.initial_bias(4, "mhc").bfloat16().float())
    assert block.mlp.alpha_post.item() == pytest.approx(model.ALPHA_INIT, rel=2**-8)
    assert block.attn.phi.float().std().item() == pytest.approx((4 * TINY["width"]) ** -0.5, rel=0.15)


def liger_reference(hc, x: torch.Tensor) -> torch.Tensor:
    """LigerMHC's sublayer in float64: our reference's projection and pre/post ops, its eps-guarded Sinkhorn."""
    from dualpipe_mhc.kernels import reference as ref

    n, eps = hc.hc, hc.sinkhorn_eps
    x = x.double()
    proj, _ = ref.rms_project(x, hc.phi.double())
    b = hc.b.double()
    pre = torch.sigmoid(hc.alpha_pre.double() * proj[..., :n] + b[:n])
    post = 2 * torch.sigmoid(hc.alpha_post.double() * proj[..., n : 2 * n] + b[n : 2 * n])
    res = (hc.alpha_res.double() * proj[..., 2 * n :] + b[2 * n :]).unflatten(-1, (n, n))
    m = torch.softmax(res, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(hc.tmax - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    y = copy.deepcopy(hc.layer).double()(ref.pre_aggregate(x, pre))
    return ref.post_res(x, y, post, m)


def check_liger_block(device: str, dtype: torch.dtype) -> dict:
    """One LigerBlock (attention and MLP sublayers) against liger_reference, output and input gradient:
    the relative errors."""
    from liger_kernel.transformers.mhc import LigerMHC

    torch.manual_seed(0)
    cfg = types.SimpleNamespace(streams=4, width=32, heads=4, hidden=48, mlp="gelu", sinkhorn_iters=20)
    fp32 = dtype == torch.float32
    block = bb.LigerBlock(cfg, LigerMHC, phi_dtype=torch.float32 if fp32 else torch.bfloat16, allow_fp32=fp32)
    for hc in (block.attn, block.mlp):
        for lin in hc.layer.modules():
            if isinstance(lin, torch.nn.Linear):
                lin.to(device, dtype)
        hc.layer.norm.to(device, dtype)
        hc.to(device)
        with torch.no_grad():  # dynamic parts that matter: larger alphas than the initial 0.01
            for a in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
                a.fill_(0.5)
    x = torch.randn(2, 5, 4, 32, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape, device=device, dtype=dtype)
    block(x).backward(grad)
    xr = x.detach().double().requires_grad_()
    out_ref = liger_reference(block.mlp, liger_reference(block.attn, xr))
    out_ref.backward(grad.double())
    out = block(x.detach())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    return {"out": rel(out, out_ref), "dx": rel(x.grad, xr.grad)}


def test_liger_block_matches_the_reference_interpreted() -> None:
    pytest.importorskip("liger_kernel.transformers.mhc", reason="liger-kernel (the .[bench] extra) not installed")
    code = (
        f"import sys, json, torch; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_bench_block as t; "
        "print(json.dumps(t.check_liger_block('cpu', torch.float32)))"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["out"] < 1e-5 and err["dx"] < 1e-5, err  # a Sinkhorn without its eps guards: 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for Liger's kernels in bf16")
def test_liger_block_matches_the_reference_bf16_gpu() -> None:
    pytest.importorskip("liger_kernel.transformers.mhc", reason="liger-kernel (the .[bench] extra) not installed")
    err = check_liger_block("cuda", torch.bfloat16)
    assert err["out"] < 2e-2 and err["dx"] < 5e-2 and not math.isnan(err["dx"]), err


def test_runs_without_pydantic() -> None:
    """The GPU host may lack pydantic: bench_block stubs dualpipe_mhc.config, its residual kinds read from the source."""
    from dualpipe_mhc.config import RESIDUALS

    assert bb._residual_kinds() == RESIDUALS
    code = (
        "import sys; sys.modules['pydantic'] = None; "  # import pydantic now raises ImportError
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import torch, bench_block as bb; "
        "s = bb.build_stack(dict(width=16, heads=2, mlp='gelu', hidden=32), 1, 4, bb.VARIANTS['mhc eager'], 'cpu'); "
        "x = torch.randn(1, 3, 4, 16, dtype=torch.bfloat16, requires_grad=True); s(x).sum().backward(); "
        "print(hasattr(sys.modules['dualpipe_mhc.config'], 'load_config'), tuple(x.grad.shape))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False (1, 3, 4, 16)"  # the stub, not config.py
