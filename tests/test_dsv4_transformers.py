"""residual = "dsv4" against transformers' own DeepSeek-V4 modules, forward and every gradient.

transformers (the ``hf`` extra, 5.23.0) provides ``DeepseekV4HyperConnection`` (pre, post, comb and
the collapsed input of one sublayer site) and ``DeepseekV4HyperHead``; the layer formula around the
former is the decoder layer's: ``out = post ⊗ F(collapsed) + comb^T @ X``, in the stream dtype.

float64: transformers casts its inputs and weights to float32 (``.float()``); the float64 checks run
its code with ``Tensor.float`` made a no-op, so both sides compute the same float64 function and
agree to 1e-10. bf16 streams: transformers as shipped (fp32 mappings, bf16 mixing) against this
project's reference (fp32 mappings, fp32 mixing rounded once to bf16); tolerances below.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from dualpipe_mhc.mhc import HyperConnection, HyperHead

hf = pytest.importorskip(
    "transformers.models.deepseek_v4.modeling_deepseek_v4",
    reason="transformers with DeepSeek-V4 (>= 5.23) is not installed: pip install -e '.[hf]'",
)
hf_config = pytest.importorskip("transformers.models.deepseek_v4.configuration_deepseek_v4")

F64, BF16 = torch.float64, torch.bfloat16
N, D, ITERS = 4, 24, 20  # D not a power of two
# bf16 streams: outputs and dx are bf16 (transformers also rounds post and comb to bf16 before mixing),
# parameter gradients sums over tokens of bf16 products, so elementwise ulp-level checks are noise near
# zero; bf16 compares the relative error of the whole tensor, ||ours - theirs|| / ||theirs||.
BF16_REL = 1e-2  # measured: <= 4e-3 (out, dx, dfn, dbase, dscale, dF), <= 4e-6 (the head)


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if dtype == F64:
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
        return
    rel = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
    assert rel < BF16_REL, f"{name}: relative error {rel:.2e} over {BF16_REL:.0e}"


def _config():
    return hf_config.DeepseekV4Config(hidden_size=D, hc_mult=N, hc_sinkhorn_iters=ITERS, hc_eps=1e-6, rms_norm_eps=1e-6)


@contextlib.contextmanager
def _float_is_identity():
    """Run transformers' code in the dtype it is given: its ``.float()`` casts become no-ops."""
    with mock.patch.object(torch.Tensor, "float", lambda self: self):
        yield


class _Sublayer(torch.nn.Module):
    """F(u) = tanh(u W): nonlinear, so dL/du depends on u and every mapping's gradient is exercised."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(u @ self.weight.to(u.dtype))


def _pair(seed: int):
    """transformers' site and ours with the same random weights (scales far from 0 so the mappings matter)."""
    g = torch.Generator().manual_seed(seed)
    theirs = hf.DeepseekV4HyperConnection(_config())
    m = (2 + N) * N
    with torch.no_grad():
        theirs.fn.copy_(torch.randn(m, N * D, generator=g) * 0.5)
        theirs.base.copy_(torch.randn(m, generator=g))
        theirs.scale.copy_(torch.tensor([0.8, 1.3, 2.0]))
    w = torch.randn(D, D, generator=g) / D**0.5
    ours = HyperConnection(_Sublayer(w), width=D, streams=N, kind="dsv4", sinkhorn_iters=ITERS, kernels="reference")
    with torch.no_grad():
        ours.phi.copy_(theirs.fn.t())
        ours.alpha.copy_(theirs.scale)
        ours.bias.copy_(theirs.base)
    return theirs, _Sublayer(w), ours


def _their_layer(site, sublayer, x):
    """transformers' DeepseekV4DecoderLayer around one site, with ``sublayer`` for attention / MoE."""
    post, comb, collapsed = site(x)
    out = sublayer(collapsed)
    return post.to(x.dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(x.dtype).transpose(-1, -2), x)


def _grads(module_params, x, out, probe):
    (out.float() * probe).sum().backward()
    return [x.grad] + [p.grad for p in module_params]


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_hyper_connection_matches_transformers_forward_and_every_gradient(dtype):
    site, their_sub, ours = _pair(seed=0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 5, N, D, generator=g)
    probe = torch.randn(2, 5, N, D, generator=g)
    ctx = _float_is_identity() if dtype == F64 else contextlib.nullcontext()
    if dtype == F64:
        site.double(), their_sub.double(), ours.double()
    x_t = x0.to(dtype).requires_grad_(True)
    x_o = x0.to(dtype).requires_grad_(True)
    with ctx:
        out_t = _their_layer(site, their_sub, x_t)
        grads_t = _grads([site.fn, site.base, site.scale, their_sub.weight], x_t, out_t, probe.to(out_t.dtype))
    out_o = ours(x_o)
    grads_o = _grads([ours.phi, ours.bias, ours.alpha, ours.sublayer.weight], x_o, out_o, probe.to(out_o.dtype))
    grads_o[1] = grads_o[1].t()  # dphi -> dfn
    assert out_o.dtype == dtype
    _close(out_o, out_t, dtype, "out")
    for name, a, b in zip(["x", "fn", "base", "scale", "sublayer"], grads_o, grads_t):
        assert b.abs().max() > 1e-3, f"d{name} is ~0: the comparison would prove nothing"
        _close(a.to(b.dtype), b, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_hyper_head_matches_transformers_forward_and_every_gradient(dtype):
    g = torch.Generator().manual_seed(2)
    theirs = hf.DeepseekV4HyperHead(_config())
    with torch.no_grad():
        theirs.hc_fn.copy_(torch.randn(N, N * D, generator=g) * 0.5)
        theirs.hc_base.copy_(torch.randn(N, generator=g))
        theirs.hc_scale.fill_(1.7)
    ours = HyperHead(D, N)
    with torch.no_grad():
        ours.phi.copy_(theirs.hc_fn.t())
        ours.base.copy_(theirs.hc_base)
        ours.scale.copy_(theirs.hc_scale)
    x0 = torch.randn(3, 4, N, D, generator=g)
    probe = torch.randn(3, 4, D, generator=g)
    ctx = _float_is_identity() if dtype == F64 else contextlib.nullcontext()
    if dtype == F64:
        theirs.double(), ours.double()
    x_t = x0.to(dtype).requires_grad_(True)
    x_o = x0.to(dtype).requires_grad_(True)
    with ctx:
        out_t = theirs(x_t)
        grads_t = _grads([theirs.hc_fn, theirs.hc_base, theirs.hc_scale], x_t, out_t, probe)
    out_o = ours(x_o)
    grads_o = _grads([ours.phi, ours.base, ours.scale], x_o, out_o, probe)
    grads_o[1] = grads_o[1].t()
    assert out_o.dtype == dtype
    _close(out_o, out_t, dtype, "out")
    for name, a, b in zip(["x", "hc_fn", "hc_base", "hc_scale"], grads_o, grads_t):
        assert b.abs().max() > 1e-3, f"d{name} is ~0: the comparison would prove nothing"
        _close(a.to(b.dtype), b, dtype, f"d{name}")


def test_the_float64_patch_really_runs_transformers_in_float64():
    """Guard for the float64 checks: without the patch transformers rounds to fp32 (error ~1e-7)."""
    site, their_sub, ours = _pair(seed=3)
    site.double(), their_sub.double(), ours.double()
    x = torch.randn(2, 3, N, D, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = ours(x)
        with _float_is_identity():
            patched = _their_layer(site, their_sub, x)
        shipped = _their_layer(site, their_sub, x)
    assert (patched - exact).abs().max() < 1e-12
    assert (shipped - exact).abs().max() > 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("t, d", [(1, 1000), (1537, 1000), (512, 7168)])
def test_fused_layer_matches_transformers_gpu(t, d):
    """The Triton kernels (bf16 streams) against transformers' own site on CUDA, every gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dualpipe_mhc.kernels import fused  # noqa: F401  (imports triton; the test is about the kernels)

    g = torch.Generator().manual_seed(t + d)
    cfg = hf_config.DeepseekV4Config(hidden_size=d, hc_mult=N, hc_sinkhorn_iters=ITERS, hc_eps=1e-6, rms_norm_eps=1e-6)
    site = hf.DeepseekV4HyperConnection(cfg)
    m = (2 + N) * N
    with torch.no_grad():
        site.fn.copy_(torch.randn(m, N * d, generator=g) / (N * d) ** 0.5)
        site.base.copy_(torch.randn(m, generator=g))
        site.scale.copy_(torch.tensor([0.8, 1.3, 2.0]))
    w = torch.randn(d, d, generator=g) / d**0.5
    their_sub = _Sublayer(w).cuda()
    ours = HyperConnection(_Sublayer(w), width=d, streams=N, kind="dsv4", sinkhorn_iters=ITERS, kernels="triton")
    with torch.no_grad():
        ours.phi.copy_(site.fn.t()), ours.alpha.copy_(site.scale), ours.bias.copy_(site.base)
    site, ours = site.cuda(), ours.cuda()
    x0 = torch.randn(1, t, N, d, generator=g).cuda().to(BF16)
    probe = torch.randn(1, t, N, d, generator=g).cuda()
    x_t, x_o = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    out_t = _their_layer(site, their_sub, x_t)
    grads_t = _grads([site.fn, site.base, site.scale, their_sub.weight], x_t, out_t, probe)
    out_o = ours(x_o)
    grads_o = _grads([ours.phi, ours.bias, ours.alpha, ours.sublayer.weight], x_o, out_o, probe)
    grads_o[1] = grads_o[1].t()
    _close(out_o, out_t, BF16, "out")
    for name, a, b in zip(["x", "fn", "base", "scale", "sublayer"], grads_o, grads_t):
        _close(a.to(b.dtype), b, BF16, f"d{name}")
