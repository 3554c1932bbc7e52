"""Fused Triton mHC ops: the ``triton`` backend of :func:`kernels.get_ops`.

Same semantics and shapes as :mod:`kernels.reference` (leading batch dims allowed):
    mhc_pre(x [..., n, C], phi, alpha, bias, sinkhorn_iters, kind) -> (u [..., C], h_post [..., n], h_res [..., n, n])
    post_res(x [..., n, C], y [..., C], h_post, h_res) -> x_next [..., n, C]
    pre_aggregate(x [..., n, C], h_pre [..., n]) -> u [..., C]       (no autograd: recomputation's u)
Streams stay in their dtype (bf16, fp16 or fp32); mappings, norm and Sinkhorn are fp32.

Two autograd Functions launch the kernels of :mod:`kernels.mhc_pre` and
:mod:`kernels.mhc_post`. What they save for backward is x and y (which the
sublayer keeps alive anyway) and per-token mapping tensors of a few dozen floats.

Gradient fusion across the pair: x feeds both ops, so autograd would add the two
gradients of x in a separate pass (read two [T, n, C] tensors, write one), after the
post/res backward had written its dL/dx = H_res^T g. When ``post_res`` is called with the
very ``x`` and ``h_res`` of an ``mhc_pre`` call, its backward writes no dL/dx: it hands
g = dL/dx_next and H_res to the pre op's backward instead (a :class:`_GradLink` attached
to ``h_res``), whose apply kernel forms H_res^T g while writing its own dx. The pre
backward always runs after the post/res backward, because it needs dL/dh_res.

Fusion across sublayers (:mod:`kernels.mhc_chain`): ``post_res(..., next_phi=phi)``, where phi is
the next sublayer's, returns x_next carrying a :class:`_Junction`. The post/res kernel then also
sums the next pre op's projection partials while x_next is in registers, and the next
``mhc_pre(x_next, phi, ...)`` only finishes them. In the backward that pre op runs its reduce and
defers the rest (its dx and dphi) to the junction's backward, which runs after it (it produced
x_next) and does that apply and its own post/res backward in one pass, x_next rebuilt from x and
y. A pass that reaches the junction without the deferred state of the same backward pass (x_next
fed no chained pre op, or that op's node did not run in it) takes the op-local post/res backward.
The chained pre op returns no gradient for x_next itself (the junction forms it): a hook on x_next,
``x_next.retain_grad()`` or ``autograd.grad(..., x_next)`` sees only what else reached it. That is
why the junction is a launch setting (``chain``, off by default) and a chain ends at stage edges.

Launch settings (:mod:`kernels.settings`) are resolved once per call, in the forward, and kept
for the backward: autograd may run the backward on another thread.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import FUSED_KINDS
from .mhc_chain import chain_backward, chain_forward, chain_supported
from .mhc_post import post_res_backward, post_res_forward
from .mhc_pre import _pre_fwd_kernel, pre_backward, pre_backward_reduce, pre_forward
from .mhc_pre import pre_aggregate as _pre_aggregate
from .reference import RMS_EPS
from .settings import LaunchSettings, launch_settings

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LINK_ATTR = "_mhc_grad_link"
_JUNCTION_ATTR = "_mhc_junction"


class _GradLink:
    """dL/dx handed from ``post_res``'s backward to ``mhc_pre``'s backward for the same x.

    Holds x weakly: activation recomputation must stay free to drop it. The first post/res
    backward hands over ``(g, h_res)``, its dL/dx unformed; any later one (x fed to more than one
    post/res op) a dense dx, summed here.
    """

    __slots__ = ("_x", "dx", "res_grad")

    def __init__(self, x: Tensor) -> None:
        self._x = weakref.ref(x)
        self.dx: Tensor | None = None
        self.res_grad: tuple[Tensor, Tensor] | None = None

    def links(self, x: Tensor) -> bool:
        return self._x() is x

    def hold(self, g: Tensor, h_res: Tensor) -> bool:
        """Take ``(g, h_res)`` in place of dL/dx = H_res^T g; False if a pair is held already."""
        if self.res_grad is not None:
            return False
        self.res_grad = (g, h_res)
        return True

    def give(self, dx: Tensor) -> None:
        if self.dx is None:
            self.dx = dx
        else:
            self.dx.add_(dx)

    def take(self) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        taken = (self.dx, self.res_grad)
        self.dx = self.res_grad = None
        return taken


class _Junction:
    """Sublayer l's post/res output x_{l+1} as sublayer l+1's pre op input (see the module docstring).

    Forward: holds the next pre op's projection partials until that op takes them. Backward: holds
    what the pre op deferred (du, h_pre, its reduce's draw and coef, the gradients that reached its
    x through the next post/res op) until the junction's backward takes it. x_{l+1} is held weakly."""

    __slots__ = ("_out", "phi", "_phi_version", "partials", "deferred")

    def __init__(self, phi: Tensor) -> None:
        self.phi, self._phi_version = phi, phi._version
        self._out: weakref.ref | None = None
        self.partials: tuple[Tensor, Tensor] | None = None
        self.deferred: tuple | None = None

    def attach(self, out: Tensor) -> None:
        self._out = weakref.ref(out)
        setattr(out, _JUNCTION_ATTR, self)

    def feeds(self, x: Tensor, phi: Tensor) -> bool:
        """Whether ``mhc_pre(x, phi)`` is the op this junction's partials were summed for."""
        return (
            self.partials is not None and self._out is not None and self._out() is x
            and phi is self.phi and phi._version == self._phi_version
        )  # fmt: skip


class MhcPreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, alpha, bias, iters, eps, link, kind, settings, junction):  # x: [T, n, C]
        partials = None
        if junction is not None:
            partials, junction.partials = junction.partials, None
        u, h_pre, h_post, h_res, proj, rstd = pre_forward(
            x, phi, alpha, bias, iters, eps, kind=kind, settings=settings, partials=partials
        )
        ctx.save_for_backward(x, phi, alpha, bias, h_pre, proj, rstd)
        ctx.iters, ctx.link, ctx.kind, ctx.settings = iters, link, kind, settings
        # the junction's backward finishes this op's backward only if autograd will run it (x came out of it)
        # and the backward junction is on
        ctx.junction = junction if junction is not None and settings.chain_bwd and ctx.needs_input_grad[0] else None
        ctx.mark_non_differentiable(h_pre)  # returned for recomputation only: u carries its gradient
        return u, h_pre, h_post, h_res

    @staticmethod
    def backward(ctx, du, _dh_pre, dh_post, dh_res):
        x, phi, alpha, bias, h_pre, proj, rstd = ctx.saved_tensors
        t, n, c = x.shape
        du = torch.zeros((t, c), device=x.device, dtype=x.dtype) if du is None else du.to(x.dtype).contiguous()
        f32 = dict(device=x.device, dtype=torch.float32)
        dh_post = torch.zeros((t, n), **f32) if dh_post is None else dh_post.float().contiguous()
        dh_res = torch.zeros((t, n, n), **f32) if dh_res is None else dh_res.float().contiguous()
        dx_accum, res_grad = ctx.link.take() if ctx.link is not None else (None, None)
        if ctx.junction is not None:  # the reduce here, dx and dphi in the junction's backward
            dlogit, dalpha_part, draw, coef = pre_backward_reduce(
                x, alpha, bias, proj, rstd, du, dh_post, dh_res, ctx.iters, kind=ctx.kind, settings=ctx.settings
            )
            ctx.junction.deferred = (_pass_id(), (du, h_pre, draw, coef, dx_accum, res_grad))
            dalpha, dbias = dalpha_part.sum(0), dlogit.sum(0)
            return None, None, dalpha.to(alpha.dtype), dbias.to(bias.dtype), None, None, None, None, None, None
        dx, dphi, dalpha, dbias = pre_backward(
            x, phi, alpha, bias, h_pre, proj, rstd, du, dh_post, dh_res, ctx.iters,
            dx_accum=dx_accum, res_grad=res_grad, kind=ctx.kind, settings=ctx.settings,
        )  # fmt: skip
        return dx, dphi.to(phi.dtype), dalpha.to(alpha.dtype), dbias.to(bias.dtype), None, None, None, None, None, None


class PostResFunction(torch.autograd.Function):
    # x keeps its leading dims ([..., n, C], contiguous) so that the output is a fresh tensor of x's
    # shape, not a view of one: a pipeline stage ending here hands it to torch's
    # stage_backward_input, which detaches its outputs in place (views cannot be).
    @staticmethod
    def forward(ctx, x, y, h_post, h_res, link, settings):  # x: [..., n, C], y: [T, C], h_*: fp32, contiguous
        n, c = x.shape[-2:]
        ctx.save_for_backward(x, y, h_post, h_res)
        ctx.link, ctx.settings = link, settings
        out = torch.empty_like(x)
        post_res_forward(x.view(-1, n, c), y, h_post, h_res, settings, out=out.view(-1, n, c))
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, h_post, h_res = ctx.saved_tensors
        return (*_post_res_backward(ctx.link, ctx.settings, g, x, y, h_post, h_res), None, None)


def _post_res_backward(link, settings, g, x, y, h_post, h_res) -> tuple[Tensor | None, ...]:
    """The op-local post/res backward: (dx, dy, dh_post, dh_res), dx handed to x's pre op where it can be."""
    n, c = x.shape[-2:]
    g = g.contiguous().view(-1, n, c)
    handed = link is not None and link.hold(g, h_res)
    dx, dy, dh_post, dh_res = post_res_backward(
        g, x.view(-1, n, c), y, h_post, h_res, write_dx=not handed, settings=settings
    )
    if link is not None:
        if not handed:
            link.give(dx)
        dx = None
    return None if dx is None else dx.view(x.shape), dy, dh_post, dh_res


class ChainPostResFunction(torch.autograd.Function):
    """post_res with the next sublayer's phi: the junction (:mod:`kernels.mhc_chain`)."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res, phi, link, junction, settings):  # phi: the next pre op's
        ctx.set_materialize_grads(False)  # the next pre op hands its gradient over through the junction
        n, c = x.shape[-2:]
        ctx.save_for_backward(x, y, h_post, h_res, phi)
        ctx.link, ctx.junction, ctx.settings = link, junction, settings
        out = torch.empty_like(x)
        _, part, ss_part = chain_forward(x.view(-1, n, c), y, h_post, h_res, phi, settings, out=out.view(-1, n, c))
        junction.partials = (part, ss_part)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, h_post, h_res, phi = ctx.saved_tensors
        n, c = x.shape[-2:]
        deferred, ctx.junction.deferred, ctx.junction.partials = ctx.junction.deferred, None, None
        if deferred is None or deferred[0] != _pass_id():  # nothing handed over in this pass: op-local
            if g is None:
                return None, None, None, None, None, None, None, None
            return (*_post_res_backward(ctx.link, ctx.settings, g, x, y, h_post, h_res), None, None, None, None)
        du, h_pre, draw, coef, dense, res_grad = deferred[1]
        if g is not None:  # x_next also fed something else
            g = g.contiguous().view(-1, n, c)
            dense = g if dense is None else dense.add_(g)
        g_next, dy, dh_post, dh_res, dphi = chain_backward(
            x.view(-1, n, c), y, h_post, h_res, phi, du, h_pre, draw, coef, res_grad, dense, ctx.settings
        )
        dx = _hand_over(ctx.link, x, g_next, h_res) if ctx.needs_input_grad[0] else None
        return dx, dy, dh_post, dh_res, dphi.to(phi.dtype), None, None, None


def _pass_id() -> int:
    """The running backward pass (autograd's graph task): deferred state is taken only within one."""
    return torch._C._current_graph_task_id()


def _hand_over(link: _GradLink | None, x: Tensor, g: Tensor, h_res: Tensor) -> Tensor | None:
    """The post/res op's dL/dx = H_res^T g: handed to x's pre op (None returned), or formed here."""
    if link is not None and link.hold(g, h_res):
        return None
    dx = torch.einsum("tij,tic->tjc", h_res, g.float()).to(x.dtype)
    if link is not None:
        link.give(dx)
        return None
    return dx.view(x.shape)


def _check(x: Tensor, kind: str, op: str) -> None:
    if kind not in FUSED_KINDS:
        raise ValueError(
            f"fused {op} implements residual kinds {FUSED_KINDS}, got {kind!r}; "
            "use the reference backend for it (kernels='reference' or DUALPIPE_MHC_KERNELS=reference)"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fused {op} takes bf16, fp16 or fp32 streams, got {x.dtype}; use kernels.reference for float64 checks"
        )
    if x.device.type != "cuda" and type(_pre_fwd_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"fused {op} needs a CUDA tensor, got one on {x.device}; use the reference backend, "
            "or set TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's CPU interpreter"
        )


def mhc_pre(
    x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, sinkhorn_iters: int, kind: str = "mhc", eps: float = RMS_EPS,
    return_h_pre: bool = False, settings: LaunchSettings | dict | None = None,
) -> tuple[Tensor, ...]:
    """x ``[..., n, C]`` -> (u ``[..., C]``, h_post ``[..., n]`` fp32, h_res ``[..., n, n]`` fp32); see reference.mhc_pre.

    ``kind``: "mhc" or "dsv4" (DeepSeek-V4's mappings; h_res is then comb^T, as the reference returns it).
    ``return_h_pre``: (u, h_pre, h_post, h_res), h_pre ``[..., n]`` fp32 without gradient.
    ``settings``: launch settings or overrides of them (:func:`kernels.settings.launch_settings`)."""
    _check(x, kind, "mhc_pre")
    if kind == "dsv4" and sinkhorn_iters < 1:
        raise ValueError(f"dsv4 Sinkhorn needs sinkhorn_iters >= 1 (its first round is the softmax), got {sinkhorn_iters}")
    *lead, n, c = x.shape
    m = 2 * n + n * n
    if tuple(phi.shape) != (n * c, m) or alpha.numel() != 3 or bias.numel() != m:
        raise ValueError(
            f"for x [..., {n}, {c}] mhc_pre needs phi [{n * c}, {m}], alpha [3], bias [{m}]; "
            f"got phi {list(phi.shape)}, alpha {list(alpha.shape)}, bias {list(bias.shape)}"
        )
    link = _GradLink(x) if torch.is_grad_enabled() and x.requires_grad else None
    junction = getattr(x, _JUNCTION_ATTR, None)
    if junction is not None and not junction.feeds(x, phi):
        junction = None
    u, h_pre, h_post, h_res = MhcPreFunction.apply(
        x.reshape(-1, n, c).contiguous(), phi.contiguous(), alpha.contiguous(), bias.contiguous(),
        int(sinkhorn_iters), float(eps), link, kind, launch_settings(x.device, x.dtype, n, c, settings), junction,
    )  # fmt: skip
    h_res = h_res.reshape(*lead, n, n)
    if link is not None:
        setattr(h_res, _LINK_ATTR, link)
    u, h_post = u.reshape(*lead, c), h_post.reshape(*lead, n)
    if return_h_pre:
        return u, h_pre.reshape(*lead, n), h_post, h_res
    return u, h_post, h_res


def pre_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """u = H_pre @ x, ``[..., C]`` in x's dtype, outside autograd: what recomputation rebuilds u with,
    bit for bit the forward's u for the forward's h_pre."""
    _check(x, "mhc", "pre_aggregate")
    *lead, n, c = x.shape
    u = _pre_aggregate(x.reshape(-1, n, c).contiguous(), h_pre.to(torch.float32).reshape(-1, n).contiguous())
    return u.reshape(*lead, c)


def post_res(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, settings: LaunchSettings | dict | None = None,
    next_phi: Tensor | None = None,
) -> Tensor:
    """x_next = H_res @ x + H_post^T ⊗ y, ``[..., n, C]`` in x's dtype; see reference.post_res.
    ``settings``: launch settings or overrides of them (:func:`kernels.settings.launch_settings`).
    ``next_phi``: the phi of the pre op that x_next feeds next (the next hyper-connected sublayer of a
    chain): fuses this op with that one where :func:`kernels.mhc_chain.chain_supported` says so."""
    _check(x, "mhc", "post_res")  # the same op for every fused kind
    *_, n, c = x.shape
    link = getattr(h_res, _LINK_ATTR, None)
    if link is not None and (not link.links(x) or not torch.is_grad_enabled()):
        link = None
    s = launch_settings(x.device, x.dtype, n, c, settings)
    args = (
        x.contiguous(),
        y.to(x.dtype).reshape(-1, c).contiguous(),
        h_post.to(torch.float32).reshape(-1, n).contiguous(),
        h_res.to(torch.float32).reshape(-1, n, n).contiguous(),
    )  # fmt: skip
    if next_phi is None or not chain_supported(x, s) or tuple(next_phi.shape) != (n * c, 2 * n + n * n):
        return PostResFunction.apply(*args, link, s)
    junction = _Junction(next_phi)
    out = ChainPostResFunction.apply(*args, next_phi.contiguous(), link, junction, s)
    junction.attach(out)
    return out
