"""The cross-sublayer junction: sublayer l's post/res op fused with sublayer l+1's pre op.

In a chain of hyper-connected sublayers, x_{l+1} = H_res_l x_l + H_post_l^T y_l is written by
sublayer l and at once read by sublayer l+1's pre op, twice in each direction. The junction
kernels do sublayer l+1's share of that work inside sublayer l's post/res pass, where x_{l+1}
is in registers anyway (docs/DESIGN.md §4, benchmarks/NOTES_kernels.md "chain"):

    _chain_fwd_kernel  post/res_l forward (x_l, y_l -> x_{l+1}) and, on the rounded x_{l+1} tile, the
                       partial sums of pre_{l+1}'s projection (sum of squares, x_{l+1} @ phi_{l+1}
                       as bf16 dots against phi's on-chip hi + lo halves) per channel split. The
                       pre op then only finishes (1/rms, mappings, Sinkhorn) and aggregates u.
    _chain_bwd_kernel  pre_{l+1}'s apply and post/res_l's backward in one pass: x_{l+1} rebuilt in
                       registers from x_l and y_l (never read), g_l = dL/dx_{l+1} = H_pre du + draw
                       phi^T + coef x_{l+1} + H_res_{l+1}^T g_{l+1} (+ a dense gradient), written
                       once; dphi_{l+1} = x_{l+1}^T draw; then from g_l: dy_l, and dH_post_l, dH_res_l
                       partial sums per channel block (their reduction runs over channels, dphi's
                       over tokens: one of them must go through partials: n + n^2 floats a token per
                       channel block, 20 C / block_c at n = 4, written and summed again).

Per token and sublayer (n streams, C channels), the stream elements moved fall from (10n + 6) C
to (7n + 6) C: the forward no longer reads x_{l+1} for the projection, the backward neither reads
x_{l+1} in the apply nor writes and re-reads pre_{l+1}'s dx. pre_{l+1}'s reduce (dH_pre, the
Sinkhorn backward) still reads x_{l+1} and du once.

Reference twins: :func:`kernels.reference.post_res`, :func:`kernels.reference.rms_project`, and the
backward of their composition (the tests compare every gradient against float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_pre_common import (
    MAX_PARTIALS, _dot_bf16, _interpreted, _num_sms, _pow2, fit_loop_stages, launch_fitted, resident_programs,
    wave_splits,
)  # fmt: skip
from .settings import LaunchSettings


@triton.jit
def _load_streams(ptr, rows64, cs, tmask, C, n: tl.constexpr):
    """The n <= 4 streams of a [T, n, C] tensor for one [BT, BC] tile, as loaded (unused slots repeat stream 0)."""
    base = ptr + rows64[:, None] * (n * C) + cs[None, :]
    s0 = tl.load(base, mask=tmask, other=0.0)
    s1 = s0
    s2 = s0
    s3 = s0
    if n > 1:
        s1 = tl.load(base + C, mask=tmask, other=0.0)
    if n > 2:
        s2 = tl.load(base + 2 * C, mask=tmask, other=0.0)
    if n > 3:
        s3 = tl.load(base + 3 * C, mask=tmask, other=0.0)
    return s0, s1, s2, s3


@triton.jit
def _mix(s0, s1, s2, s3, acc, w_ptr, rows64, row_mask, stride_j: tl.constexpr, n: tl.constexpr):
    """acc + sum_j w[:, j] s_j over the n streams, j in order; w_ptr points at w[:, 0] of each row (fp32),
    its entry j at + j * stride_j."""
    acc += tl.load(w_ptr, mask=row_mask, other=0.0)[:, None] * s0.to(tl.float32)
    if n > 1:
        acc += tl.load(w_ptr + stride_j, mask=row_mask, other=0.0)[:, None] * s1.to(tl.float32)
    if n > 2:
        acc += tl.load(w_ptr + 2 * stride_j, mask=row_mask, other=0.0)[:, None] * s2.to(tl.float32)
    if n > 3:
        acc += tl.load(w_ptr + 3 * stride_j, mask=row_mask, other=0.0)[:, None] * s3.to(tl.float32)
    return acc


@triton.jit
def _stream_next(x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, rows64, row_mask, i: tl.constexpr, n: tl.constexpr):
    """Stream i of x_{l+1} = H_res x + H_post^T y for one [BT, BC] tile, fp32: the arithmetic of
    _post_res_fwd_kernel element for element (H_post_i y, then + H_res[i, j] x_j for j in order), so both
    give the same bits (recomputation rebuilds x_{l+1} with that kernel)."""
    hp = tl.load(h_post_ptr + rows64 * n + i, mask=row_mask, other=0.0)
    return _mix(x0, x1, x2, x3, hp[:, None] * y, h_res_ptr + rows64 * (n * n) + i * n, rows64, row_mask, 1, n)


@triton.jit
def _fwd_stream(
    xn, out_ptr, phi_ptr, acc_p, ss, rows64, row_mask, cs, cmask, C, cols, col_mask,
    i: tl.constexpr, n: tl.constexpr, M: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Stream i of one chunk: x_{l+1} stored, and its share of the next projection (rows i C + cs of phi)."""
    xn = xn.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * (n * C) + i * C + cs[None, :], xn, mask=row_mask[:, None] & cmask[None, :])
    xf = xn.to(tl.float32)
    ss += tl.sum(xf * xf, axis=1)
    ph = tl.load(
        phi_ptr + (i * C + cs)[:, None] * M + cols[None, :], mask=cmask[:, None] & col_mask[None, :], other=0.0
    )
    hi = ph.to(tl.bfloat16)
    lo = (ph - hi.to(tl.float32)).to(tl.bfloat16)
    acc_p = _dot_bf16(xn, hi, acc_p, UPCAST)
    acc_p = _dot_bf16(xn, lo, acc_p, UPCAST)
    return acc_p, ss


@triton.jit
def _chain_fwd_kernel(
    x_ptr, y_ptr, h_post_ptr, h_res_ptr, out_ptr, phi_ptr, part_ptr, ss_part_ptr,
    T, C, CS,
    n: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    UPCAST: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    # Every tile is a 2-D [BT, BC] slice of one stream (n <= 4 streams, unrolled, each loaded once a chunk):
    # no 3-D broadcasts and no reshapes between the elementwise and the dot layouts (a first version built
    # [BT, n, BC] tiles and reshaped them to [BT, n*BC] for the dots: 19 % of copy on an H200).
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    split = tl.program_id(1)
    c_start = split * CS
    c_end = tl.minimum(c_start + CS, C)
    cols = tl.arange(0, MP)
    col_mask = cols < M
    acc_p = tl.zeros((BT, MP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for c0 in tl.range(c_start, c_end, BC, num_stages=LOOP_STAGES):
        cs = c0 + tl.arange(0, BC)
        cmask = cs < c_end
        tmask = row_mask[:, None] & cmask[None, :]
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=tmask, other=0.0).to(tl.float32)
        x0, x1, x2, x3 = _load_streams(x_ptr, rows64, cs, tmask, C, n)
        for i in tl.static_range(n):
            xn = _stream_next(x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, rows64, row_mask, i, n)
            acc_p, ss = _fwd_stream(
                xn, out_ptr, phi_ptr, acc_p, ss, rows64, row_mask, cs, cmask, C, cols, col_mask, i, n, M, UPCAST
            )
    part_off = split.to(tl.int64) * T * MP + rows64[:, None] * MP + cols[None, :]
    tl.store(part_ptr + part_off, acc_p, mask=row_mask[:, None])
    tl.store(ss_part_ptr + split.to(tl.int64) * T + rows64, ss, mask=row_mask)


@triton.jit
def _bwd_stream(
    x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, du, h_pre_ptr, draw, coef, phi_t, g0, g1, g2, g3, h_res_next_ptr,
    dense_ptr, gout_ptr, dphi, dy, dh_post, dh_res, rows64, row_mask, cs, tmask, C, si, si3a, si3b,
    i: tl.constexpr, n: tl.constexpr, RES_GRAD: tl.constexpr, DENSE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Stream i of one [BT, BC] token tile of the junction's backward; returns the updated accumulators."""
    xn = _stream_next(x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, rows64, row_mask, i, n).to(gout_ptr.dtype.element_ty)
    # g_i = dL/dx_{l+1, i}: pre_{l+1}'s dx (as _pre_bwd_apply_kernel forms it) + what else reached x_{l+1}
    hp = tl.load(h_pre_ptr + rows64 * n + i, mask=row_mask, other=0.0)
    g = hp[:, None] * du + coef[:, None] * xn.to(tl.float32)
    if RES_GRAD:  # + sum_j H_res_next[j, i] g_next_j
        g = _mix(g0, g1, g2, g3, g, h_res_next_ptr + rows64 * (n * n) + i, rows64, row_mask, n, n)
    g += tl.dot(draw, phi_t, input_precision="tf32")
    off = rows64[:, None] * (n * C) + i * C + cs[None, :]
    if DENSE:
        g += tl.load(dense_ptr + off, mask=tmask, other=0.0).to(tl.float32)
    g_out = g.to(gout_ptr.dtype.element_ty)
    tl.store(gout_ptr + off, g_out, mask=tmask)
    # dphi_{l+1} rows i C + cs += x_{l+1,i}^T draw: draw rounded to bf16, as the apply kernel's default
    dphi = _dot_bf16(tl.trans(xn), draw.to(tl.bfloat16), dphi, UPCAST)
    # post/res_l's backward from the stored g (as _post_res_bwd_kernel reads it)
    gf = g_out.to(tl.float32)
    hpost = tl.load(h_post_ptr + rows64 * n + i, mask=row_mask, other=0.0)
    dy += hpost[:, None] * gf
    dh_post += tl.where(si[None, :] == i, tl.sum(gf * y, axis=1)[:, None], 0.0)
    dh_res += tl.where((si3a == i) & (si3b == 0), tl.sum(gf * x0.to(tl.float32), axis=1)[:, None, None], 0.0)
    if n > 1:
        dh_res += tl.where((si3a == i) & (si3b == 1), tl.sum(gf * x1.to(tl.float32), axis=1)[:, None, None], 0.0)
    if n > 2:
        dh_res += tl.where((si3a == i) & (si3b == 2), tl.sum(gf * x2.to(tl.float32), axis=1)[:, None, None], 0.0)
    if n > 3:
        dh_res += tl.where((si3a == i) & (si3b == 3), tl.sum(gf * x3.to(tl.float32), axis=1)[:, None, None], 0.0)
    return dphi, dy, dh_post, dh_res


@triton.jit
def _load_phi_t(phi_ptr, cs, cmask, cols, col_mask, C, M: tl.constexpr, i: tl.constexpr):
    """Rows i C + cs of phi, transposed: [MP, BC] fp32."""
    return tl.load(
        phi_ptr + (i * C + cs)[None, :] * M + cols[:, None], mask=col_mask[:, None] & cmask[None, :], other=0.0
    ).to(tl.float32)


@triton.jit
def _store_dphi(dphi_part_ptr, dphi, split, cs, cmask, cols, col_mask, C, M: tl.constexpr, n: tl.constexpr,
                i: tl.constexpr):  # fmt: skip
    off = split.to(tl.int64) * (n * C) * M + (i * C + cs)[:, None] * M + cols[None, :]
    tl.store(dphi_part_ptr + off, dphi, mask=cmask[:, None] & col_mask[None, :])


@triton.jit
def _chain_bwd_kernel(
    x_ptr, y_ptr, h_post_ptr, h_res_ptr,
    du_ptr, phi_ptr, h_pre_ptr, draw_ptr, coef_ptr, g_ptr, h_res_next_ptr, dense_ptr,
    gout_ptr, dy_ptr, dh_post_part_ptr, dh_res_part_ptr, dphi_part_ptr,
    T, C, TT,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    RES_GRAD: tl.constexpr, DENSE: tl.constexpr, UPCAST: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    # Grid (token splits, channel blocks), as the pre op's apply kernel: a program keeps one channel block's
    # phi_{l+1} rows and dphi accumulators, one per stream (n <= 4, unrolled: 2-D [BT, BC] tiles throughout),
    # and walks its tokens.
    split = tl.program_id(0)
    cb = tl.program_id(1)
    cs = cb * BC + tl.arange(0, BC)
    cmask = cs < C
    si = tl.arange(0, N)
    smask = si < n
    si3a = si[None, :, None]
    si3b = si[None, None, :]
    cols = tl.arange(0, MP)
    col_mask = cols < M
    phi_t0 = _load_phi_t(phi_ptr, cs, cmask, cols, col_mask, C, M, 0)
    dphi0 = tl.zeros((BC, MP), dtype=tl.float32)
    if n > 1:
        phi_t1 = _load_phi_t(phi_ptr, cs, cmask, cols, col_mask, C, M, 1)
        dphi1 = tl.zeros((BC, MP), dtype=tl.float32)
    if n > 2:
        phi_t2 = _load_phi_t(phi_ptr, cs, cmask, cols, col_mask, C, M, 2)
        dphi2 = tl.zeros((BC, MP), dtype=tl.float32)
    if n > 3:
        phi_t3 = _load_phi_t(phi_ptr, cs, cmask, cols, col_mask, C, M, 3)
        dphi3 = tl.zeros((BC, MP), dtype=tl.float32)
    t_start = split * TT
    t_end = tl.minimum(t_start + TT, T)
    for t0 in tl.range(t_start, t_end, BT, num_stages=LOOP_STAGES):
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < t_end
        rows64 = rows.to(tl.int64)
        tmask = row_mask[:, None] & cmask[None, :]
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=tmask, other=0.0).to(tl.float32)
        du = tl.load(du_ptr + rows64[:, None] * C + cs[None, :], mask=tmask, other=0.0).to(tl.float32)
        draw = tl.load(
            draw_ptr + rows64[:, None] * M + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        x0, x1, x2, x3 = _load_streams(x_ptr, rows64, cs, tmask, C, n)
        g0, g1, g2, g3 = x0, x1, x2, x3  # stand-ins when RES_GRAD is off
        if RES_GRAD:
            g0, g1, g2, g3 = _load_streams(g_ptr, rows64, cs, tmask, C, n)
        dy = tl.zeros((BT, BC), dtype=tl.float32)
        dh_post = tl.zeros((BT, N), dtype=tl.float32)
        dh_res = tl.zeros((BT, N, N), dtype=tl.float32)
        dphi0, dy, dh_post, dh_res = _bwd_stream(
            x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, du, h_pre_ptr, draw, coef, phi_t0, g0, g1, g2, g3,
            h_res_next_ptr, dense_ptr, gout_ptr, dphi0, dy, dh_post, dh_res,
            rows64, row_mask, cs, tmask, C, si, si3a, si3b, 0, n, RES_GRAD, DENSE, UPCAST,
        )  # fmt: skip
        if n > 1:
            dphi1, dy, dh_post, dh_res = _bwd_stream(
                x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, du, h_pre_ptr, draw, coef, phi_t1, g0, g1, g2, g3,
                h_res_next_ptr, dense_ptr, gout_ptr, dphi1, dy, dh_post, dh_res,
                rows64, row_mask, cs, tmask, C, si, si3a, si3b, 1, n, RES_GRAD, DENSE, UPCAST,
            )  # fmt: skip
        if n > 2:
            dphi2, dy, dh_post, dh_res = _bwd_stream(
                x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, du, h_pre_ptr, draw, coef, phi_t2, g0, g1, g2, g3,
                h_res_next_ptr, dense_ptr, gout_ptr, dphi2, dy, dh_post, dh_res,
                rows64, row_mask, cs, tmask, C, si, si3a, si3b, 2, n, RES_GRAD, DENSE, UPCAST,
            )  # fmt: skip
        if n > 3:
            dphi3, dy, dh_post, dh_res = _bwd_stream(
                x0, x1, x2, x3, y, h_post_ptr, h_res_ptr, du, h_pre_ptr, draw, coef, phi_t3, g0, g1, g2, g3,
                h_res_next_ptr, dense_ptr, gout_ptr, dphi3, dy, dh_post, dh_res,
                rows64, row_mask, cs, tmask, C, si, si3a, si3b, 3, n, RES_GRAD, DENSE, UPCAST,
            )  # fmt: skip
        tl.store(dy_ptr + rows64[:, None] * C + cs[None, :], dy.to(dy_ptr.dtype.element_ty), mask=tmask)
        base = cb.to(tl.int64) * T + rows64
        m2 = row_mask[:, None] & smask[None, :]
        tl.store(dh_post_part_ptr + base[:, None] * n + si[None, :], dh_post, mask=m2)
        res_off = base[:, None, None] * (n * n) + si3a * n + si3b
        tl.store(dh_res_part_ptr + res_off, dh_res, mask=m2[:, :, None] & (si3b < n))
    _store_dphi(dphi_part_ptr, dphi0, split, cs, cmask, cols, col_mask, C, M, n, 0)
    if n > 1:
        _store_dphi(dphi_part_ptr, dphi1, split, cs, cmask, cols, col_mask, C, M, n, 1)
    if n > 2:
        _store_dphi(dphi_part_ptr, dphi2, split, cs, cmask, cols, col_mask, C, M, n, 2)
    if n > 3:
        _store_dphi(dphi_part_ptr, dphi3, split, cs, cmask, cols, col_mask, C, M, n, 3)


def chain_supported(x: torch.Tensor, settings: LaunchSettings) -> bool:
    """Whether the junction kernels take ``x [.., n, C]``: bf16 streams with n <= 4 (the kernels unroll
    four streams; 2n + n^2 <= 32 projection columns), and the ``chain`` setting on."""
    n = x.shape[-2]
    return settings.chain and x.dtype == torch.bfloat16 and 2 * n + n * n <= 32


def chain_forward(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, phi: torch.Tensor,
    settings: LaunchSettings, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``x [T, n, C], y [T, C], h_post [T, n], h_res [T, n, n] fp32, phi [nC, M]`` of the next pre op
    (contiguous) -> ``(x_next, part [S, T, MP], ss_part [S, T])``: x_next into ``out`` if given, and the
    next pre op's projection partials over S channel splits (:func:`kernels.mhc_pre.pre_forward`'s
    ``partials``)."""
    t, n, c = x.shape
    m = 2 * n + n * n
    mp = _pow2(m, 16)
    s = settings
    bt, bc = s.chain_fwd_block_t, min(s.chain_fwd_block_c, _pow2(c, 16))
    t_blocks, c_blocks = triton.cdiv(t, bt), triton.cdiv(c, bc)
    splits = max(1, min(c_blocks, triton.cdiv(2 * _num_sms(x.device), t_blocks)))
    per_split = triton.cdiv(c_blocks, splits) * bc
    splits = triton.cdiv(c, per_split)
    out = torch.empty_like(x) if out is None else out
    f32 = dict(device=x.device, dtype=torch.float32)
    part, ss_part = torch.empty((splits, t, mp), **f32), torch.empty((splits, t), **f32)
    _chain_fwd_kernel[(t_blocks, splits)](
        x, y, h_post, h_res, out, phi, part, ss_part, t, c, per_split,
        n=n, M=m, MP=mp, BT=bt, BC=bc, UPCAST=_interpreted(), LOOP_STAGES=s.chain_fwd_loop_stages,
        num_warps=s.chain_fwd_warps,
    )  # fmt: skip
    return out, part, ss_part


def chain_backward(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, phi: torch.Tensor,
    du: torch.Tensor, h_pre: torch.Tensor, draw: torch.Tensor, coef: torch.Tensor,
    res_grad: tuple[torch.Tensor, torch.Tensor] | None, dense: torch.Tensor | None, settings: LaunchSettings,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The junction's backward. Sublayer l: ``x [T, n, C], y [T, C], h_post, h_res`` (as the forward got
    them); the next pre op: ``phi``, ``du [T, C]``, ``h_pre [T, n]`` and its reduce's ``draw [T, M]``,
    ``coef [T]``; what else reached x_{l+1}: ``res_grad = (g [T, n, C], h_res_next)`` of the next post/res
    op, and ``dense [T, n, C]``.

    Returns ``g_l [T, n, C]`` (dL/dx_{l+1}), ``dy [T, C]``, ``dh_post [T, n]``, ``dh_res [T, n, n]`` (fp32)
    and ``dphi [nC, M]`` (fp32) of the next pre op."""
    t, n, c = x.shape
    m = 2 * n + n * n
    s = settings
    ns = _pow2(n, 2)
    block_t = s.chain_bwd_block_t
    block_c = min(s.chain_bwd_block_c, _pow2(c, 16))
    c_blocks, t_blocks = triton.cdiv(c, block_c), triton.cdiv(t, block_t)
    f32 = dict(device=x.device, dtype=torch.float32)
    g_out = torch.empty_like(x)
    dy = torch.empty_like(y)
    dh_post = torch.empty((c_blocks, t, n), **f32)
    dh_res = torch.empty((c_blocks, t, n, n), **f32)
    g, h_res_next = res_grad if res_grad is not None else (x, h_res)  # stand-ins when RES_GRAD is off
    constexprs = dict(
        n=n, N=ns, M=m, MP=_pow2(m, 16), BT=block_t, BC=block_c, RES_GRAD=res_grad is not None,
        DENSE=dense is not None, UPCAST=_interpreted(), LOOP_STAGES=s.chain_bwd_loop_stages,
        num_warps=s.chain_bwd_warps,
    )  # fmt: skip
    dense = x if dense is None else dense

    def compile_args():  # a 1-element stand-in for dphi_part: compiles as the real launch will
        partial_like = torch.empty(1, **f32)
        return (x, y, h_post, h_res, du, phi, h_pre, draw, coef, g, h_res_next, dense, g_out, dy, dh_post, dh_res,
                partial_like, t, c, block_t)  # fmt: skip

    dtypes = (x.dtype, phi.dtype, g.dtype)
    constexprs = fit_loop_stages(_chain_bwd_kernel, compile_args, dtypes, constexprs, x.device)
    slots = resident_programs(_chain_bwd_kernel, compile_args, dtypes, constexprs, x.device)
    splits = wave_splits(c_blocks, min(t_blocks, MAX_PARTIALS), slots)  # whole waves; few dphi partials
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)
    dphi = torch.empty((splits, n * c, m), **f32)
    launch_fitted(
        _chain_bwd_kernel, (splits, c_blocks),
        (x, y, h_post, h_res, du, phi, h_pre, draw, coef, g, h_res_next, dense, g_out, dy, dh_post, dh_res, dphi,
         t, c, tokens_per_split), dtypes, constexprs, x.device,
    )  # fmt: skip
    return g_out, dy, dh_post.sum(0), dh_res.sum(0), (dphi[0] if splits == 1 else dphi.sum(0))
