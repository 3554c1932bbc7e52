"""The float64 reference of the mHC ops (docs/DESIGN.md §4): Sinkhorn accuracy, gradients, ranges, identity."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from dualpipe_mhc.kernels import reference as ref
from dualpipe_mhc.mhc import HyperConnection

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(shape, scale: float, seed: int = 0) -> torch.Tensor:
    return (2 * torch.rand(shape, generator=_gen(seed), dtype=F64) - 1) * scale


def _column_error(m: torch.Tensor) -> torch.Tensor:
    """Per matrix: max |column sum - 1|."""
    return (m.sum(-2) - 1).abs().amax(-1)


def test_sinkhorn_small_logits_is_doubly_stochastic():
    m = ref.sinkhorn(_uniform((1024, 4, 4), 1.0), iters=20)
    assert (m >= 0).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-12  # rows: T_r runs last, exact up to rounding
    assert _column_error(m).max() < 1e-6


def test_sinkhorn_column_error_for_wide_logits_is_reported_and_shrinks(capsys):
    """Wide logits leave a column error after 20 rounds; it is what the backward Amax gain measures."""
    iters = (5, 10, 20, 40, 80)
    rows = []
    for scale in (3.0, 10.0):
        logits = _uniform((1024, 4, 4), scale, seed=1)
        mean_err = [_column_error(ref.sinkhorn(logits, t)).mean().item() for t in iters]
        max_err = [_column_error(ref.sinkhorn(logits, t)).max().item() for t in iters]
        rows.append((scale, mean_err, max_err))
        assert all(b < a for a, b in zip(mean_err, mean_err[1:])), f"±{scale}: {mean_err}"
        assert max_err[-1] < max_err[0]
        for t in iters:  # rows stay exact whatever the column error
            assert (ref.sinkhorn(logits, t).sum(-1) - 1).abs().max() < 1e-12
    at_10_t20 = rows[1][1][iters.index(20)]
    assert 3e-3 < at_10_t20 < 5e-2, at_10_t20  # about 1e-2 at ±10 and t = 20
    with capsys.disabled():
        print("\nSinkhorn column error |col sum - 1| (per-matrix max; mean / max over 1024 4x4 matrices)")
        for scale, mean_err, max_err in rows:
            cells = "  ".join(f"t={t}: {m:.1e}/{x:.1e}" for t, m, x in zip(iters, mean_err, max_err))
            print(f"  logits ±{scale:g}: {cells}")


def test_sinkhorn_is_invariant_to_a_logit_shift():
    logits = _uniform((8, 4, 4), 3.0)
    torch.testing.assert_close(ref.sinkhorn(logits + 50.0, 20), ref.sinkhorn(logits, 20), rtol=1e-12, atol=1e-14)


def test_rms_project_equals_rmsnorm_then_matmul():
    x = torch.randn(5, 3, 4, 8, generator=_gen(), dtype=F64)
    phi = torch.randn(32, 24, generator=_gen(1), dtype=F64)
    proj, rstd = ref.rms_project(x, phi)
    flat = x.reshape(5, 3, 32)
    normed = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + ref.RMS_EPS)
    torch.testing.assert_close(proj, normed @ phi, rtol=1e-12, atol=1e-12)
    assert rstd.shape == (5, 3)


def _mapping_inputs(n: int = 4, seed: int = 0):
    g = _gen(seed)
    proj = torch.randn(6, 2 * n + n * n, generator=g, dtype=F64) * 5
    alpha = torch.rand(3, generator=g, dtype=F64) + 0.5
    bias = torch.randn(2 * n + n * n, generator=g, dtype=F64)
    return proj, alpha, bias


def test_mhc_mapping_ranges():
    n = 4
    proj, alpha, bias = _mapping_inputs(n)
    h_pre, h_post, h_res = ref.mappings_from_proj(proj, alpha, bias, n, 20, "mhc")
    assert ((h_pre > 0) & (h_pre < 1)).all()
    assert ((h_post > 0) & (h_post < 2)).all()
    assert (h_res >= 0).all() and (h_res.sum(-1) - 1).abs().max() < 1e-12
    assert h_pre.shape == (6, n) and h_post.shape == (6, n) and h_res.shape == (6, n, n)


def test_hc_mapping_is_tanh_dynamic_plus_static_and_unconstrained():
    n = 4
    proj, alpha, bias = _mapping_inputs(n)
    h_pre, h_post, h_res = ref.mappings_from_proj(proj, alpha, bias, n, 20, "hc")
    dyn = torch.tanh(proj)
    torch.testing.assert_close(h_pre, alpha[0] * dyn[:, :n] + bias[:n])
    torch.testing.assert_close(h_post, alpha[1] * dyn[:, n : 2 * n] + bias[n : 2 * n])
    torch.testing.assert_close(h_res, (alpha[2] * dyn[:, 2 * n :] + bias[2 * n :]).reshape(6, n, n))
    assert (h_res < 0).any()  # nothing keeps HC's H_res on the Birkhoff polytope


def test_unknown_mapping_kind_is_a_one_line_error():
    proj, alpha, bias = _mapping_inputs()
    with pytest.raises(ValueError, match=r"mapping kind 'dense' is unknown; use one of \['dsv4', 'hc', 'mhc'\]"):
        ref.mappings_from_proj(proj, alpha, bias, 4, 20, "dense")


def _req(*tensors):
    return tuple(t.clone().requires_grad_(True) for t in tensors)


@pytest.mark.parametrize("kind", ["mhc", "hc", "dsv4"])
def test_gradcheck_mappings_and_pre(kind):
    n, c = 3, 5  # n and C not powers of two on purpose
    g = _gen(2)
    x = torch.randn(2, n, c, generator=g, dtype=F64)
    phi = torch.randn(n * c, 2 * n + n * n, generator=g, dtype=F64) / 3
    alpha = torch.tensor([0.7, 0.9, 1.1], dtype=F64)
    bias = torch.randn(2 * n + n * n, generator=g, dtype=F64)
    proj = torch.randn(2, 2 * n + n * n, generator=g, dtype=F64)
    assert gradcheck(lambda p, a, b: ref.mappings_from_proj(p, a, b, n, 20, kind), _req(proj, alpha, bias))
    assert gradcheck(lambda *t: ref.mhc_pre(*t, sinkhorn_iters=20, kind=kind), _req(x, phi, alpha, bias))


def test_gradcheck_every_other_op():
    g = _gen(3)
    n, c = 4, 7
    x = torch.randn(3, n, c, generator=g, dtype=F64)
    phi = torch.randn(n * c, 6, generator=g, dtype=F64)
    y = torch.randn(3, c, generator=g, dtype=F64)
    h_pre = torch.rand(3, n, generator=g, dtype=F64)
    h_post = torch.rand(3, n, generator=g, dtype=F64) * 2
    h_res = torch.rand(3, n, n, generator=g, dtype=F64)
    logits = _uniform((3, n, n), 3.0, seed=4)
    product = torch.randn(3, n, n, generator=g, dtype=F64)
    assert gradcheck(ref.rms_project, _req(x, phi))
    assert gradcheck(lambda t: ref.sinkhorn(t, 20), _req(logits))
    assert gradcheck(lambda t: ref.sinkhorn(t, 1), _req(logits))
    assert gradcheck(ref.pre_aggregate, _req(x, h_pre))
    assert gradcheck(ref.post_res, _req(x, y, h_post, h_res))
    assert gradcheck(ref.amax_gain, _req(product))
    assert gradcheck(lambda t: ref.dsv4_sinkhorn(t, 20), _req(logits))
    assert gradcheck(lambda t: ref.dsv4_sinkhorn(t, 1), _req(logits))
    head_phi = torch.randn(n * c, n, generator=g, dtype=F64)
    scale, base = torch.tensor([0.8], dtype=F64), torch.randn(n, generator=g, dtype=F64)
    assert gradcheck(ref.hyper_head, _req(x, head_phi, scale, base))


def test_dsv4_mapping_matches_its_definition_and_is_transposed():
    """dsv4: sigmoid + eps, 2 sigmoid, and H_res = comb^T with comb from the eps-guarded Sinkhorn,
    written out here step by step in H_res's own layout (the kernels' order: column softmax, + eps,
    T_r, then (T_c, T_r) rounds) to pin the transpose."""
    n, eps = 4, ref.HC_EPS
    proj, alpha, bias = _mapping_inputs(n)
    h_pre, h_post, h_res = ref.mappings_from_proj(proj, alpha, bias, n, 20, "dsv4")
    torch.testing.assert_close(h_pre, torch.sigmoid(alpha[0] * proj[:, :n] + bias[:n]) + eps, rtol=0, atol=1e-15)
    torch.testing.assert_close(h_post, 2 * torch.sigmoid(alpha[1] * proj[:, n : 2 * n] + bias[n : 2 * n]))
    logits_t = (alpha[2] * proj[:, 2 * n :] + bias[2 * n :]).reshape(6, n, n).transpose(-1, -2)
    m = torch.softmax(logits_t, dim=-2) + eps
    m = m / (m.sum(-1, keepdim=True) + eps)
    for _ in range(19):
        m = m / (m.sum(-2, keepdim=True) + eps)
        m = m / (m.sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(h_res, m, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(h_res, h_res.transpose(-1, -2), atol=1e-3)  # the transpose is observable
    # eps-guarded: rows sum to just under 1 (by about n * eps), columns within Sinkhorn's error
    row_err = (h_res.sum(-1) - 1).abs().max().item()
    assert 0 < row_err < 2 * n * eps, row_err


def test_dsv4_sinkhorn_needs_one_round():
    with pytest.raises(ValueError, match="dsv4 Sinkhorn needs iters >= 1"):
        ref.dsv4_sinkhorn(torch.zeros(2, 4, 4), 0)


def test_mixed_precision_streams_keep_their_dtype_mappings_do_not():
    x = torch.randn(4, 4, 8, dtype=torch.bfloat16)
    phi = torch.randn(32, 24) / 6
    u, h_post, h_res = ref.mhc_pre(x, phi, torch.full((3,), 0.1), torch.zeros(24), 20)
    assert u.dtype == torch.bfloat16 and h_post.dtype == torch.float32 and h_res.dtype == torch.float32
    assert ref.post_res(x, u, h_post, h_res).dtype == torch.bfloat16


def test_identity_property_post_res():
    """H_res = I and F = 0: the update returns its input bit for bit."""
    x = torch.randn(2, 5, 4, 9, generator=_gen(), dtype=F64)
    out = ref.post_res(x, torch.zeros(2, 5, 9, dtype=F64), torch.rand(2, 5, 4, dtype=F64), torch.eye(4, dtype=F64))
    assert torch.equal(out, x)


class _Zero(torch.nn.Module):
    def forward(self, u):
        return torch.zeros_like(u)


@pytest.mark.parametrize("kind, streams", [("plain", 1), ("hc", 4), ("mhc", 4), ("mhc", 3)])  # dsv4: its eps keeps H_res off I
def test_identity_property_through_the_layer(kind, streams):
    """The whole wrapped block with H_res = I exactly and F = 0 returns its input exactly.

    hc: alpha = 0 and b_res = I give I. mhc: alpha = 0 and b_res = 1000 I give exp(-1000) = 0
    off the diagonal in float64, so the Sinkhorn matrix is exactly I too.
    """
    layer = HyperConnection(_Zero(), width=6, streams=streams, kind=kind, kernels="reference").double()
    if kind != "plain":
        with torch.no_grad():
            layer.alpha.zero_()
            n = streams
            layer.bias[2 * n :] = (torch.eye(n, dtype=F64) * (1000.0 if kind == "mhc" else 1.0)).flatten()
        _, _, h_res = layer.mappings(torch.randn(3, streams, 6, dtype=F64))
        assert torch.equal(h_res, torch.eye(streams, dtype=F64).expand_as(h_res))
    x = torch.randn(2, 3, streams, 6, generator=_gen(), dtype=F64)
    assert torch.equal(layer(x), x)


def test_amax_gain_of_doubly_stochastic_and_permutation_is_one():
    perm = torch.eye(4, dtype=F64)[[2, 0, 3, 1]]
    uniform = torch.full((4, 4), 0.25, dtype=F64)
    for m in (perm, uniform, perm @ uniform):
        fwd, bwd = ref.amax_gain(m)
        assert abs(fwd.item() - 1) < 1e-15 and abs(bwd.item() - 1) < 1e-15
    fwd, bwd = ref.amax_gain(torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=F64))
    assert (fwd.item(), bwd.item()) == (3.0, 2.0)
