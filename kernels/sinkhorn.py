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

DeepSeek-V4's variant (``DSV4``, reference twin :func:`kernels.reference.dsv4_sinkhorn`) runs here
in H_res's layout (comb transposed, the caller loads the logits transposed): the first T_c is
the softmax (each column max-shifted, ``COL_MAX``), then ``HC_EPS`` is added to every entry and every
later denominator is the sum + ``HC_EPS``. Both change nothing in the backward's algebra: with
``B = A / (s + eps)`` the gradient is still ``(dB - <dB, B>) / (s + eps)`` with the stored normaliser
``s + eps``, and the added eps passes the gradient through (undone as ``A = A' - eps``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sinkhorn_init(logits, valid, COL_MAX: tl.constexpr):
    """exp(logits - max) over each token's valid n x n entries; zero elsewhere. ``logits``: [BT, N, N].

    The max is the token's (it cancels in the first T_c), or with ``COL_MAX`` each column's, as a
    column softmax takes it (no column underflows to all zeros, however far apart the columns are).
    """
    shifted = tl.where(valid, logits, float("-inf"))
    if COL_MAX:
        mx = tl.max(shifted, axis=1)  # [BT, N]
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # padded columns, tokens past T
        out = tl.where(valid, tl.exp(shifted - mx[:, None, :]), 0.0)
    else:
        mx = tl.max(tl.max(shifted, axis=2), axis=1)  # [BT]
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # tokens past T have no valid entry
        out = tl.where(valid, tl.exp(shifted - mx[:, None, None]), 0.0)
    return out


@triton.jit
def _col_sums(m, it, DSV4: tl.constexpr, HC_EPS: tl.constexpr):
    """T_c's normalisers [BT, N]: column sums, + eps after the first round for DSV4; 1 for all-zero padding."""
    cs = tl.sum(m, axis=1)
    if DSV4:
        cs = cs + tl.where(it > 0, HC_EPS, 0.0)
    return tl.where(cs > 0, cs, 1.0)


@triton.jit
def _row_sums(m, DSV4: tl.constexpr, HC_EPS: tl.constexpr):
    """T_r's normalisers [BT, N]: row sums, + eps for DSV4; 1 for all-zero padding."""
    rs = tl.sum(m, axis=2)
    if DSV4:
        rs = rs + HC_EPS
    return tl.where(rs > 0, rs, 1.0)


@triton.jit
def sinkhorn_fwd(m, valid, ITERS: tl.constexpr, DSV4: tl.constexpr, HC_EPS: tl.constexpr):
    """``ITERS`` rounds of column- then row-normalisation of ``m`` [BT, N, N] (already exp'd).

    ``DSV4``: + ``HC_EPS`` on the valid entries after the first T_c (the softmax), and on every
    later denominator."""
    for it in range(ITERS):
        cs = _col_sums(m, it, DSV4, HC_EPS)
        m = m * (1.0 / cs)[:, None, :]
        if DSV4:
            m = m + tl.where(valid & (it == 0), HC_EPS, 0.0)
        rs = _row_sums(m, DSV4, HC_EPS)
        m = m * (1.0 / rs)[:, :, None]
    return m


@triton.jit
def sinkhorn_bwd(
    m0, grad, valid, scratch_ptr, rows, row_mask, ITERS: tl.constexpr, N: tl.constexpr,
    DSV4: tl.constexpr, HC_EPS: tl.constexpr,
):  # fmt: skip
    """Gradient w.r.t. the logits, given ``m0 = sinkhorn_init(logits, valid, DSV4)`` and ``grad`` = dL/dH_res,
    both [BT, N, N].

    ``scratch_ptr`` points at a float32 buffer of ``[T, 2 * ITERS, N]``; ``rows`` [BT] are
    this block's token indices and ``row_mask`` [BT] which of them exist.
    """
    k_idx = tl.arange(0, N)
    base = scratch_ptr + rows[:, None] * (2 * ITERS * N) + k_idx[None, :]  # [BT, N]
    smask = row_mask[:, None]
    m = m0
    for it in range(ITERS):
        cs = _col_sums(m, it, DSV4, HC_EPS)
        tl.store(base + (2 * it) * N, cs, mask=smask)
        m = m * (1.0 / cs)[:, None, :]
        if DSV4:
            m = m + tl.where(valid & (it == 0), HC_EPS, 0.0)
        rs = _row_sums(m, DSV4, HC_EPS)
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
        if DSV4:
            # undo the + eps (the gradient passes through it); and keep padded entries' gradient at 0:
            # their eps-only normalisers (1 / eps per round) would grow it to inf, and inf * 0 is nan
            m = m - tl.where(valid & (it == 0), HC_EPS, 0.0)
            g = tl.where(valid, g, 0.0)
        cs = tl.load(base + (2 * it) * N, mask=smask, other=1.0)
        inner = tl.sum(g * m, axis=1)
        g = (g - inner[:, None, :]) * (1.0 / cs)[:, None, :]
        m = m * cs[:, None, :]
        if DSV4:
            g = tl.where(valid, g, 0.0)
    # d exp(l - max) / dl: m0 on the diagonal, minus sum(g * m0) on the max entry (m0 == 1),
    # split among ties as torch.amax does (per column for DSV4's column max). That sum is ~0 when
    # ITERS > 0 (the output is invariant to the shift), but not for ITERS == 0.
    gm = g * m0
    is_max = m0 == 1.0
    if DSV4:
        total_c = tl.sum(gm, axis=1)  # [BT, N]
        ties_c = tl.sum(is_max.to(tl.float32), axis=1)
        out = gm - tl.where(is_max, (total_c / tl.maximum(ties_c, 1.0))[:, None, :], 0.0)
    else:
        total = tl.sum(tl.sum(gm, axis=2), axis=1)
        ties = tl.sum(tl.sum(is_max.to(tl.float32), axis=2), axis=1)
        out = gm - tl.where(is_max, (total / tl.maximum(ties, 1.0))[:, None, None], 0.0)
    return out
