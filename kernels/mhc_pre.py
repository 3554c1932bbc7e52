"""Fused mHC 'pre' op: x -> (u, H_post, H_res), forward and backward (DESIGN.md §4).

Reference twin: :func:`kernels.reference.mhc_pre` (``rms_project`` ->
``mappings_from_proj`` -> ``pre_aggregate``).

Shapes (T tokens, n streams, C channels, K = n*C, M = 2n + n²):
    x:     [T, n, C]  stream dtype (bf16 / fp16 / fp32), read as vec(x) [T, K]
    phi:   [K, M]     pre | post | res columns
    u:     [T, C]     stream dtype
    h_pre, h_post: [T, n] fp32;  h_res: [T, n, n] fp32
    proj:  [T, M] fp32 (x' @ phi, 1/rms folded in), rstd: [T] fp32  -- saved for backward

Kernels (block sizes: launcher defaults, from the sweeps in benchmarks/results/kernels_ops_sweep_*):
    _pre_fwd_kernel         one program per BT tokens: one sweep over vec(x) gives the sum of squares
                            and x @ phi (tensor cores, tf32); then sigmoid, 2 sigmoid and Sinkhorn
                            on-chip. With AGGREGATE it also writes u = H_pre x in a second pass
                            over its tokens (hoping for L2 hits: measured 10 % slower on H100).
    _pre_fwd_partial_kernel the K-split option (``TUNING['fwd_split']``, bf16 x): grid (token blocks,
    _pre_fwd_finish_kernel  K splits), x @ phi as bf16 dots against phi's hi + lo halves, then a
                            finish kernel for 1/rms, the mappings and Sinkhorn. Off by default:
                            0.276 vs 0.210 ms at C = 2048 (H100), see benchmarks/NOTES_kernels.md.
    _pre_aggregate_kernel   u = H_pre x on a (token, channel) grid: the default second read of x.
    _pre_bwd_reduce_kernel  one program per BT tokens: dH_pre = <du, x_i> over C, then every
                            per-token scalar of the backward (Sinkhorn backward by recompute).
    _pre_bwd_apply_kernel   grid (token splits, channel blocks): dx = H_pre du + draw @ phi^T
                            + coef x (+ the post/res gradient, accumulated in place), and by
                            default a partial dphi = x^T draw per token split (bf16 dots for
                            bf16 x, draw split hi + lo: no tf32 transposes through shared memory).
    _pre_bwd_dphi_kernel    the alternative: dphi as its own GEMM over tokens (one more read of x).
The per-token chain of the backward:  dlogit -> dproj = alpha dlogit -> draw = dproj * rstd,
d rstd = <dproj, proj> / rstd -> coef = -d rstd * rstd^3 / K  (dx += coef * x).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .sinkhorn import sinkhorn_bwd, sinkhorn_fwd, sinkhorn_init


@triton.jit
def _load_proj(proj_ptr, rows64, row_mask, n: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """This block's projections split by mapping: pre [BT, N], post [BT, N], res [BT, N, N], and the masks."""
    i = tl.arange(0, N)
    imask = i < n
    m2 = row_mask[:, None] & imask[None, :]
    valid = m2[:, :, None] & imask[None, None, :]
    base = proj_ptr + rows64[:, None] * M
    p_pre = tl.load(base + i[None, :], mask=m2, other=0.0)
    p_post = tl.load(base + n + i[None, :], mask=m2, other=0.0)
    p_res = tl.load(base[:, :, None] + 2 * n + i[None, :, None] * n + i[None, None, :], mask=valid, other=0.0)
    return p_pre, p_post, p_res, m2, valid


@triton.jit
def _logits(p_pre, p_post, p_res, alpha_ptr, bias_ptr, n: tl.constexpr, N: tl.constexpr):
    """alpha * proj + bias for the three mappings, in float32."""
    i = tl.arange(0, N)
    imask = i < n
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    b_pre = tl.load(bias_ptr + i, mask=imask, other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + n + i, mask=imask, other=0.0).to(tl.float32)
    b_res = tl.load(
        bias_ptr + 2 * n + i[:, None] * n + i[None, :], mask=imask[:, None] & imask[None, :], other=0.0
    ).to(tl.float32)
    return a_pre * p_pre + b_pre[None, :], a_post * p_post + b_post[None, :], a_res * p_res + b_res[None, :, :]


@triton.jit
def _mappings(
    proj, rstd, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
    rows, row_mask, n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    """Store proj [BT, MP] and rstd [BT]; then sigmoid, 2 sigmoid and Sinkhorn; store and return h_pre [BT, N]."""
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, MP)
    tl.store(proj_ptr + rows64[:, None] * M + cols[None, :], proj, mask=row_mask[:, None] & (cols < M)[None, :])
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    # proj is re-read below in the [BT, n] / [BT, n, n] shapes by other threads of this program.
    tl.debug_barrier()

    p_pre, p_post, p_res, m2, valid = _load_proj(proj_ptr, rows64, row_mask, n, N, M)
    l_pre, l_post, l_res = _logits(p_pre, p_post, p_res, alpha_ptr, bias_ptr, n, N)
    h_pre = tl.where(m2, tl.sigmoid(l_pre), 0.0)
    h_post = 2.0 * tl.sigmoid(l_post)
    h_res = sinkhorn_fwd(sinkhorn_init(l_res, valid), ITERS)
    i = tl.arange(0, N)
    tl.store(h_pre_ptr + rows64[:, None] * n + i[None, :], h_pre, mask=m2)
    tl.store(h_post_ptr + rows64[:, None] * n + i[None, :], h_post, mask=m2)
    tl.store(h_res_ptr + rows64[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :], h_res, mask=valid)
    return h_pre


@triton.jit
def _pre_fwd_kernel(
    x_ptr, phi_ptr, alpha_ptr, bias_ptr,
    u_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, proj_ptr, rstd_ptr,
    T, C, eps,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, AGGREGATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    K = n * C
    cols = tl.arange(0, MP)
    col_mask = cols < M

    # pass 1: sum of squares and x @ phi in one sweep over vec(x)
    acc = tl.zeros((BT, MP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        xk = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        xk = xk.to(tl.float32)
        ss += tl.sum(xk * xk, axis=1)
        ph = tl.load(phi_ptr + ks[:, None] * M + cols[None, :], mask=kmask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(xk, ph.to(tl.float32), acc, input_precision=PRECISION)
    rstd = 1.0 / tl.sqrt(ss / K + eps)
    proj = acc * rstd[:, None]
    h_pre = _mappings(
        proj, rstd, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
        rows, row_mask, n, N, M, MP, ITERS,
    )  # fmt: skip
    if AGGREGATE:
        _aggregate_rows(x_ptr, u_ptr, h_pre, rows64, row_mask, C, n, N, BC)


@triton.jit
def _dot_bf16(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b for bf16 a, b. ``UPCAST``: in fp32 (exact products), for Triton's CPU interpreter,
    whose bf16 dot is wrong (Triton 3.9: errors of 1e10 on a 16 x 16 product)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _pre_fwd_partial_kernel(
    x_ptr, phi2_ptr, part_ptr, ss_part_ptr,
    T, K, KS,
    MP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Split forward, pass 1, grid (token blocks, K splits): partial sum of squares and x @ phi over K/splits.

    bf16 x meets phi as a bf16 hi + lo pair (``phi2`` [2, K, MP], zero-padded columns): two bf16
    dots per tile, error ~2^-17 of phi (tf32 rounds phi to 2^-11), x fed to the tensor cores as
    loaded. Splitting K lets a program take 64-128 tokens (phi re-read from L2 once per token
    block, not per 32 tokens) while the grid still fills the chip.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    split = tl.program_id(1)
    cols = tl.arange(0, MP)
    acc = tl.zeros((BT, MP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    k_start = split * KS
    k_end = tl.minimum(k_start + KS, K)
    for k0 in range(k_start, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < k_end
        xk = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        xf = xk.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        ph_off = ks[:, None] * MP + cols[None, :]
        hi = tl.load(phi2_ptr + ph_off, mask=kmask[:, None], other=0.0)
        lo = tl.load(phi2_ptr + K * MP + ph_off, mask=kmask[:, None], other=0.0)
        acc = _dot_bf16(xk, hi, acc, UPCAST)
        acc = _dot_bf16(xk, lo, acc, UPCAST)
    part_off = split.to(tl.int64) * T * MP + rows64[:, None] * MP + cols[None, :]
    tl.store(part_ptr + part_off, acc, mask=row_mask[:, None])
    tl.store(ss_part_ptr + split.to(tl.int64) * T + rows64, ss, mask=row_mask)


@triton.jit
def _pre_fwd_finish_kernel(
    part_ptr, ss_part_ptr, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, proj_ptr, rstd_ptr,
    T, K, SPLITS, eps,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    """Split forward, pass 2: sum the K-split partials, 1/rms, then the mappings and Sinkhorn."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, MP)
    acc = tl.zeros((BT, MP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for s in range(SPLITS):
        srows = rows64 + s * T  # T may arrive as the constant 1 (Triton specialises it): no T.to()
        acc += tl.load(part_ptr + srows[:, None] * MP + cols[None, :], mask=row_mask[:, None], other=0.0)
        ss += tl.load(ss_part_ptr + srows, mask=row_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(ss / K + eps)
    _mappings(
        acc * rstd[:, None], rstd, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
        rows, row_mask, n, N, M, MP, ITERS,
    )  # fmt: skip


@triton.jit
def _aggregate_rows(x_ptr, u_ptr, h_pre, rows64, row_mask, C, n: tl.constexpr, N: tl.constexpr, BC: tl.constexpr):
    """u = H_pre x over all of C for one token block; last chunk first (likeliest still in L2)."""
    K = n * C
    i3 = tl.arange(0, N)[None, :, None]
    xmask3 = row_mask[:, None, None] & (i3 < n)
    nchunks = tl.cdiv(C, BC)
    for back in range(nchunks):
        cs = (nchunks - 1 - back) * BC + tl.arange(0, BC)
        cmask = cs < C
        x3 = tl.load(
            x_ptr + rows64[:, None, None] * K + i3 * C + cs[None, None, :], mask=xmask3 & cmask[None, None, :], other=0.0
        )
        u = tl.sum(h_pre[:, :, None] * x3.to(tl.float32), axis=1)
        tl.store(
            u_ptr + rows64[:, None] * C + cs[None, :],
            u.to(u_ptr.dtype.element_ty),
            mask=row_mask[:, None] & cmask[None, :],
        )


@triton.jit
def _pre_aggregate_kernel(
    x_ptr, h_pre_ptr, u_ptr, T, C, n: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr
):
    """u = H_pre x on a (token block, channel block) grid: the second read of x, from HBM, fully parallel."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cs < C
    i = tl.arange(0, N)
    m2 = row_mask[:, None] & (i < n)[None, :]
    h_pre = tl.load(h_pre_ptr + rows64[:, None] * n + i[None, :], mask=m2, other=0.0)
    x3 = tl.load(
        x_ptr + rows64[:, None, None] * (n * C) + i[None, :, None] * C + cs[None, None, :],
        mask=m2[:, :, None] & cmask[None, None, :],
        other=0.0,
    )
    u = tl.sum(h_pre[:, :, None] * x3.to(tl.float32), axis=1)
    tl.store(u_ptr + rows64[:, None] * C + cs[None, :], u.to(u_ptr.dtype.element_ty), mask=row_mask[:, None] & cmask[None, :])


@triton.jit
def _pre_bwd_reduce_kernel(
    x_ptr, du_ptr, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, dh_post_ptr, dh_res_ptr, scratch_ptr,
    dlogit_ptr, dalpha_part_ptr, draw_ptr, coef_ptr,
    T, C,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    K = n * C
    i = tl.arange(0, N)
    i3 = i[None, :, None]
    xmask3 = row_mask[:, None, None] & (i3 < n)

    # dH_pre[t, i] = <du[t], x[t, i]>
    dh_pre = tl.zeros((BT, N), dtype=tl.float32)
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        cmask = cs < C
        du = tl.load(du_ptr + rows64[:, None] * C + cs[None, :], mask=row_mask[:, None] & cmask[None, :], other=0.0)
        x3 = tl.load(
            x_ptr + rows64[:, None, None] * K + i3 * C + cs[None, None, :], mask=xmask3 & cmask[None, None, :], other=0.0
        )
        dh_pre += tl.sum(x3.to(tl.float32) * du.to(tl.float32)[:, None, :], axis=2)

    p_pre, p_post, p_res, m2, valid = _load_proj(proj_ptr, rows64, row_mask, n, N, M)
    l_pre, l_post, l_res = _logits(p_pre, p_post, p_res, alpha_ptr, bias_ptr, n, N)
    s_pre = tl.sigmoid(l_pre)
    d_pre = tl.where(m2, dh_pre * s_pre * (1.0 - s_pre), 0.0)
    s_post = tl.sigmoid(l_post)
    dh_post = tl.load(dh_post_ptr + rows64[:, None] * n + i[None, :], mask=m2, other=0.0)
    d_post = tl.where(m2, dh_post * 2.0 * s_post * (1.0 - s_post), 0.0)
    res_off = rows64[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    dh_res = tl.load(dh_res_ptr + res_off, mask=valid, other=0.0)
    d_res = sinkhorn_bwd(sinkhorn_init(l_res, valid), dh_res, valid, scratch_ptr, rows, row_mask, ITERS, N)
    d_res = tl.where(valid, d_res, 0.0)

    dl_base = dlogit_ptr + rows64[:, None] * M
    tl.store(dl_base + i[None, :], d_pre, mask=m2)
    tl.store(dl_base + n + i[None, :], d_post, mask=m2)
    tl.store(dl_base[:, :, None] + 2 * n + i[None, :, None] * n + i[None, None, :], d_res, mask=valid)
    # dalpha_g = sum over tokens of <dlogit_g, proj_g>; the token sum is left to the caller
    ga_pre = tl.sum(d_pre * p_pre, axis=1)
    ga_post = tl.sum(d_post * p_post, axis=1)
    ga_res = tl.sum(tl.sum(d_res * p_res, axis=2), axis=1)
    tl.store(dalpha_part_ptr + rows64 * 3, ga_pre, mask=row_mask)
    tl.store(dalpha_part_ptr + rows64 * 3 + 1, ga_post, mask=row_mask)
    tl.store(dalpha_part_ptr + rows64 * 3 + 2, ga_res, mask=row_mask)

    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=1.0)
    # <dproj, proj> = rstd * d rstd
    dot_pp = a_pre * ga_pre + a_post * ga_post + a_res * ga_res
    tl.store(coef_ptr + rows, -dot_pp * rstd * rstd / K, mask=row_mask)
    dr_base = draw_ptr + rows64[:, None] * M
    tl.store(dr_base + i[None, :], a_pre * d_pre * rstd[:, None], mask=m2)
    tl.store(dr_base + n + i[None, :], a_post * d_post * rstd[:, None], mask=m2)
    tl.store(
        dr_base[:, :, None] + 2 * n + i[None, :, None] * n + i[None, None, :],
        a_res * d_res * rstd[:, None, None],
        mask=valid,
    )


@triton.jit
def _pre_bwd_apply_kernel(
    x_ptr, du_ptr, phi_ptr, h_pre_ptr, draw_ptr, coef_ptr, dx_ptr, dphi_part_ptr,
    T, C, TT,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, DPHI: tl.constexpr, DPHI_BF16: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # One tile holds all n streams of a channel block side by side: column q is stream q // BC,
    # channel q % BC, i.e. row i*C + c of phi and column i*C + c of vec(x); du and H_pre are
    # gathered per column (the repeats hit L1), so every x and du element leaves HBM once.
    split = tl.program_id(0)
    q = tl.arange(0, N * BC)
    qi = q // BC
    qc = tl.program_id(1) * BC + q % BC
    qmask = (qi < n) & (qc < C)
    krow = qi * C + qc
    cols = tl.arange(0, MP)
    col_mask = cols < M
    K = n * C
    phi_t = tl.load(
        phi_ptr + krow[None, :] * M + cols[:, None], mask=col_mask[:, None] & qmask[None, :], other=0.0
    ).to(tl.float32)  # [MP, N*BC]
    dphi = tl.zeros((N * BC, MP), dtype=tl.float32)
    t_start = split * TT
    t_end = tl.minimum(t_start + TT, T)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < t_end
        rows64 = rows.to(tl.int64)
        tile_mask = row_mask[:, None] & qmask[None, :]
        x_off = rows64[:, None] * K + krow[None, :]
        x_raw = tl.load(x_ptr + x_off, mask=tile_mask, other=0.0)
        x2 = x_raw.to(tl.float32)
        du2 = tl.load(du_ptr + rows64[:, None] * C + qc[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        hp2 = tl.load(h_pre_ptr + rows64[:, None] * n + qi[None, :], mask=tile_mask, other=0.0)
        draw = tl.load(
            draw_ptr + rows64[:, None] * M + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        dx = hp2 * du2 + coef[:, None] * x2 + tl.dot(draw, phi_t, input_precision=PRECISION)
        if ACCUMULATE:
            dx += tl.load(dx_ptr + x_off, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        if DPHI:
            if DPHI_BF16:
                # bf16 x as loaded, draw as a bf16 hi + lo pair: wgmma takes bf16 operands in either
                # major order, where tf32 needs both transposed through shared memory
                draw_hi = draw.to(tl.bfloat16)
                draw_lo = (draw - draw_hi.to(tl.float32)).to(tl.bfloat16)
                x_t = tl.trans(x_raw)
                dphi = _dot_bf16(x_t, draw_hi, dphi, UPCAST)
                dphi = _dot_bf16(x_t, draw_lo, dphi, UPCAST)
            else:
                dphi = tl.dot(tl.trans(x2), draw, dphi, input_precision=PRECISION)
    if DPHI:
        tl.store(
            dphi_part_ptr + split.to(tl.int64) * K * M + krow[:, None] * M + cols[None, :],
            dphi,
            mask=qmask[:, None] & col_mask[None, :],
        )


@triton.jit
def _pre_bwd_dphi_kernel(
    x_ptr, draw_ptr, dphi_part_ptr, T, K, TT,
    M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    DPHI_BF16: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dphi = vec(x)^T draw, [K, M]: a GEMM over tokens, one partial per token split."""
    split = tl.program_id(0)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    kmask = ks < K
    cols = tl.arange(0, MP)
    col_mask = cols < M
    acc = tl.zeros((BK, MP), dtype=tl.float32)
    t_start = split * TT
    t_end = tl.minimum(t_start + TT, T)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < t_end
        rows64 = rows.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        draw = tl.load(
            draw_ptr + rows64[:, None] * M + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        if DPHI_BF16:  # as in _pre_bwd_apply_kernel
            draw_hi = draw.to(tl.bfloat16)
            acc = _dot_bf16(tl.trans(xt), draw_hi, acc, UPCAST)
            acc = _dot_bf16(tl.trans(xt), (draw - draw_hi.to(tl.float32)).to(tl.bfloat16), acc, UPCAST)
        else:
            acc = tl.dot(tl.trans(xt.to(tl.float32)), draw, acc, input_precision=PRECISION)
    tl.store(
        dphi_part_ptr + split.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :],
        acc,
        mask=kmask[:, None] & col_mask[None, :],
    )


def _pow2(v: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(v))


def _precision(dtype: torch.dtype) -> str:
    # bf16/fp16 streams are exact in tf32; fp32 streams get the 3-pass split for full fp32 accuracy.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _interpreted() -> bool:
    return type(_pre_fwd_kernel).__name__ == "InterpretedFunction"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Launch defaults (measured on H100: benchmarks/NOTES_kernels.md). A dict so that the
# benchmarks can A/B a whole configuration; the launchers' keyword arguments override it.
TUNING = {
    # bf16 x: K-split bf16 hi/lo mapping kernel (v4 option; 0.34-0.49 ms against v2's 0.21 at C = 2048,
    # sweep of 2026-11-25) when True; the single tf32 kernel (v2) when False
    "fwd_split": False,
    "fwd_block_t": 128, "fwd_block_k": 64, "fwd_warps": 4, "fwd_stages": 3, "fwd_k_splits": None,
    "apply_dphi_bf16": True,  # bf16 x: dphi = x^T (draw_hi + draw_lo) in bf16 dots (v4); else tf32 (v2)
    "apply_block_t": 64, "apply_block_q": 256, "apply_warps": 8, "apply_stages": None, "apply_fuse_dphi": True,
}  # fmt: skip
V2_TUNING = {"fwd_split": False, "apply_dphi_bf16": False, "apply_block_t": 32, "apply_block_q": None,
             "apply_warps": 8, "apply_stages": None, "apply_fuse_dphi": True}  # fmt: skip
# What benchmarks/bench_kernels.py --sweep times and tests/test_kernels.py checks on the GPU (n <= 4 keys;
# n = 8 keeps its own block sizes where the launchers say so).
FWD_CANDIDATES = [
    dict(fwd_block_t=bt, fwd_block_k=bk, fwd_warps=w, fwd_stages=st, fwd_k_splits=ks)
    for bt, bk, w, st, ks in [(128, 64, 4, 3, None), (128, 128, 8, 3, None), (64, 128, 4, 3, None),
                              (128, 64, 8, 4, None), (256, 64, 8, 3, None), (64, 64, 4, 4, None), (128, 64, 4, 3, 8)]
]  # fmt: skip
APPLY_CANDIDATES = [
    dict(apply_block_t=bt, apply_block_q=bq, apply_warps=w, apply_fuse_dphi=f, apply_dphi_bf16=True, apply_stages=st)
    for bt, bq, w, f, st in [(32, 256, 8, True, None), (16, 256, 4, True, None), (32, 128, 4, True, None),
                             (64, 256, 8, True, None), (32, 256, 8, True, 3), (16, 256, 4, False, None),
                             (32, 256, 8, False, None)]
]  # fmt: skip


@contextlib.contextmanager
def tuning(overrides: dict):
    """Run with ``TUNING`` updated by ``overrides`` (an A/B run, a sweep point); restored on exit."""
    unknown = set(overrides) - set(TUNING)
    if unknown:
        raise KeyError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(TUNING)}")
    saved = dict(TUNING)
    TUNING.update(overrides)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved)


def split_phi_bf16(phi: torch.Tensor, mp: int) -> torch.Tensor:
    """phi [K, M] -> [2, K, MP] bf16: hi = bf16(phi), lo = bf16(phi - hi), columns zero-padded to MP."""
    hi = phi.to(torch.bfloat16)
    lo = (phi.float() - hi.float()).to(torch.bfloat16)
    return torch.nn.functional.pad(torch.stack((hi, lo)), (0, mp - phi.shape[1])).contiguous()


def pre_forward(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float,
    block_t: int | None = None, block_k: int | None = None, num_warps: int | None = None,
    fuse_aggregate: bool = False, agg_block_t: int | None = None, agg_block_c: int = 256,
    split: bool | None = None, num_stages: int | None = None, k_splits: int | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Launch the forward on ``x [T, n, C]`` (contiguous). Returns ``u, h_pre, h_post, h_res, proj, rstd``.

    ``split`` (default ``TUNING['fwd_split']``, bf16 x only): the K-split pair
    :func:`_pre_fwd_partial_kernel` + :func:`_pre_fwd_finish_kernel`; otherwise
    :func:`_pre_fwd_kernel` (one program per ``block_t`` tokens over all of K, tf32 dots).
    ``fuse_aggregate`` (single kernel only): compute u inside the mapping kernel (second pass over
    each token block, hoping for L2 hits) instead of in :func:`_pre_aggregate_kernel` on a 2-D grid.
    """
    t, n, c = x.shape
    m = 2 * n + n * n
    mp = _pow2(m, 16)
    nn_ = _pow2(n, 2)
    k = n * c
    f32 = dict(device=x.device, dtype=torch.float32)
    u = torch.empty((t, c), device=x.device, dtype=x.dtype)
    h_pre, h_post = torch.empty((t, n), **f32), torch.empty((t, n), **f32)
    h_res = torch.empty((t, n, n), **f32)
    proj, rstd = torch.empty((t, m), **f32), torch.empty((t,), **f32)
    split = TUNING["fwd_split"] if split is None else split
    if split and x.dtype == torch.bfloat16 and not fuse_aggregate:
        # n = 8 (MP = 128): a [128, 128] fp32 accumulator is too many registers; halve the tokens
        bt = block_t or (TUNING["fwd_block_t"] if mp <= 32 else 64)
        bk = block_k or TUNING["fwd_block_k"]
        t_blocks = triton.cdiv(t, bt)
        k_splits = k_splits or TUNING["fwd_k_splits"]
        if k_splits is None:  # ~2 programs per SM, each at least 4 K-blocks long
            k_splits = max(1, min(triton.cdiv(2 * _num_sms(x.device), t_blocks), triton.cdiv(k, 4 * bk)))
        ks = triton.cdiv(triton.cdiv(k, k_splits), bk) * bk
        k_splits = triton.cdiv(k, ks)
        part = torch.empty((k_splits, t, mp), **f32)
        ss_part = torch.empty((k_splits, t), **f32)
        _pre_fwd_partial_kernel[(t_blocks, k_splits)](
            x, split_phi_bf16(phi, mp), part, ss_part, t, k, ks, MP=mp, BT=bt, BK=bk, UPCAST=_interpreted(),
            num_warps=num_warps or (TUNING["fwd_warps"] if mp <= 32 else 8),
            num_stages=num_stages or TUNING["fwd_stages"],
        )  # fmt: skip
        fbt = 16 if mp <= 32 else 8
        _pre_fwd_finish_kernel[(triton.cdiv(t, fbt),)](
            part, ss_part, alpha, bias, h_pre, h_post, h_res, proj, rstd, t, k, k_splits, eps,
            n=n, N=nn_, M=m, MP=mp, ITERS=iters, BT=fbt, num_warps=4,
        )  # fmt: skip
    else:
        bt = block_t or 32
        if block_k is None:
            block_k = 128 if mp <= 32 else 64
        if num_warps is None:
            num_warps = 4 if mp <= 32 else 8
        _pre_fwd_kernel[(triton.cdiv(t, bt),)](
            x, phi, alpha, bias, u, h_pre, h_post, h_res, proj, rstd, t, c, eps,
            n=n, N=nn_, M=m, MP=mp, ITERS=iters, BT=bt, BK=block_k, BC=min(128, _pow2(c, 16)),
            PRECISION=_precision(x.dtype), AGGREGATE=fuse_aggregate, num_warps=num_warps,
        )  # fmt: skip
    if not fuse_aggregate:
        bt = agg_block_t or max(1, 16 // nn_)  # [BT, N, BC] tile of ~4K values
        bc = min(agg_block_c, _pow2(c, 16))
        _pre_aggregate_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc))](
            x, h_pre, u, t, c, n=n, N=nn_, BT=bt, BC=bc, num_warps=4
        )
    return u, h_pre, h_post, h_res, proj, rstd


def pre_backward_reduce(
    x: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, proj: torch.Tensor, rstd: torch.Tensor,
    du: torch.Tensor, dh_post: torch.Tensor, dh_res: torch.Tensor, iters: int,
    block_t: int = 4, block_c: int = 256, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward pass 1: ``(dlogit [T, M], dalpha_part [T, 3], draw [T, M], coef [T])``, all fp32."""
    t, n, c = x.shape
    m = 2 * n + n * n
    nn_ = _pow2(n, 2)
    f32 = dict(device=x.device, dtype=torch.float32)
    scratch = torch.empty((t, 2 * iters, nn_), **f32)
    dlogit = torch.empty((t, m), **f32)
    dalpha_part = torch.empty((t, 3), **f32)
    draw = torch.empty((t, m), **f32)
    coef = torch.empty((t,), **f32)
    _pre_bwd_reduce_kernel[(triton.cdiv(t, block_t),)](
        x, du, proj, rstd, alpha, bias, dh_post, dh_res, scratch, dlogit, dalpha_part, draw, coef, t, c,
        n=n, N=nn_, M=m, ITERS=iters, BT=block_t, BC=min(block_c, _pow2(c, 16)), num_warps=num_warps,
    )  # fmt: skip
    return dlogit, dalpha_part, draw, coef


def apply_tuning(dtype: torch.dtype, n: int) -> dict:
    """The apply kernel's defaults for a stream dtype and n.

    TUNING's apply sizes were measured for bf16 streams and n <= 4. fp32 tiles and n = 8's
    [128, q] dphi tile ran out of shared memory at block_t = 64 on H100 (262-524 KB asked,
    227 KB there): those keep the v2 configuration, GPU-tested as it stands.
    """
    return TUNING if dtype == torch.bfloat16 and _pow2(2 * n + n * n, 16) <= 32 else V2_TUNING


def pre_backward_apply(
    x: torch.Tensor, phi: torch.Tensor, h_pre: torch.Tensor, du: torch.Tensor, draw: torch.Tensor,
    coef: torch.Tensor, dx_accum: torch.Tensor | None = None, fuse_dphi: bool | None = None,
    block_t: int | None = None, block_q: int | None = None, num_warps: int | None = None,
    dphi_bf16: bool | None = None, num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward pass 2: ``(dx [T, n, C], dphi [K, M] fp32)``; ``dx_accum`` receives dx in place if given.

    ``block_q``: columns of the [block_t, n x channels] tile; the channel block is block_q / n.
    ``fuse_dphi``: accumulate dphi in the dx kernel (one read of x; the default) instead of in
    :func:`_pre_bwd_dphi_kernel` (a second read of x). ``dphi_bf16``: dphi's dots in bf16 (x as
    loaded, draw as a hi + lo pair) rather than tf32. Defaults: ``TUNING`` for bf16 x with n <= 4,
    ``V2_TUNING`` otherwise.
    """
    t, n, c = x.shape
    m = 2 * n + n * n
    tuned = apply_tuning(x.dtype, n)
    fuse_dphi = tuned["apply_fuse_dphi"] if fuse_dphi is None else fuse_dphi
    dphi_bf16 = tuned["apply_dphi_bf16"] if dphi_bf16 is None else dphi_bf16
    block_t = block_t or tuned["apply_block_t"]
    block_q = block_q or tuned["apply_block_q"]
    num_warps = num_warps or tuned["apply_warps"]
    num_stages = num_stages or tuned["apply_stages"]
    ns = _pow2(n)
    if block_q is None:
        block_q = 256 if _pow2(m, 16) <= 32 else 128  # n = 8: the [MP, q] phi tile is 4x wider
    block_c = min(max(16, block_q // ns), _pow2(c, 16))
    c_blocks = triton.cdiv(c, block_c)
    t_blocks = triton.cdiv(t, block_t)
    # enough programs to fill the chip, few token splits so the dphi partials stay small
    splits = max(1, min(t_blocks, 16, triton.cdiv(4 * _num_sms(x.device), c_blocks)))
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)
    dphi_part = torch.empty((splits if fuse_dphi else 1, n * c, m), device=x.device, dtype=torch.float32)
    dx = dx_accum if dx_accum is not None else torch.empty_like(x)
    _pre_bwd_apply_kernel[(splits, c_blocks)](
        x, du, phi, h_pre, draw, coef, dx, dphi_part, t, c, tokens_per_split,
        n=n, N=ns, M=m, MP=_pow2(m, 16), BT=block_t, BC=block_c, ACCUMULATE=dx_accum is not None,
        PRECISION=_precision(x.dtype), DPHI=fuse_dphi, DPHI_BF16=dphi_bf16 and x.dtype == torch.bfloat16,
        UPCAST=_interpreted(), num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}),
    )  # fmt: skip
    if not fuse_dphi:
        return dx, pre_backward_dphi(x, draw, dphi_bf16=dphi_bf16)
    return dx, (dphi_part[0] if splits == 1 else dphi_part.sum(0))


def pre_backward_dphi(
    x: torch.Tensor, draw: torch.Tensor, block_t: int = 64, block_k: int = 128, num_warps: int = 4,
    dphi_bf16: bool | None = None,
) -> torch.Tensor:
    """dphi = vec(x)^T draw ``[K, M]`` fp32."""
    t, n, c = x.shape
    k, m = n * c, draw.shape[1]
    k_blocks = triton.cdiv(k, block_k)
    t_blocks = triton.cdiv(t, block_t)
    splits = max(1, min(t_blocks, 16, triton.cdiv(2 * _num_sms(x.device), k_blocks)))
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)
    dphi_part = torch.empty((splits, k, m), device=x.device, dtype=torch.float32)
    _pre_bwd_dphi_kernel[(splits, k_blocks)](
        x, draw, dphi_part, t, k, tokens_per_split,
        M=m, MP=_pow2(m, 16), BT=block_t, BK=block_k, PRECISION=_precision(x.dtype),
        DPHI_BF16=(TUNING["apply_dphi_bf16"] if dphi_bf16 is None else dphi_bf16) and x.dtype == torch.bfloat16,
        UPCAST=_interpreted(), num_warps=num_warps,
    )  # fmt: skip
    return dphi_part[0] if splits == 1 else dphi_part.sum(0)


def pre_backward(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
    h_pre: torch.Tensor, proj: torch.Tensor, rstd: torch.Tensor,
    du: torch.Tensor, dh_post: torch.Tensor, dh_res: torch.Tensor, iters: int,
    dx_accum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients ``dx [T, n, C], dphi [K, M] fp32, dalpha [3] fp32, dbias [M] fp32``.

    ``dx_accum`` (if given, ``[T, n, C]`` in x's dtype, owned by the caller) receives the
    result in place: the gradient reaching x through the post/res op, summed without an extra pass.
    """
    dlogit, dalpha_part, draw, coef = pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, iters)
    dx, dphi = pre_backward_apply(x, phi, h_pre, du, draw, coef, dx_accum)
    return dx, dphi, dalpha_part.sum(0), dlogit.sum(0)
