"""Sinkhorn-Knopp on-chip, forward and backward, for a block of tokens (docs/DESIGN.md §4).

Reference twin: :func:`kernels.reference.sinkhorn` (T_c then T_r, ``iters`` rounds,
max-shifted exp). These are ``@triton.jit`` helpers called from the mHC pre kernels;
each works on a register tile ``[BT, N, N]`` (``N`` = n padded to a power of two,
padded rows/columns masked to zero) in float32.

Backward without storing iterates: the forward is recomputed and only the
normalisers of every half-step (``2 * iters`` vectors of ``N`` floats per token)
go to a small scratch buffer. Walking back, each half-step ``B = A / s`` is
undone exactly as ``A = B * s`` and its gradient is ``dA = (dB - <dB, B>) / s``,
the inner product taken along the normalised axis.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sinkhorn_init(logits, valid):
    """exp(logits - max) over each token's valid n x n entries; zero elsewhere. ``logits``: [BT, N, N]."""
    shifted = tl.where(valid, logits, float("-inf"))
    mx = tl.max(tl.max(shifted, axis=2), axis=1)  # [BT]
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # tokens past T have no valid entry
    return tl.where(valid, tl.exp(shifted - mx[:, None, None]), 0.0)


@triton.jit
def sinkhorn_fwd(m, ITERS: tl.constexpr):
    """``ITERS`` rounds of column- then row-normalisation of ``m`` [BT, N, N] (already exp'd)."""
    for _it in range(ITERS):
        cs = tl.sum(m, axis=1)  # [BT, N] column sums
        cs = tl.where(cs > 0, cs, 1.0)  # padded columns are all zero
        m = m * (1.0 / cs)[:, None, :]
        rs = tl.sum(m, axis=2)  # [BT, N] row sums
        rs = tl.where(rs > 0, rs, 1.0)
        m = m * (1.0 / rs)[:, :, None]
    return m


@triton.jit
def sinkhorn_bwd(m0, grad, valid, scratch_ptr, rows, row_mask, ITERS: tl.constexpr, N: tl.constexpr):
    """Gradient w.r.t. the logits, given ``m0 = sinkhorn_init(logits)`` and ``grad`` = dL/dH_res, both [BT, N, N].

    ``scratch_ptr`` points at a float32 buffer of ``[T, 2 * ITERS, N]``; ``rows`` [BT] are
    this block's token indices and ``row_mask`` [BT] which of them exist.
    """
    k_idx = tl.arange(0, N)
    base = scratch_ptr + rows[:, None] * (2 * ITERS * N) + k_idx[None, :]  # [BT, N]
    smask = row_mask[:, None]
    m = m0
    for it in range(ITERS):
        cs = tl.sum(m, axis=1)
        cs = tl.where(cs > 0, cs, 1.0)
        tl.store(base + (2 * it) * N, cs, mask=smask)
        m = m * (1.0 / cs)[:, None, :]
        rs = tl.sum(m, axis=2)
        rs = tl.where(rs > 0, rs, 1.0)
        tl.store(base + (2 * it + 1) * N, rs, mask=smask)
        m = m * (1.0 / rs)[:, :, None]
    # The normalisers are read back below by other threads of this program.
    tl.debug_barrier()
    g = tl.where(valid, grad, 0.0)
    for back in range(ITERS):
        it = ITERS - 1 - back
        rs = tl.load(base + (2 * it + 1) * N, mask=smask, other=1.0)
        inner = tl.sum(g * m, axis=2)  # [BT, N]
        g = (g - inner[:, :, None]) * (1.0 / rs)[:, :, None]
        m = m * rs[:, :, None]
        cs = tl.load(base + (2 * it) * N, mask=smask, other=1.0)
        inner = tl.sum(g * m, axis=1)
        g = (g - inner[:, None, :]) * (1.0 / cs)[:, None, :]
        m = m * cs[:, None, :]
    # d exp(l - max) / dl: m0 on the diagonal, minus sum(g * m0) on the max entry (m0 == 1),
    # split among ties as torch.amax does. That sum is ~0 when ITERS > 0 (the output is
    # scale-invariant), but not for ITERS == 0.
    gm = g * m0
    total = tl.sum(tl.sum(gm, axis=2), axis=1)
    is_max = m0 == 1.0
    ties = tl.sum(tl.sum(is_max.to(tl.float32), axis=2), axis=1)
    return gm - tl.where(is_max, (total / tl.maximum(ties, 1.0))[:, None, None], 0.0)
