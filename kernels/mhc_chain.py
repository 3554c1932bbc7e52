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
                       over tokens: one of them must go through partials; these are 20 floats a token).

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

from .mhc_pre_common import _dot_bf16, _interpreted, _num_sms, _pow2, resident_programs, wave_splits
from .settings import LaunchSettings


@triton.jit
def _chain_fwd_kernel(
    x_ptr, y_ptr, h_post_ptr, h_res_ptr, out_ptr, phi_ptr, part_ptr, ss_part_ptr,
    T, C, CS,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    UPCAST: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    split = tl.program_id(1)
    c_start = split * CS
    c_end = tl.minimum(c_start + CS, C)
    K = n * C
    i = tl.arange(0, N)
    m2 = row_mask[:, None] & (i < n)[None, :]
    q = tl.arange(0, N * BC)  # the [BT, N*BC] layout of a tile: column q is stream q // BC, channel q % BC
    qi = q // BC
    cols = tl.arange(0, MP)
    col_mask = cols < M
    h_post = tl.load(h_post_ptr + rows64[:, None] * n + i[None, :], mask=m2, other=0.0)
    acc_p = tl.zeros((BT, MP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for c0 in tl.range(c_start, c_end, BC, num_stages=LOOP_STAGES):
        cs = c0 + tl.arange(0, BC)
        cmask = cs < c_end
        tile_mask = row_mask[:, None] & cmask[None, :]
        # x_{l+1}: the arithmetic of _post_res_fwd_kernel, so that both give the same bits (recomputation
        # rebuilds x_{l+1} with that kernel)
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc = h_post[:, :, None] * y[:, None, :]  # [BT, N, BC]
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + rows64[:, None] * K + j * C + cs[None, :], mask=tile_mask, other=0.0)
            h_col = tl.load(h_res_ptr + rows64[:, None] * (n * n) + i[None, :] * n + j, mask=m2, other=0.0)
            acc += h_col[:, :, None] * xj.to(tl.float32)[:, None, :]
        x_next = acc.to(out_ptr.dtype.element_ty)
        out_off = rows64[:, None, None] * K + i[None, :, None] * C + cs[None, None, :]
        tl.store(out_ptr + out_off, x_next, mask=m2[:, :, None] & cmask[None, None, :])
        # pre_{l+1}'s projection partials over this chunk's K rows (i C + c), from the stored values
        xq = tl.reshape(x_next, (BT, N * BC))
        xf = xq.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        qc = c0 + q % BC
        kmask = (qi < n) & (qc < c_end)
        ph = tl.load(
            phi_ptr + (qi * C + qc)[:, None] * M + cols[None, :], mask=kmask[:, None] & col_mask[None, :], other=0.0
        )
        hi = ph.to(tl.bfloat16)
        lo = (ph - hi.to(tl.float32)).to(tl.bfloat16)
        acc_p = _dot_bf16(xq, hi, acc_p, UPCAST)
        acc_p = _dot_bf16(xq, lo, acc_p, UPCAST)
    part_off = split.to(tl.int64) * T * MP + rows64[:, None] * MP + cols[None, :]
    tl.store(part_ptr + part_off, acc_p, mask=row_mask[:, None])
    tl.store(ss_part_ptr + split.to(tl.int64) * T + rows64, ss, mask=row_mask)


@triton.jit
def _chain_bwd_kernel(
    x_ptr, y_ptr, h_post_ptr, h_res_ptr,
    du_ptr, phi_ptr, h_pre_ptr, draw_ptr, coef_ptr, g_ptr, h_res_next_ptr, dense_ptr,
    gout_ptr, dy_ptr, dh_post_part_ptr, dh_res_part_ptr, dphi_part_ptr,
    T, C, TT,
    n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    RES_GRAD: tl.constexpr, DENSE: tl.constexpr, UPCAST: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    # Grid (token splits, channel blocks), as the pre op's apply kernel: a program keeps one channel
    # block's phi_{l+1} rows and dphi accumulator and walks its tokens. Tiles are [BT, N*BC] (column q:
    # stream q // BC, channel q % BC) for the dots and [BT, N, BC] for the per-stream mixes.
    split = tl.program_id(0)
    cb = tl.program_id(1)
    q = tl.arange(0, N * BC)
    qi = q // BC
    qc = cb * BC + q % BC
    qmask = (qi < n) & (qc < C)
    krow = qi * C + qc
    cs = cb * BC + tl.arange(0, BC)
    cmask = cs < C
    si = tl.arange(0, N)
    smask = si < n
    jj = si[None, None, :]
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
        m2 = row_mask[:, None] & smask[None, :]
        tmask = row_mask[:, None] & cmask[None, :]
        tile_mask = row_mask[:, None] & qmask[None, :]
        # x_{l+1} rebuilt as the forward computed it (same arithmetic as _post_res_fwd_kernel)
        h_post = tl.load(h_post_ptr + rows64[:, None] * n + si[None, :], mask=m2, other=0.0)
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=tmask, other=0.0).to(tl.float32)
        acc = h_post[:, :, None] * y[:, None, :]
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + rows64[:, None] * K + j * C + cs[None, :], mask=tmask, other=0.0)
            h_col = tl.load(h_res_ptr + rows64[:, None] * (n * n) + si[None, :] * n + j, mask=m2, other=0.0)
            acc += h_col[:, :, None] * xj.to(tl.float32)[:, None, :]
        x_next = tl.reshape(acc.to(gout_ptr.dtype.element_ty), (BT, N * BC))
        # g_l = dL/dx_{l+1}: pre_{l+1}'s dx (as _pre_bwd_apply_kernel forms it) + what else reached x_{l+1}
        du = tl.load(du_ptr + rows64[:, None] * C + cs[None, :], mask=tmask, other=0.0)
        hp = tl.load(h_pre_ptr + rows64[:, None] * n + si[None, :], mask=m2, other=0.0)
        mix = hp[:, :, None] * du.to(tl.float32)[:, None, :]
        if RES_GRAD:
            for j in tl.static_range(n):
                g_j = tl.load(g_ptr + rows64[:, None] * K + j * C + cs[None, :], mask=tmask, other=0.0)
                h_row = tl.load(h_res_next_ptr + rows64[:, None] * (n * n) + j * n + si[None, :], mask=m2, other=0.0)
                mix += h_row[:, :, None] * g_j.to(tl.float32)[:, None, :]
        draw = tl.load(
            draw_ptr + rows64[:, None] * M + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        x_off = rows64[:, None] * K + krow[None, :]
        g = tl.reshape(mix, (BT, N * BC)) + coef[:, None] * x_next.to(tl.float32)
        g += tl.dot(draw, phi_t, input_precision="tf32")
        if DENSE:
            g += tl.load(dense_ptr + x_off, mask=tile_mask, other=0.0).to(tl.float32)
        g_out = g.to(gout_ptr.dtype.element_ty)
        tl.store(gout_ptr + x_off, g_out, mask=tile_mask)
        # dphi_{l+1} += x_{l+1}^T draw: draw rounded to bf16, as the apply kernel's default
        dphi = _dot_bf16(tl.trans(x_next), draw.to(tl.bfloat16), dphi, UPCAST)
        # post/res_l's backward from the stored g_l (as _post_res_bwd_kernel reads it)
        g3 = tl.reshape(g_out.to(tl.float32), (BT, N, BC))
        dy = tl.sum(h_post[:, :, None] * g3, axis=1)
        tl.store(dy_ptr + rows64[:, None] * C + cs[None, :], dy.to(dy_ptr.dtype.element_ty), mask=tmask)
        dh_post = tl.sum(g3 * y[:, None, :], axis=2)
        dh_res = tl.zeros((BT, N, N), dtype=tl.float32)
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + rows64[:, None] * K + j * C + cs[None, :], mask=tmask, other=0.0).to(tl.float32)
            part = tl.sum(g3 * xj[:, None, :], axis=2)  # [BT, N]: <g_i, x_j> over this channel block
            dh_res += tl.where(jj == j, part[:, :, None], 0.0)
        base = cb.to(tl.int64) * T + rows64
        tl.store(dh_post_part_ptr + base[:, None] * n + si[None, :], dh_post, mask=m2)
        res_off = base[:, None, None] * (n * n) + si[None, :, None] * n + si[None, None, :]
        tl.store(dh_res_part_ptr + res_off, dh_res, mask=m2[:, :, None] & smask[None, None, :])
    tl.store(
        dphi_part_ptr + split.to(tl.int64) * K * M + krow[:, None] * M + cols[None, :],
        dphi,
        mask=qmask[:, None] & col_mask[None, :],
    )


def chain_supported(x: torch.Tensor, settings: LaunchSettings) -> bool:
    """Whether the junction kernels take ``x [.., n, C]``: bf16 streams with n <= 4 (2n + n^2 <= 32
    projection columns, the tile sizes swept), and the ``chain`` setting on."""
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
        n=n, N=_pow2(n, 2), M=m, MP=mp, BT=bt, BC=bc, UPCAST=_interpreted(), LOOP_STAGES=s.chain_fwd_loop_stages,
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
    block_c = min(max(16, s.chain_bwd_block_q // ns), _pow2(c, 16))
    c_blocks, t_blocks = triton.cdiv(c, block_c), triton.cdiv(t, block_t)
    f32 = dict(device=x.device, dtype=torch.float32)
    g_out = torch.empty_like(x)
    dy = torch.empty_like(y)
    dh_post = torch.empty((c_blocks, t, n), **f32)
    dh_res = torch.empty((c_blocks, t, n, n), **f32)
    g, h_res_next = res_grad if res_grad is not None else (x, h_res)  # stand-ins when RES_GRAD is off
    constexprs = dict(
        n=n, N=ns, M=m, MP=_pow2(m, 16), BT=block_t, BC=block_c, RES_GRAD=res_grad is not None,
        DENSE=dense is not None, UPCAST=_interpreted(), LOOP_STAGES=s.chain_bwd_loop_stages, num_warps=s.chain_bwd_warps,
    )  # fmt: skip
    dense = x if dense is None else dense

    def compile_args():  # a 1-element stand-in for dphi_part: compiles as the real launch will
        partial_like = torch.empty(1, **f32)
        return (x, y, h_post, h_res, du, phi, h_pre, draw, coef, g, h_res_next, dense, g_out, dy, dh_post, dh_res,
                partial_like, t, c, block_t)  # fmt: skip

    slots = resident_programs(_chain_bwd_kernel, compile_args, (x.dtype, phi.dtype, g.dtype), constexprs, x.device)
    splits = wave_splits(c_blocks, min(t_blocks, 16), slots)  # whole waves; at most 16 dphi partials
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)
    dphi = torch.empty((splits, n * c, m), **f32)
    _chain_bwd_kernel[(splits, c_blocks)](
        x, y, h_post, h_res, du, phi, h_pre, draw, coef, g, h_res_next, dense, g_out, dy, dh_post, dh_res, dphi,
        t, c, tokens_per_split, **constexprs,
    )  # fmt: skip
    return g_out, dy, dh_post.sum(0), dh_res.sum(0), (dphi[0] if splits == 1 else dphi.sum(0))
