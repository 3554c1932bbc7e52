"""The hyper-connection wrapper: one module around any sublayer F (docs/DESIGN.md §4).

    x_{l+1} = H_res @ x_l + H_post^T * F(H_pre @ x_l)        x: [..., n, C]

Residual kinds:
    plain  x + F(x), one stream (n = 1), no mappings: the baseline.
    hc     Hyper-Connections (Zhu et al. 2024): H = alpha * tanh(x' @ phi) + b for all
           three mappings, used as they are, so H_res is unconstrained.
    mhc    manifold-constrained: H_pre = sigmoid, H_post = 2 sigmoid, H_res Sinkhorn-projected.
    dsv4   DeepSeek-V4's mHC (transformers' DeepseekV4HyperConnection): H_pre = sigmoid + eps,
           H_post = 2 sigmoid, H_res = comb^T with comb an eps-guarded Sinkhorn from a row softmax
           (:func:`kernels.reference.dsv4_sinkhorn`). Its fn/base/scale are phi^T/bias/alpha here;
           :mod:`dualpipe_mhc.dsv4_weights` loads and exports them. The model reduces its streams
           with :class:`HyperHead` instead of a mean.

Initialisation (so that at step 0 the block behaves like a residual block):
    phi ~ N(0, 1/(nC)), so each entry of x' @ phi is about N(0, 1) for the RMS-normed x';
    alpha = 0.01 for all three, so the dynamic parts start near zero and the
    mappings sit near their static biases;
    b_pre gives every stream weight 1/n (mhc, dsv4: sigmoid(b_pre) = 1/n; hc: b_pre = 1/n),
    so F sees the mean of the streams;
    b_post gives every stream weight 1 (mhc: 2 sigmoid(0) = 1; hc: 1);
    b_res: mhc and dsv4 put ``res_init`` (4) on the diagonal and 0 off it, whose Sinkhorn
    matrix is I up to off-diagonals of about 1/(e^res_init + n - 1) (0.017 at
    n = 4; the diagonal is 1 minus n - 1 of those), close to identity while
    keeping gradients for mixing alive (dsv4's softmax start gives about the same matrix);
hc starts from exactly I. DeepSeek-V4 itself initialises base 0 and scale 1 (a uniform comb);
a loaded checkpoint replaces all of this.
For identical streams (the widened embedding) H_res and H_pre then keep them
identical and the block is x + F(x) up to the alpha-scaled dynamic part. At
n = 1, mhc feeds F with x/2 (sigmoid(0)); the pre-normed sublayers here do not
see that scale.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .config import RESIDUALS
from .kernels import get_ops, reference, resolve_backend

ALPHA_INIT = 0.01
RES_INIT = 4.0


class HyperConnection(nn.Module):
    """Wraps ``sublayer`` (F: ``[..., C] -> [..., C]``) with the three mappings over ``streams`` streams."""

    def __init__(
        self,
        sublayer: nn.Module,
        width: int,
        streams: int,
        kind: str = "mhc",
        sinkhorn_iters: int = 20,
        kernels: str = "auto",
        res_init: float = RES_INIT,
    ) -> None:
        super().__init__()
        if kind not in RESIDUALS:
            raise ValueError(f"residual kind {kind!r} is unknown; use one of {', '.join(RESIDUALS)}")
        if kind == "plain" and streams != 1:
            raise ValueError(f"residual kind 'plain' needs streams=1, got {streams}")
        self.sublayer = sublayer
        self.width, self.streams, self.kind = width, streams, kind
        self.sinkhorn_iters = sinkhorn_iters
        self.kernels = kernels
        # Set by a recomputation segment while it records its forward (dualpipe_mhc.recompute):
        # called with (ops, h_pre, h_post, h_res), what it needs to rebuild u and x_next later.
        self.recorder: Callable[..., None] | None = None
        if kind == "plain":
            return
        n = streams
        m = 2 * n + n * n
        self.phi = nn.Parameter(torch.randn(n * width, m) / math.sqrt(n * width))  # [n*C, 2n+n²]
        self.alpha = nn.Parameter(torch.full((3,), ALPHA_INIT))
        self.bias = nn.Parameter(self.initial_bias(n, kind, res_init))  # [2n+n²]

    @staticmethod
    def initial_bias(n: int, kind: str, res_init: float = RES_INIT) -> Tensor:
        if kind in ("mhc", "dsv4"):
            # sigmoid(b) = 1/n; n = 1 has no finite solution, so it takes 0 (weight 1/2).
            b_pre = torch.full((n,), -math.log(n - 1) if n > 1 else 0.0)
            b_post = torch.zeros(n)
            b_res = torch.eye(n) * res_init
        else:
            b_pre = torch.full((n,), 1.0 / n)
            b_post = torch.ones(n)
            b_res = torch.eye(n)
        return torch.cat([b_pre, b_post, b_res.flatten()])

    def forward(self, x: Tensor, then: HyperConnection | None = None) -> Tensor:
        """``x [..., n, C] -> [..., n, C]``. ``then``: the hyper-connection the output feeds next (a chain
        within a stage): the fused backend then fuses this post/res op with its pre op."""
        if self.kind == "plain":
            return x + self.sublayer(x.squeeze(-2)).unsqueeze(-2)
        backend = resolve_backend(self.kernels, x.device.type, self.kind)
        ops = get_ops(backend)
        u, h_pre, h_post, h_res = ops.pre(
            x, self.phi, self.alpha, self.bias, self.sinkhorn_iters, self.kind, return_h_pre=True
        )
        if self.recorder is not None:
            self.recorder(ops, h_pre.detach(), h_post.detach(), h_res.detach())
        y = self.sublayer(u)  # [..., C]
        return ops.post_res(x, y, h_post, h_res, next_phi=self._next_phi(then, x.device.type, backend))

    @staticmethod
    def _next_phi(then: HyperConnection | None, device_type: str, backend: str) -> Tensor | None:
        """The phi of the pre op this sublayer's output feeds next, if it runs on the same backend."""
        if then is None or then.kind == "plain" or resolve_backend(then.kernels, device_type, then.kind) != backend:
            return None
        return then.phi

    def mappings(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h_pre, h_post, h_res) for input ``x``, through the reference: for reports, not the hot path."""
        proj, _ = reference.rms_project(x, self.phi)
        return reference.mappings_from_proj(proj, self.alpha, self.bias, self.streams, self.sinkhorn_iters, self.kind)


class HyperHead(nn.Module):
    """DeepSeek-V4's learned stream reduction before the final norm: ``[..., n, C] -> [..., C]``.

    Weights sigmoid(scale * RMSNorm(vec(x)) @ phi + base) + eps per token, then their weighted sum of
    the streams (transformers' ``DeepseekV4HyperHead``; its ``hc_fn`` is ``phi`` transposed,
    ``hc_base`` is ``base``, ``hc_scale`` is ``scale``). Initialised to weight every stream 1/n,
    the mean the other kinds reduce with, up to the scale-0.01 dynamic part.
    """

    def __init__(self, width: int, streams: int) -> None:
        super().__init__()
        n = streams
        self.width, self.streams = width, n
        self.phi = nn.Parameter(torch.randn(n * width, n) / math.sqrt(n * width))  # [n*C, n]
        self.scale = nn.Parameter(torch.full((1,), ALPHA_INIT))
        self.base = nn.Parameter(self.initial_base(n))

    @staticmethod
    def initial_base(n: int) -> Tensor:
        """sigmoid(base) = 1/n: every stream weighted as the mean (n = 1 takes 0, weight 1/2)."""
        return torch.full((n,), -math.log(n - 1) if n > 1 else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return reference.hyper_head(x, self.phi, self.scale, self.base)
