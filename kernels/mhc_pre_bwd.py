"""Backward of the fused mHC pre op: the reduce, apply and (optional) dphi kernels and their
launchers. The forward, the shapes and the per-token chain are described in :mod:`kernels.mhc_pre`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_pre_common import (
    MAX_PARTIALS, _dot_bf16, _interpreted, _load_proj, _logits, _num_sms, _pow2, _precision, _res_offsets,
    fit_loop_stages, launch_fitted, resident_programs, variant, wave_splits,
)  # fmt: skip
from .settings import LaunchSettings, launch_settings
from .sinkhorn import sinkhorn_bwd, sinkhorn_init


@triton.jit
def _pre_bwd_reduce_kernel(
    x_ptr, du_ptr, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, dh_post_ptr, dh_res_ptr, scratch_ptr,
    dlogit_ptr, dalpha_part_ptr, draw_ptr, coef_ptr,
    T, C,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    LOOP_STAGES: tl.constexpr, DSV4: tl.constexpr = False, HC_EPS: tl.constexpr = 0.0,
):  # fmt: skip
    # DSV4: the res block is worked on transposed (H_res's layout, see mhc_pre_common), and its
    # gradients are stored back transposed into proj's layout.
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
    for c0 in tl.range(0, C, BC, num_stages=LOOP_STAGES):
        cs = c0 + tl.arange(0, BC)
        cmask = cs < C
        du = tl.load(du_ptr + rows64[:, None] * C + cs[None, :], mask=row_mask[:, None] & cmask[None, :], other=0.0)
        x3 = tl.load(
            x_ptr + rows64[:, None, None] * K + i3 * C + cs[None, None, :], mask=xmask3 & cmask[None, None, :], other=0.0
        )
        dh_pre += tl.sum(x3.to(tl.float32) * du.to(tl.float32)[:, None, :], axis=2)

    p_pre, p_post, p_res, m2, valid = _load_proj(proj_ptr, rows64, row_mask, n, N, M, DSV4)
    l_pre, l_post, l_res = _logits(p_pre, p_post, p_res, alpha_ptr, bias_ptr, n, N, DSV4)
    s_pre = tl.sigmoid(l_pre)  # DSV4's + eps on H_pre has no gradient
    d_pre = tl.where(m2, dh_pre * s_pre * (1.0 - s_pre), 0.0)
    s_post = tl.sigmoid(l_post)
    dh_post = tl.load(dh_post_ptr + rows64[:, None] * n + i[None, :], mask=m2, other=0.0)
    d_post = tl.where(m2, dh_post * 2.0 * s_post * (1.0 - s_post), 0.0)
    res_off = rows64[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    dh_res = tl.load(dh_res_ptr + res_off, mask=valid, other=0.0)
    d_res = sinkhorn_bwd(
        sinkhorn_init(l_res, valid, DSV4), dh_res, valid, scratch_ptr, rows, row_mask, ITERS, N, DSV4, HC_EPS
    )
    d_res = tl.where(valid, d_res, 0.0)
    res_cols = 2 * n + _res_offsets(i, n, DSV4)  # [1, N, N]: where d_res's entries go in a row of M

    dl_base = dlogit_ptr + rows64[:, None] * M
    tl.store(dl_base + i[None, :], d_pre, mask=m2)
    tl.store(dl_base + n + i[None, :], d_post, mask=m2)
    tl.store(dl_base[:, :, None] + res_cols, d_res, mask=valid)
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
    tl.store(dr_base[:, :, None] + res_cols, a_res * d_res * rstd[:, None, None], mask=valid)


@triton.jit
def _pre_bwd_apply_kernel(
    x_ptr, du_ptr, phi_ptr, h_pre_ptr, draw_ptr, coef_ptr, g_ptr, h_res_ptr, dx_ptr, dphi_part_ptr,
    T, C, TT,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    ACCUMULATE: tl.constexpr, RES_GRAD: tl.constexpr, PRECISION: tl.constexpr, DPHI: tl.constexpr,
    DPHI_BF16: tl.constexpr, DPHI_LO: tl.constexpr, UPCAST: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    # One tile holds all n streams of a channel block side by side: column q is stream q // BC,
    # channel q % BC, i.e. row i*C + c of phi and column i*C + c of vec(x). du [BT, BC] and
    # H_pre [BT, N] are loaded once and broadcast into that layout (a per-column gather of them
    # cost 8x the load instructions of x and pushed the tile into spilling on sm_90).
    # RES_GRAD: also dx_i += sum_j H_res[j, i] g_j from g = dL/dx_next and H_res of the post/res op
    # (its backward then writes no dx: n C fewer elements written and read per token).
    split = tl.program_id(0)
    q = tl.arange(0, N * BC)
    qi = q // BC
    qc = tl.program_id(1) * BC + q % BC
    qmask = (qi < n) & (qc < C)
    krow = qi * C + qc
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cs < C
    si = tl.arange(0, N)
    smask = si < n
    cols = tl.arange(0, MP)
    col_mask = cols < M
    K = n * C
    phi_t = tl.load(
        phi_ptr + krow[None, :] * M + cols[:, None], mask=col_mask[:, None] & qmask[None, :], other=0.0
    ).to(tl.float32)  # [MP, N*BC]
    dphi = tl.zeros((N * BC, MP), dtype=tl.float32)
    t_start = split * TT
    t_end = tl.minimum(t_start + TT, T)
    for t0 in tl.range(t_start, t_end, BT, num_stages=LOOP_STAGES):
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < t_end
        rows64 = rows.to(tl.int64)
        tile_mask = row_mask[:, None] & qmask[None, :]
        x_off = rows64[:, None] * K + krow[None, :]
        x_raw = tl.load(x_ptr + x_off, mask=tile_mask, other=0.0)
        x2 = x_raw.to(tl.float32)
        # The per-stream mixes, [BT, N, BC] broadcasts laid out as the tile: H_pre du (+ H_res^T g)
        du = tl.load(du_ptr + rows64[:, None] * C + cs[None, :], mask=row_mask[:, None] & cmask[None, :], other=0.0)
        hp = tl.load(h_pre_ptr + rows64[:, None] * n + si[None, :], mask=row_mask[:, None] & smask[None, :], other=0.0)
        mix = hp[:, :, None] * du.to(tl.float32)[:, None, :]
        if RES_GRAD:
            for j in tl.static_range(n):
                g_off = rows64[:, None] * K + j * C + cs[None, :]
                g_j = tl.load(g_ptr + g_off, mask=row_mask[:, None] & cmask[None, :], other=0.0)
                h_row = tl.load(  # H_res[t, j, i] over i
                    h_res_ptr + rows64[:, None] * (n * n) + j * n + si[None, :],
                    mask=row_mask[:, None] & smask[None, :], other=0.0,
                )  # fmt: skip
                mix += h_row[:, :, None] * g_j.to(tl.float32)[:, None, :]
        mix = tl.reshape(mix, (BT, N * BC))
        draw = tl.load(
            draw_ptr + rows64[:, None] * M + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        dx = mix + coef[:, None] * x2 + tl.dot(draw, phi_t, input_precision=PRECISION)
        if ACCUMULATE:
            dx += tl.load(dx_ptr + x_off, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        if DPHI:
            if DPHI_BF16:
                # bf16 x as loaded, draw as a bf16 hi (+ lo) pair: wgmma takes bf16 operands in either
                # major order, where tf32 needs both transposed through shared memory. Without the lo
                # half, draw is rounded to bf16 as a bf16 Linear's weight gradient rounds dY.
                draw_hi = draw.to(tl.bfloat16)
                x_t = tl.trans(x_raw)
                dphi = _dot_bf16(x_t, draw_hi, dphi, UPCAST)
                if DPHI_LO:
                    dphi = _dot_bf16(x_t, (draw - draw_hi.to(tl.float32)).to(tl.bfloat16), dphi, UPCAST)
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
    DPHI_BF16: tl.constexpr, DPHI_LO: tl.constexpr, UPCAST: tl.constexpr,
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
            if DPHI_LO:
                acc = _dot_bf16(tl.trans(xt), (draw - draw_hi.to(tl.float32)).to(tl.bfloat16), acc, UPCAST)
        else:
            acc = tl.dot(tl.trans(xt.to(tl.float32)), draw, acc, input_precision=PRECISION)
    tl.store(
        dphi_part_ptr + split.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :],
        acc,
        mask=kmask[:, None] & col_mask[None, :],
    )


def pre_backward_reduce(
    x: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, proj: torch.Tensor, rstd: torch.Tensor,
    du: torch.Tensor, dh_post: torch.Tensor, dh_res: torch.Tensor, iters: int,
    block_t: int | None = None, block_c: int | None = None, num_warps: int | None = None, kind: str = "mhc",
    settings: LaunchSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward pass 1: ``(dlogit [T, M], dalpha_part [T, 3], draw [T, M], coef [T])``, all fp32.
    Block sizes default to the ``reduce_*`` launch settings (:func:`kernels.settings.launch_settings`);
    ``kind`` as in ``pre_forward``."""
    t, n, c = x.shape
    s = launch_settings(x.device, x.dtype, n, c, settings)
    block_t = block_t or s.reduce_block_t
    block_c = block_c or s.reduce_block_c
    num_warps = num_warps or s.reduce_warps
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
        n=n, N=nn_, M=m, ITERS=iters, BT=block_t, BC=min(block_c, _pow2(c, 16)),
        LOOP_STAGES=s.reduce_loop_stages, num_warps=num_warps, **variant(kind),
    )  # fmt: skip
    return dlogit, dalpha_part, draw, coef


def pre_backward_apply(
    x: torch.Tensor, phi: torch.Tensor, h_pre: torch.Tensor, du: torch.Tensor, draw: torch.Tensor,
    coef: torch.Tensor, dx_accum: torch.Tensor | None = None, fuse_dphi: bool | None = None,
    block_t: int | None = None, block_q: int | None = None, num_warps: int | None = None,
    dphi_bf16: bool | None = None, num_stages: int | None = None,
    res_grad: tuple[torch.Tensor, torch.Tensor] | None = None, settings: LaunchSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward pass 2: ``(dx [T, n, C], dphi [K, M] fp32)``; ``dx_accum`` receives dx in place if given.

    ``res_grad``: ``(g [T, n, C], h_res [T, n, n] fp32)`` of the post/res op that read the same x;
    ``H_res^T g`` (that op's dL/dx) is added to dx on the fly.

    ``block_q``: columns of the [block_t, n x channels] tile; the channel block is block_q / n.
    ``fuse_dphi``: accumulate dphi in the dx kernel (one read of x; the default) instead of in
    :func:`_pre_bwd_dphi_kernel` (a second read of x). ``dphi_bf16``: dphi's dots in bf16 (x as
    loaded, draw in bf16, plus its lo half if ``apply_dphi_lo``) rather than tf32. Defaults: the
    ``apply_*`` launch settings (:func:`kernels.settings.launch_settings`: the swept sizes for bf16 x
    with n <= 4, the device's wide ones otherwise).
    """
    t, n, c = x.shape
    m = 2 * n + n * n
    s = launch_settings(x.device, x.dtype, n, c, settings)
    fuse_dphi = s.apply_fuse_dphi if fuse_dphi is None else fuse_dphi
    dphi_bf16 = s.apply_dphi_bf16 if dphi_bf16 is None else dphi_bf16
    dphi_lo = s.apply_dphi_lo
    block_t = block_t or s.apply_block_t
    block_q = block_q or s.apply_block_q
    num_warps = num_warps or s.apply_warps
    num_stages = num_stages or s.apply_stages
    ns = _pow2(n)
    if block_q is None:
        block_q = 256 if _pow2(m, 16) <= 32 else 128  # n = 8: the [MP, q] phi tile is 4x wider
    block_c = min(max(16, block_q // ns), _pow2(c, 16))
    c_blocks = triton.cdiv(c, block_c)
    t_blocks = triton.cdiv(t, block_t)
    dx = dx_accum if dx_accum is not None else torch.empty_like(x)
    g, h_res = res_grad if res_grad is not None else (x, h_pre)  # stand-ins when RES_GRAD is off
    constexprs = dict(
        n=n, N=ns, M=m, MP=_pow2(m, 16), BT=block_t, BC=block_c, ACCUMULATE=dx_accum is not None,
        RES_GRAD=res_grad is not None,
        PRECISION=_precision(x.dtype), DPHI=fuse_dphi, DPHI_BF16=dphi_bf16 and x.dtype == torch.bfloat16,
        DPHI_LO=dphi_lo, UPCAST=_interpreted(), LOOP_STAGES=s.apply_loop_stages, num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
    )  # fmt: skip
    # Token splits: whole waves of resident programs (a partial last wave cost up to 20 % at C = 4096,
    # Nsight Compute on H100), at most 16 (each split writes a [K, M] dphi partial).
    def compile_args():  # a 1-element stand-in for dphi_part: compiles as the real launch will
        partial_like = torch.empty(1, device=x.device, dtype=torch.float32)
        return x, du, phi, h_pre, draw, coef, g, h_res, dx, partial_like, t, c, block_t

    dtypes = (x.dtype, du.dtype, phi.dtype, g.dtype, dx.dtype)
    constexprs = fit_loop_stages(_pre_bwd_apply_kernel, compile_args, dtypes, constexprs, x.device)
    slots = resident_programs(_pre_bwd_apply_kernel, compile_args, dtypes, constexprs, x.device)
    splits = wave_splits(c_blocks, min(t_blocks, MAX_PARTIALS), slots)
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)
    dphi_part = torch.empty((splits if fuse_dphi else 1, n * c, m), device=x.device, dtype=torch.float32)
    launch_fitted(
        _pre_bwd_apply_kernel, (splits, c_blocks),
        (x, du, phi, h_pre, draw, coef, g, h_res, dx, dphi_part, t, c, tokens_per_split), dtypes, constexprs, x.device,
    )  # fmt: skip
    if not fuse_dphi:
        return dx, pre_backward_dphi(x, draw, dphi_bf16=dphi_bf16, dphi_lo=dphi_lo)
    return dx, (dphi_part[0] if splits == 1 else dphi_part.sum(0))


def pre_backward_dphi(
    x: torch.Tensor, draw: torch.Tensor, block_t: int = 64, block_k: int = 128, num_warps: int = 4,
    dphi_bf16: bool | None = None, dphi_lo: bool | None = None, settings: LaunchSettings | None = None,
) -> torch.Tensor:
    """dphi = vec(x)^T draw ``[K, M]`` fp32; ``dphi_bf16`` / ``dphi_lo`` default to the launch settings'."""
    t, n, c = x.shape
    s = launch_settings(x.device, x.dtype, n, c, settings)
    k, m = n * c, draw.shape[1]
    k_blocks = triton.cdiv(k, block_k)
    t_blocks = triton.cdiv(t, block_t)
    splits = max(1, min(t_blocks, MAX_PARTIALS, triton.cdiv(2 * _num_sms(x.device), k_blocks)))
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)
    dphi_part = torch.empty((splits, k, m), device=x.device, dtype=torch.float32)
    _pre_bwd_dphi_kernel[(splits, k_blocks)](
        x, draw, dphi_part, t, k, tokens_per_split,
        M=m, MP=_pow2(m, 16), BT=block_t, BK=block_k, PRECISION=_precision(x.dtype),
        DPHI_BF16=(s.apply_dphi_bf16 if dphi_bf16 is None else dphi_bf16) and x.dtype == torch.bfloat16,
        DPHI_LO=s.apply_dphi_lo if dphi_lo is None else dphi_lo,
        UPCAST=_interpreted(), num_warps=num_warps,
    )  # fmt: skip
    return dphi_part[0] if splits == 1 else dphi_part.sum(0)


def pre_backward(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
    h_pre: torch.Tensor, proj: torch.Tensor, rstd: torch.Tensor,
    du: torch.Tensor, dh_post: torch.Tensor, dh_res: torch.Tensor, iters: int,
    dx_accum: torch.Tensor | None = None, res_grad: tuple[torch.Tensor, torch.Tensor] | None = None,
    kind: str = "mhc",
    settings: LaunchSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients ``dx [T, n, C], dphi [K, M] fp32, dalpha [3] fp32, dbias [M] fp32``.
    ``settings``: as resolved for the forward (default: looked up for x).

    ``kind`` ("mhc" or "dsv4") changes only the reduce kernel: the apply kernel works from H_pre
    (DSV4's + eps included, as the forward used it) and the per-token gradients.

    The gradient reaching x through the post/res op is summed into dx without an extra pass,
    given either as ``dx_accum`` (``[T, n, C]`` in x's dtype, owned by the caller: receives the
    result in place) or as that op's ``res_grad = (g, h_res)`` (see :func:`pre_backward_apply`).
    """
    s = launch_settings(x.device, x.dtype, x.shape[1], x.shape[2], settings)
    dlogit, dalpha_part, draw, coef = pre_backward_reduce(
        x, alpha, bias, proj, rstd, du, dh_post, dh_res, iters, kind=kind, settings=s
    )
    dx, dphi = pre_backward_apply(x, phi, h_pre, du, draw, coef, dx_accum, res_grad=res_grad, settings=s)
    return dx, dphi, dalpha_part.sum(0), dlogit.sum(0)
