"""Plain-PyTorch reference of every mHC op (docs/DESIGN.md §4): the twin each fused kernel is tested against.

Dtype-generic: run it in float64 for ground truth. The small mappings, the norm
and Sinkhorn compute in at least float32 whatever the stream dtype (the paper's
mixed-precision rule); the stream outputs come back in the stream dtype.

Shapes (leading batch dims ``...`` are allowed everywhere; kernels flatten them to T):
    x:      [..., n, C]     the n residual streams
    phi:    [n*C, 2n + n*n] the three projections side by side: pre | post | res
    alpha:  [3]             a_pre, a_post, a_res
    bias:   [2n + n*n]      b_pre | b_post | vec(b_res)
    h_pre:  [..., n]
    h_post: [..., n]
    h_res:  [..., n, n]
    y:      [..., C]        the sublayer output F(h_pre @ x)

DeepSeek-V4's variant (``kind="dsv4"``) uses the same shapes: its ``fn [2n+n², n*C]`` is
``phi`` transposed, ``base`` is ``bias`` and ``scale`` is ``alpha`` (see
:mod:`dualpipe_mhc.dsv4_weights` for the renaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

RMS_EPS = 1e-6
HC_EPS = 1e-6  # DeepSeek-V4's hc_eps (its config default and release value): +eps on H_pre, Sinkhorn's guards


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, otherwise the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def rms_project(x: Tensor, phi: Tensor, eps: float = RMS_EPS) -> tuple[Tensor, Tensor]:
    """One pass over vec(x): the projections x' @ phi with RMSNorm's 1/rms applied after the matmul.

    Returns ``(proj [..., m], rstd [...])`` where ``proj = (vec(x) @ phi) * rstd``,
    identical to ``RMSNorm(vec(x)) @ phi`` without a learned gain (fold a gain into phi).
    """
    cd = compute_dtype(x.dtype)
    flat = x.reshape(*x.shape[:-2], -1).to(cd)  # [..., n*C]
    rstd = torch.rsqrt(flat.pow(2).mean(dim=-1) + eps)  # [...]
    proj = (flat @ phi.to(cd)) * rstd.unsqueeze(-1)
    return proj, rstd


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on exp(logits) [..., n, n]: ``iters`` rounds of column- then row-normalisation.

    Rows end exactly stochastic; columns are only as close as ``iters`` allows.
    """
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))  # the shift cancels in the first T_c
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # T_c: each column sums to 1
        m = m / m.sum(dim=-1, keepdim=True)  # T_r: each row sums to 1
    return m


def dsv4_sinkhorn(logits: Tensor, iters: int, eps: float = HC_EPS) -> Tensor:
    """DeepSeek-V4's projection of the comb logits ``[..., n, n]``, returned as H_res = comb^T.

    As transformers' ``DeepseekV4HyperConnection``: comb = softmax over the last axis + eps, then
    comb /= (column sums + eps), then ``iters - 1`` rounds of (row, column) normalisation, each
    denominator + eps. The layer consumes comb transposed (``x_next = comb^T x + ...``); returning
    the transpose lets this mapping share ``post_res`` and the kernels' ``H_res @ x`` convention.
    In H_res's own layout the same steps are: a column softmax (Sinkhorn's first T_c, exact), + eps,
    then T_r and ``iters - 1`` rounds of (T_c, T_r), each eps-guarded; the kernels run it that way.
    """
    if iters < 1:
        raise ValueError(f"dsv4 Sinkhorn needs iters >= 1 (its first round is the softmax), got {iters}")
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb.transpose(-1, -2)


def _sigmoid_eps(t: Tensor) -> Tensor:
    return torch.sigmoid(t) + HC_EPS


def _identity(t: Tensor) -> Tensor:
    return t


def _two_sigmoid(t: Tensor) -> Tensor:
    return 2.0 * torch.sigmoid(t)


def _unconstrained(logits: Tensor, iters: int) -> Tensor:
    return logits


@dataclass(frozen=True)
class Mapping:
    """How the projections become H_pre, H_post, H_res: one entry per residual kind.

    ``logit = alpha * dynamic(proj) + bias``, then ``pre``/``post``/``res`` map the
    logits. A variant such as DeepSeek-V4's is one more entry here, not a rewrite of the layer.
    """

    pre: Callable[[Tensor], Tensor]
    post: Callable[[Tensor], Tensor]
    res: Callable[[Tensor, int], Tensor]  # (logits [..., n, n], sinkhorn_iters) -> H_res
    dynamic: Callable[[Tensor], Tensor] = _identity  # applied to x' @ phi before the alpha scale


MAPPINGS: dict[str, Mapping] = {
    # mHC (paper eq. 7-8): linear dynamic part, then sigmoid / 2 sigmoid / Sinkhorn.
    "mhc": Mapping(pre=torch.sigmoid, post=_two_sigmoid, res=sinkhorn),
    # Hyper-Connections (Zhu et al. 2024; mHC paper eq. 5): H = alpha * tanh(x' @ phi) + b,
    # used as is, so H_res is unconstrained.
    "hc": Mapping(pre=_identity, post=_identity, res=_unconstrained, dynamic=torch.tanh),
    # DeepSeek-V4 (transformers' DeepseekV4HyperConnection): sigmoid + eps, 2 sigmoid, and the
    # eps-guarded Sinkhorn from a softmax start, consumed transposed (see dsv4_sinkhorn).
    "dsv4": Mapping(pre=_sigmoid_eps, post=_two_sigmoid, res=dsv4_sinkhorn),
}


def mappings_from_proj(
    proj: Tensor, alpha: Tensor, bias: Tensor, n: int, sinkhorn_iters: int, kind: str = "mhc"
) -> tuple[Tensor, Tensor, Tensor]:
    """``proj [..., 2n+n²]`` -> (h_pre [..., n], h_post [..., n], h_res [..., n, n])."""
    if kind not in MAPPINGS:
        raise ValueError(f"mapping kind {kind!r} is unknown; use one of {sorted(MAPPINGS)}")
    mapping = MAPPINGS[kind]
    alpha = alpha.to(proj.dtype)
    bias = bias.to(proj.dtype)
    dyn = mapping.dynamic(proj)
    pre_logit = alpha[0] * dyn[..., :n] + bias[:n]
    post_logit = alpha[1] * dyn[..., n : 2 * n] + bias[n : 2 * n]
    res_logit = alpha[2] * dyn[..., 2 * n :] + bias[2 * n :]
    res_logit = res_logit.reshape(*res_logit.shape[:-1], n, n)
    return mapping.pre(pre_logit), mapping.post(post_logit), mapping.res(res_logit, sinkhorn_iters)


def pre_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """u = H_pre @ x: ``[..., n, C]``, ``[..., n]`` -> ``[..., C]`` in x's dtype."""
    cd = compute_dtype(x.dtype)
    return torch.einsum("...i,...ic->...c", h_pre.to(cd), x.to(cd)).to(x.dtype)


def post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, next_phi: Tensor | None = None) -> Tensor:
    """x_next = H_res @ x + H_post^T ⊗ y: ``[..., n, C]`` in x's dtype. ``next_phi`` (the next sublayer's
    phi, which the fused backend fuses with) changes nothing here."""
    cd = compute_dtype(x.dtype)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(cd), x.to(cd))
    return (mixed + h_post.to(cd).unsqueeze(-1) * y.to(cd).unsqueeze(-2)).to(x.dtype)


def mhc_pre(
    x: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    sinkhorn_iters: int,
    kind: str = "mhc",
    eps: float = RMS_EPS,
    return_h_pre: bool = False,
) -> tuple[Tensor, ...]:
    """The whole 'pre' half of an mHC sublayer: x -> (u [..., C], h_post [..., n], h_res [..., n, n]).
    ``return_h_pre``: (u, h_pre, h_post, h_res), h_pre detached (recomputation rebuilds u from it)."""
    n = x.shape[-2]
    proj, _ = rms_project(x, phi, eps)
    h_pre, h_post, h_res = mappings_from_proj(proj, alpha, bias, n, sinkhorn_iters, kind)
    u = pre_aggregate(x, h_pre)
    if return_h_pre:
        return u, h_pre.detach(), h_post, h_res
    return u, h_post, h_res


def hyper_head(x: Tensor, phi: Tensor, scale: Tensor, base: Tensor, eps: float = RMS_EPS) -> Tensor:
    """DeepSeek-V4's stream reduction before the final norm (transformers' ``DeepseekV4HyperHead``).

    ``x [..., n, C]``, ``phi [n*C, n]`` (``hc_fn`` transposed), ``scale [1]``, ``base [n]`` ->
    ``[..., C]`` in x's dtype: weights sigmoid(scale * RMSNorm(vec(x)) @ phi + base) + eps, then
    their weighted sum of the streams.
    """
    proj, _ = rms_project(x, phi, eps)
    weights = torch.sigmoid(proj * scale.to(proj.dtype) + base.to(proj.dtype)) + HC_EPS
    return pre_aggregate(x, weights)


def amax_gain(product: Tensor) -> tuple[Tensor, Tensor]:
    """Amax Gain Magnitude of a mixing-matrix product ``[..., n, n]``: (forward, backward).

    Forward gain is the largest absolute row sum, backward the largest absolute column sum.
    """
    a = product.abs()
    return a.sum(dim=-1).amax(dim=-1), a.sum(dim=-2).amax(dim=-1)
