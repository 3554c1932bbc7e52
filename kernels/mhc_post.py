"""Fused mHC 'post + res' op: x_next = H_res x + H_post^T ⊗ y, forward and backward (docs/DESIGN.md §4).

Reference twin: :func:`kernels.reference.post_res`.

Shapes (T tokens, n streams, C channels):
    x: [T, n, C], y: [T, C] stream dtype;  h_post: [T, n], h_res: [T, n, n] fp32
    x_next: [T, n, C] stream dtype

Kernels, each on a grid (token blocks, channel splits) whose programs loop over channel chunks,
the loads issued a chunk ahead (``tl.range(num_stages=...)``, cp.async into shared memory):
    _post_res_fwd_kernel  one read of x and y, one write.
    _post_res_bwd_kernel  from g = dL/dx_next, in one pass dy = H_post g, the per-token reductions
                          over C dH_post = <g_i, y>, dH_res[i, j] = <g_i, x_j> (partials per split)
                          and, unless the mHC pre op's backward forms it, dx = H_res^T g.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import mhc_pre_common
from .mhc_pre_common import _pow2
from .settings import LaunchSettings, launch_settings


@triton.jit
def _post_res_fwd_kernel(
    x_ptr, y_ptr, h_post_ptr, h_res_ptr, out_ptr,
    T, C, CS,
    n: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    c_start = tl.program_id(1) * CS
    c_end = tl.minimum(c_start + CS, C)
    i = tl.arange(0, N)
    m2 = row_mask[:, None] & (i < n)[None, :]
    h_post = tl.load(h_post_ptr + rows64[:, None] * n + i[None, :], mask=m2, other=0.0)
    for c0 in tl.range(c_start, c_end, BC, num_stages=LOOP_STAGES):  # loads a chunk ahead (cp.async)
        cs = c0 + tl.arange(0, BC)
        cmask = cs < c_end
        tile_mask = row_mask[:, None] & cmask[None, :]
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc = h_post[:, :, None] * y[:, None, :]  # [BT, N, BC]
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + rows64[:, None] * (n * C) + j * C + cs[None, :], mask=tile_mask, other=0.0)
            # H_res[:, j]
            h_col = tl.load(h_res_ptr + rows64[:, None] * (n * n) + i[None, :] * n + j, mask=m2, other=0.0)
            acc += h_col[:, :, None] * xj.to(tl.float32)[:, None, :]
        out_off = rows64[:, None, None] * (n * C) + i[None, :, None] * C + cs[None, None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m2[:, :, None] & cmask[None, None, :])


@triton.jit
def _post_res_bwd_kernel(
    g_ptr, x_ptr, y_ptr, h_post_ptr, h_res_ptr, dx_ptr, dy_ptr, dh_post_part_ptr, dh_res_part_ptr,
    T, C, CS,
    n: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, WRITE_DX: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    split = tl.program_id(1)
    c_start = split * CS
    c_end = tl.minimum(c_start + CS, C)
    i = tl.arange(0, N)
    m2 = row_mask[:, None] & (i < n)[None, :]
    h_post = tl.load(h_post_ptr + rows64[:, None] * n + i[None, :], mask=m2, other=0.0)
    dh_post = tl.zeros((BT, N), dtype=tl.float32)
    dh_res = tl.zeros((BT, N, N), dtype=tl.float32)
    jj = i[None, None, :]
    for c0 in tl.range(c_start, c_end, BC, num_stages=LOOP_STAGES):  # loads a chunk ahead (cp.async)
        cs = c0 + tl.arange(0, BC)
        cmask = cs < c_end
        tile_mask = row_mask[:, None] & cmask[None, :]
        g_off = rows64[:, None, None] * (n * C) + i[None, :, None] * C + cs[None, None, :]
        g = tl.load(g_ptr + g_off, mask=m2[:, :, None] & cmask[None, None, :], other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dy = tl.sum(h_post[:, :, None] * g, axis=1)
        tl.store(dy_ptr + rows64[:, None] * C + cs[None, :], dy.to(dy_ptr.dtype.element_ty), mask=tile_mask)
        dh_post += tl.sum(g * y[:, None, :], axis=2)
        for j in tl.static_range(n):  # unrolled: the chunk loop is then innermost, which the pipeliner needs
            xj_off = rows64[:, None] * (n * C) + j * C + cs[None, :]
            xj = tl.load(x_ptr + xj_off, mask=tile_mask, other=0.0).to(tl.float32)
            if WRITE_DX:
                h_col = tl.load(h_res_ptr + rows64[:, None] * (n * n) + i[None, :] * n + j, mask=m2, other=0.0)
                dxj = tl.sum(h_col[:, :, None] * g, axis=1)  # sum_i H_res[i, j] g_i
                tl.store(dx_ptr + xj_off, dxj.to(dx_ptr.dtype.element_ty), mask=tile_mask)
            part = tl.sum(g * xj[:, None, :], axis=2)  # [BT, N]: <g_i, x_j> over this chunk
            dh_res += tl.where(jj == j, part[:, :, None], 0.0)
    base = split.to(tl.int64) * T
    tl.store(dh_post_part_ptr + (base + rows64)[:, None] * n + i[None, :], dh_post, mask=m2)
    res_off = (base + rows64)[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    tl.store(dh_res_part_ptr + res_off, dh_res, mask=m2[:, :, None] & (i < n)[None, None, :])


def _tiling(n: int, t: int, c: int, block_c: int, values: int, device: torch.device) -> tuple[int, int, int, int]:
    """(block_t, block_c, channel splits, channels per split) for [BT, n, BC] tiles of about ``values``
    fp32 values; C is split across programs only when the token blocks alone do not fill the chip (small T)."""
    block_c = min(block_c, _pow2(c, 16))
    block_t = max(1, values // (_pow2(n, 2) * block_c))
    c_blocks = triton.cdiv(c, block_c)
    splits = max(1, min(c_blocks, triton.cdiv(2 * mhc_pre_common._num_sms(device), triton.cdiv(t, block_t))))
    per_split = triton.cdiv(c_blocks, splits) * block_c
    return block_t, block_c, triton.cdiv(c, per_split), per_split


def post_res_forward(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, settings: LaunchSettings | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [T, n, C], y [T, C], h_post [T, n] fp32, h_res [T, n, n] fp32`` (contiguous) -> x_next, into
    ``out`` (contiguous, x's shape) if given. Block sizes: the ``post_fwd_*`` launch settings (default:
    looked up for x)."""
    t, n, c = x.shape
    s = launch_settings(x.device, x.dtype, n, c, settings)
    block_t, block_c, splits, per_split = _tiling(n, t, c, s.post_fwd_block_c, s.post_fwd_tile_values, x.device)
    out = torch.empty_like(x) if out is None else out
    _post_res_fwd_kernel[(triton.cdiv(t, block_t), splits)](
        x, y, h_post, h_res, out, t, c, per_split, n=n, N=_pow2(n, 2), BT=block_t, BC=block_c,
        LOOP_STAGES=s.post_fwd_loop_stages, num_warps=s.post_fwd_warps,
    )  # fmt: skip
    return out


def post_res_backward(
    g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor,
    write_dx: bool = True, settings: LaunchSettings | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``g = dL/dx_next [T, n, C]`` -> ``dx [T, n, C], dy [T, C], dh_post [T, n] fp32, dh_res [T, n, n] fp32``.

    ``write_dx=False``: dx (= H_res^T g) is left to the caller (None), e.g. to the mHC pre op's
    backward, which forms it while writing its own gradient of the same x. Block sizes: the
    ``post_bwd_*`` launch settings (default: looked up for x)."""
    t, n, c = x.shape
    s = launch_settings(x.device, x.dtype, n, c, settings)
    block_t, block_c, splits, per_split = _tiling(n, t, c, s.post_bwd_block_c, s.post_bwd_tile_values, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if write_dx else None
    dy = torch.empty_like(y)
    dh_post = torch.empty((splits, t, n), **f32)
    dh_res = torch.empty((splits, t, n, n), **f32)
    _post_res_bwd_kernel[(triton.cdiv(t, block_t), splits)](
        g, x, y, h_post, h_res, x if dx is None else dx, dy, dh_post, dh_res, t, c, per_split,  # x: never written
        n=n, N=_pow2(n, 2), BT=block_t, BC=block_c, WRITE_DX=write_dx, LOOP_STAGES=s.post_bwd_loop_stages,
        num_warps=s.post_bwd_warps,
    )  # fmt: skip
    if splits > 1:
        return dx, dy, dh_post.sum(0), dh_res.sum(0)
    return dx, dy, dh_post[0], dh_res[0]
