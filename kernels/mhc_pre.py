"""Fused mHC 'pre' op: x -> (u, H_post, H_res), forward and backward (docs/DESIGN.md §4).

Reference twin: :func:`kernels.reference.mhc_pre` (``rms_project`` ->
``mappings_from_proj`` -> ``pre_aggregate``).

Shapes (T tokens, n streams, C channels, K = n*C, M = 2n + n²):
    x:     [T, n, C]  stream dtype (bf16 / fp16 / fp32), read as vec(x) [T, K]
    phi:   [K, M]     pre | post | res columns
    u:     [T, C]     stream dtype
    h_pre, h_post: [T, n] fp32;  h_res: [T, n, n] fp32
    proj:  [T, M] fp32 (x' @ phi, 1/rms folded in), rstd: [T] fp32  -- saved for backward

Files: forward here, backward in :mod:`kernels.mhc_pre_bwd`, the on-chip mapping code shared by
both in :mod:`kernels.mhc_pre_common`, launch settings in :mod:`kernels.settings`.

Kernels (block sizes: :func:`kernels.settings.launch_settings`, from the sweeps in
benchmarks/results/kernels_sweep_*):
    _pre_fwd_kernel         one program per BT tokens: one sweep over vec(x) gives the sum of squares
                            and x @ phi (tensor cores, tf32); then sigmoid, 2 sigmoid and Sinkhorn
                            on-chip. With AGGREGATE it also writes u = H_pre x in a second pass
                            over its tokens (hoping for L2 hits: measured 10 % slower on H100).
    _pre_fwd_partial_kernel the K-split option (settings ``fwd_split``, bf16 x): grid (token blocks,
                            K splits), x @ phi as bf16 dots against phi's hi + lo halves (split
                            on-chip), partial sums per K split;
    _pre_fwd_finish_aggregate_kernel  then u = H_pre x on a (token, channel) grid, each program
                            summing the partials it needs; channel block 0 also runs 1/rms, the
                            mappings and Sinkhorn. See benchmarks/NOTES_kernels.md for timings.
    _pre_aggregate_kernel   u = H_pre x on a (token, channel) grid: the default second read of x.
    _pre_bwd_reduce_kernel  one program per BT tokens: dH_pre = <du, x_i> over C, then every
                            per-token scalar of the backward (Sinkhorn backward by recompute).
    _pre_bwd_apply_kernel   grid (token splits, channel blocks): dx = H_pre du + draw @ phi^T
                            + coef x + the post/res gradient (H_res^T g formed from the post/res op's
                            g, or a dense one accumulated in place), and by default a partial
                            dphi = x^T draw per token split (bf16 dots for bf16 x and draw rounded to
                            bf16, or hi + lo with ``apply_dphi_lo``). Its token loop issues each
                            tile's loads a tile ahead (``apply_loop_stages``).
    _pre_bwd_dphi_kernel    the alternative: dphi as its own GEMM over tokens (one more read of x).
The per-token chain of the backward:  dlogit -> dproj = alpha dlogit -> draw = dproj * rstd,
d rstd = <dproj, proj> / rstd -> coef = -d rstd * rstd^3 / K  (dx += coef * x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_pre_bwd import pre_backward, pre_backward_apply, pre_backward_dphi, pre_backward_reduce  # noqa: F401
from .mhc_pre_common import (
    MAX_PARTIALS, _dot_bf16, _h_pre, _interpreted, _load_proj, _logits, _mappings, _num_sms, _pow2, _precision,
    resident_programs, variant, wave_splits,
)  # fmt: skip
from .settings import LaunchSettings, launch_settings


@triton.jit
def _pre_fwd_kernel(
    x_ptr, phi_ptr, alpha_ptr, bias_ptr,
    u_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, proj_ptr, rstd_ptr,
    T, C, eps,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, AGGREGATE: tl.constexpr,
    DSV4: tl.constexpr = False, HC_EPS: tl.constexpr = 0.0,  # defaults: mhc, for direct launches
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
        rows, row_mask, n, N, M, MP, ITERS, DSV4, HC_EPS,
    )  # fmt: skip
    if AGGREGATE:
        _aggregate_rows(x_ptr, u_ptr, h_pre, rows64, row_mask, C, n, N, BC)


@triton.jit
def _pre_fwd_partial_kernel(
    x_ptr, phi_ptr, part_ptr, ss_part_ptr,
    T, K, KS,
    M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Split forward, pass 1, grid (token blocks, K splits): partial sum of squares and x @ phi over K/splits.

    bf16 x meets phi as a bf16 hi + lo pair split on-chip from the fp32 tile: two bf16 dots per
    tile, error ~2^-17 of phi (tf32 rounds phi to 2^-11), x fed to the tensor cores as loaded.
    Splitting K lets a program take 64-128 tokens (phi re-read from L2 once per token block,
    not per 32 tokens) while the grid still fills the chip.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    split = tl.program_id(1)
    cols = tl.arange(0, MP)
    col_mask = cols < M
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
        ph = tl.load(phi_ptr + ks[:, None] * M + cols[None, :], mask=kmask[:, None] & col_mask[None, :], other=0.0)
        hi = ph.to(tl.bfloat16)
        lo = (ph - hi.to(tl.float32)).to(tl.bfloat16)
        acc = _dot_bf16(xk, hi, acc, UPCAST)
        acc = _dot_bf16(xk, lo, acc, UPCAST)
    part_off = split.to(tl.int64) * T * MP + rows64[:, None] * MP + cols[None, :]
    tl.store(part_ptr + part_off, acc, mask=row_mask[:, None])
    tl.store(ss_part_ptr + split.to(tl.int64) * T + rows64, ss, mask=row_mask)


@triton.jit
def _pre_fwd_finish_aggregate_kernel(
    part_ptr, ss_part_ptr, x_ptr, alpha_ptr, bias_ptr,
    u_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, proj_ptr, rstd_ptr,
    T, C, SPLITS, eps,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, DSV4: tl.constexpr = False, HC_EPS: tl.constexpr = 0.0,
):  # fmt: skip
    """Split forward, pass 2, grid (token blocks, channel blocks): u = H_pre x for one tile.

    Every program sums the K-split partials of the pre columns (n + 1 floats per token and
    split, from L2) to get 1/rms and H_pre; the channel block 0 program also finishes the rest:
    all projections, H_post, Sinkhorn, and the stores of what the backward keeps.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    K = n * C
    i = tl.arange(0, N)
    m2 = row_mask[:, None] & (i < n)[None, :]
    pre = tl.zeros((BT, N), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for s in range(SPLITS):
        srows = rows64 + s * T  # T may arrive as the constant 1 (Triton specialises it): no T.to()
        pre += tl.load(part_ptr + srows[:, None] * MP + i[None, :], mask=m2, other=0.0)
        ss += tl.load(ss_part_ptr + srows, mask=row_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(ss / K + eps)
    if tl.program_id(1) == 0:
        cols = tl.arange(0, MP)
        acc = tl.zeros((BT, MP), dtype=tl.float32)
        for s in range(SPLITS):
            srows = rows64 + s * T
            acc += tl.load(part_ptr + srows[:, None] * MP + cols[None, :], mask=row_mask[:, None], other=0.0)
        _mappings(
            acc * rstd[:, None], rstd, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
            rows, row_mask, n, N, M, MP, ITERS, DSV4, HC_EPS,
        )  # fmt: skip
    # the same arithmetic as _mappings' H_pre, so u agrees with the stored h_pre
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    b_pre = tl.load(bias_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    h_pre = _h_pre(a_pre * (pre * rstd[:, None]) + b_pre[None, :], m2, DSV4, HC_EPS)
    _aggregate_tile(x_ptr, u_ptr, h_pre, rows64, row_mask, tl.program_id(1) * BC + tl.arange(0, BC), C, n, N)


@triton.jit
def _aggregate_tile(x_ptr, u_ptr, h_pre, rows64, row_mask, cs, C, n: tl.constexpr, N: tl.constexpr):
    """u = H_pre x for one (token block, channel block) tile: h_pre [BT, N] fp32, channels ``cs``."""
    i = tl.arange(0, N)
    cmask = cs < C
    x3 = tl.load(
        x_ptr + rows64[:, None, None] * (n * C) + i[None, :, None] * C + cs[None, None, :],
        mask=row_mask[:, None, None] & (i < n)[None, :, None] & cmask[None, None, :],
        other=0.0,
    )
    u = tl.sum(h_pre[:, :, None] * x3.to(tl.float32), axis=1)
    u_mask = row_mask[:, None] & cmask[None, :]
    tl.store(u_ptr + rows64[:, None] * C + cs[None, :], u.to(u_ptr.dtype.element_ty), mask=u_mask)


@triton.jit
def _aggregate_rows(x_ptr, u_ptr, h_pre, rows64, row_mask, C, n: tl.constexpr, N: tl.constexpr, BC: tl.constexpr):
    """u = H_pre x over all of C for one token block; last chunk first (likeliest still in L2)."""
    nchunks = tl.cdiv(C, BC)
    for back in range(nchunks):
        _aggregate_tile(x_ptr, u_ptr, h_pre, rows64, row_mask, (nchunks - 1 - back) * BC + tl.arange(0, BC), C, n, N)


@triton.jit
def _pre_aggregate_kernel(
    x_ptr, h_pre_ptr, u_ptr, T, C, n: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr
):
    """u = H_pre x on a (token block, channel block) grid: the second read of x, from HBM, fully parallel."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    i = tl.arange(0, N)
    h_pre = tl.load(h_pre_ptr + rows64[:, None] * n + i[None, :], mask=row_mask[:, None] & (i < n)[None, :], other=0.0)
    _aggregate_tile(x_ptr, u_ptr, h_pre, rows64, row_mask, tl.program_id(1) * BC + tl.arange(0, BC), C, n, N)


def pre_forward(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float,
    block_t: int | None = None, block_k: int | None = None, num_warps: int | None = None,
    fuse_aggregate: bool = False, agg_block_t: int | None = None, agg_block_c: int = 256,
    split: bool | None = None, num_stages: int | None = None, k_splits: int | None = None, kind: str = "mhc",
    settings: LaunchSettings | None = None, partials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Launch the forward on ``x [T, n, C]`` (contiguous). Returns ``u, h_pre, h_post, h_res, proj, rstd``.

    ``kind``: the residual kind's mappings, "mhc" or "dsv4" (:func:`mhc_pre_common.variant`).
    ``settings``: launch settings (default: :func:`kernels.settings.launch_settings` for x); the
    keyword arguments below override them one by one.
    ``split`` (default ``settings.fwd_split``, bf16 x only): the K-split pair
    :func:`_pre_fwd_partial_kernel` + :func:`_pre_fwd_finish_aggregate_kernel`; otherwise
    :func:`_pre_fwd_kernel` (one program per ``block_t`` tokens over all of K, tf32 dots).
    ``fuse_aggregate`` (single kernel only): compute u inside the mapping kernel (second pass over
    each token block, hoping for L2 hits) instead of in :func:`_pre_aggregate_kernel` on a 2-D grid.
    ``partials``: the K-split projection partials ``(part [S, T, MP], ss_part [S, T])`` already summed
    over a partition of K (the junction of :mod:`kernels.mhc_chain` computes them while writing x):
    only the finish + aggregate kernel runs.
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
    s = launch_settings(x.device, x.dtype, n, c, settings)
    split = s.fwd_split if split is None else split
    if partials is not None:
        part, ss_part = partials
        _finish_aggregate(part, ss_part, x, alpha, bias, u, h_pre, h_post, h_res, proj, rstd, iters, eps, kind,
                          agg_block_t, agg_block_c)  # fmt: skip
        return u, h_pre, h_post, h_res, proj, rstd
    if split and x.dtype == torch.bfloat16 and not fuse_aggregate:
        # n = 8 (MP = 128): a [128, 128] fp32 accumulator is too many registers; halve the tokens
        bt = block_t or (s.fwd_block_t if mp <= 32 else 64)
        bk = block_k or s.fwd_block_k
        if mp > 32:  # n = 8's 128-wide phi tiles: block_k 128 asked 233 KB of shared memory (H100: 227 KB)
            bk = min(bk, 64)
        t_blocks = triton.cdiv(t, bt)
        constexprs = dict(
            M=m, MP=mp, BT=bt, BK=bk, UPCAST=_interpreted(), num_warps=num_warps or (s.fwd_warps if mp <= 32 else 8),
            num_stages=num_stages or s.fwd_stages,
        )  # fmt: skip
        k_splits = k_splits or s.fwd_k_splits
        if k_splits is None:  # the resident programs evenly loaded, each at least 4 K-blocks long
            # (as the apply's token splits: on an H200 at T = 8192, 6 splits = 384 programs on 396 slots ran 4-5 %
            # faster than 5 = 320, two or three an SM; benchmarks/results/kernels_retune_h200/)
            def compile_args():  # 1-element stand-ins for the partials: compiles as the real launch will
                stand_in = torch.empty(1, device=x.device, dtype=torch.float32)
                return x, phi, stand_in, stand_in, t, k, bk

            slots = resident_programs(_pre_fwd_partial_kernel, compile_args, (x.dtype, phi.dtype), constexprs, x.device)
            # at most MAX_PARTIALS (uncapped, the rule took 37 at C 4096 and ran 1.7x slower), unless few tokens
            # need more splits for ~2 programs an SM (the rule before: T 1024 keeps its 32 splits)
            most = max(MAX_PARTIALS, triton.cdiv(2 * _num_sms(x.device), t_blocks))
            k_splits = wave_splits(t_blocks, min(triton.cdiv(k, 4 * bk), most), slots)
        ks = triton.cdiv(triton.cdiv(k, k_splits), bk) * bk
        k_splits = triton.cdiv(k, ks)
        part = torch.empty((k_splits, t, mp), **f32)
        ss_part = torch.empty((k_splits, t), **f32)
        _pre_fwd_partial_kernel[(t_blocks, k_splits)](x, phi, part, ss_part, t, k, ks, **constexprs)
        _finish_aggregate(part, ss_part, x, alpha, bias, u, h_pre, h_post, h_res, proj, rstd, iters, eps, kind,
                          agg_block_t, agg_block_c)  # fmt: skip
        return u, h_pre, h_post, h_res, proj, rstd
    bt = block_t or 32
    if block_k is None:  # fp32 x (tf32x3 dots) at 128 spilled (sm_90, benchmarks/kernel_resources.py)
        block_k = 128 if mp <= 32 and x.dtype != torch.float32 else 64
    if num_warps is None:
        num_warps = 4 if mp <= 32 else 8
    _pre_fwd_kernel[(triton.cdiv(t, bt),)](
        x, phi, alpha, bias, u, h_pre, h_post, h_res, proj, rstd, t, c, eps,
        n=n, N=nn_, M=m, MP=mp, ITERS=iters, BT=bt, BK=block_k, BC=min(128, _pow2(c, 16)),
        PRECISION=_precision(x.dtype), AGGREGATE=fuse_aggregate, num_warps=num_warps, **variant(kind),
    )  # fmt: skip
    if not fuse_aggregate:
        pre_aggregate(x, h_pre, out=u, block_t=agg_block_t, block_c=agg_block_c)
    return u, h_pre, h_post, h_res, proj, rstd


def _finish_aggregate(
    part, ss_part, x, alpha, bias, u, h_pre, h_post, h_res, proj, rstd, iters, eps, kind, block_t, block_c
) -> None:
    """The split forward's second launch: from the K-split partials, the mappings and u (into the outputs)."""
    t, n, c = x.shape
    nn_ = _pow2(n, 2)
    m = 2 * n + n * n
    bt = block_t or max(1, 16 // nn_)
    bc = min(block_c, _pow2(c, 16))
    _pre_fwd_finish_aggregate_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc))](
        part, ss_part, x, alpha, bias, u, h_pre, h_post, h_res, proj, rstd, t, c, part.shape[0], eps,
        n=n, N=nn_, M=m, MP=_pow2(m, 16), ITERS=iters, BT=bt, BC=bc, num_warps=4, **variant(kind),
    )  # fmt: skip


def pre_aggregate(
    x: torch.Tensor, h_pre: torch.Tensor, out: torch.Tensor | None = None, block_t: int | None = None,
    block_c: int = 256,
) -> torch.Tensor:
    """u = H_pre x for ``x [T, n, C]`` (contiguous) and ``h_pre [T, n]`` fp32 -> ``u [T, C]`` in x's dtype.

    The same tile code (:func:`_aggregate_tile`) as the forward's fused aggregate, so recomputation
    rebuilds u bit for bit from the forward's h_pre."""
    t, n, c = x.shape
    nn_ = _pow2(n, 2)
    u = torch.empty((t, c), device=x.device, dtype=x.dtype) if out is None else out
    bt = block_t or max(1, 16 // nn_)  # [BT, N, BC] tile of ~4K values
    bc = min(block_c, _pow2(c, 16))
    _pre_aggregate_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc))](
        x, h_pre, u, t, c, n=n, N=nn_, BT=bt, BC=bc, num_warps=4
    )
    return u
