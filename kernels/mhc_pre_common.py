"""Pieces shared by the mHC pre forward (:mod:`kernels.mhc_pre`) and backward
(:mod:`kernels.mhc_pre_bwd`): the on-chip mapping code, and the launch-tuning table of all the
fused kernels (the post/res backward's included).

Residual kinds are constexpr flags of the same kernels (:func:`variant`): ``DSV4`` (DeepSeek-V4)
adds ``HC_EPS`` to H_pre, runs the eps-guarded Sinkhorn from a column softmax, and works on the comb
logits transposed (``RES_T`` loads), so that the tile is H_res = comb^T itself and everything
downstream (h_res, post/res, dh_res) keeps mHC's layout."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .reference import HC_EPS
from .sinkhorn import sinkhorn_fwd, sinkhorn_init


def variant(kind: str) -> dict:
    """The constexprs that select a residual kind's mappings in the pre kernels."""
    return dict(DSV4=kind == "dsv4", HC_EPS=HC_EPS if kind == "dsv4" else 0.0)


@triton.jit
def _res_offsets(i, n: tl.constexpr, RES_T: tl.constexpr):
    """[1, N, N] offsets of the n x n block in a row of proj / bias: (a, b) -> a n + b, or b n + a (RES_T)."""
    if RES_T:
        off = i[None, None, :] * n + i[None, :, None]
    else:
        off = i[None, :, None] * n + i[None, None, :]
    return off


@triton.jit
def _load_proj(proj_ptr, rows64, row_mask, n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, RES_T: tl.constexpr):
    """This block's projections split by mapping: pre [BT, N], post [BT, N], res [BT, N, N] (transposed if
    ``RES_T``), and the masks."""
    i = tl.arange(0, N)
    imask = i < n
    m2 = row_mask[:, None] & imask[None, :]
    valid = m2[:, :, None] & imask[None, None, :]
    base = proj_ptr + rows64[:, None] * M
    p_pre = tl.load(base + i[None, :], mask=m2, other=0.0)
    p_post = tl.load(base + n + i[None, :], mask=m2, other=0.0)
    p_res = tl.load(base[:, :, None] + 2 * n + _res_offsets(i, n, RES_T), mask=valid, other=0.0)
    return p_pre, p_post, p_res, m2, valid


@triton.jit
def _logits(p_pre, p_post, p_res, alpha_ptr, bias_ptr, n: tl.constexpr, N: tl.constexpr, RES_T: tl.constexpr):
    """alpha * proj + bias for the three mappings, in float32 (the res block transposed if ``RES_T``, as
    :func:`_load_proj` loaded it)."""
    i = tl.arange(0, N)
    imask = i < n
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    b_pre = tl.load(bias_ptr + i, mask=imask, other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + n + i, mask=imask, other=0.0).to(tl.float32)
    b_res = tl.load(
        bias_ptr + 2 * n + _res_offsets(i, n, RES_T), mask=imask[None, :, None] & imask[None, None, :], other=0.0
    ).to(tl.float32)
    return a_pre * p_pre + b_pre[None, :], a_post * p_post + b_post[None, :], a_res * p_res + b_res


@triton.jit
def _mappings(
    proj, rstd, proj_ptr, rstd_ptr, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
    rows, row_mask, n: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr,
    DSV4: tl.constexpr, HC_EPS: tl.constexpr,
):  # fmt: skip
    """Store proj [BT, MP] and rstd [BT]; then sigmoid (+ eps for DSV4), 2 sigmoid and Sinkhorn; store and
    return h_pre [BT, N]."""
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, MP)
    tl.store(proj_ptr + rows64[:, None] * M + cols[None, :], proj, mask=row_mask[:, None] & (cols < M)[None, :])
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    # proj is re-read below in the [BT, n] / [BT, n, n] shapes by other threads of this program.
    tl.debug_barrier()

    p_pre, p_post, p_res, m2, valid = _load_proj(proj_ptr, rows64, row_mask, n, N, M, DSV4)
    l_pre, l_post, l_res = _logits(p_pre, p_post, p_res, alpha_ptr, bias_ptr, n, N, DSV4)
    h_pre = _h_pre(l_pre, m2, DSV4, HC_EPS)
    h_post = 2.0 * tl.sigmoid(l_post)
    h_res = sinkhorn_fwd(sinkhorn_init(l_res, valid, DSV4), valid, ITERS, DSV4, HC_EPS)
    i = tl.arange(0, N)
    tl.store(h_pre_ptr + rows64[:, None] * n + i[None, :], h_pre, mask=m2)
    tl.store(h_post_ptr + rows64[:, None] * n + i[None, :], h_post, mask=m2)
    tl.store(h_res_ptr + rows64[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :], h_res, mask=valid)
    return h_pre


@triton.jit
def _h_pre(l_pre, m2, DSV4: tl.constexpr, HC_EPS: tl.constexpr):
    """H_pre [BT, N] from its logits: sigmoid, + eps for DSV4; zero on padding."""
    h = tl.sigmoid(l_pre)
    if DSV4:
        h = h + HC_EPS
    return tl.where(m2, h, 0.0)


@triton.jit
def _dot_bf16(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b for bf16 a, b. ``UPCAST``: in fp32 (exact products), for Triton's CPU interpreter,
    whose bf16 dot is wrong (Triton 3.9: errors of 1e10 on a 16 x 16 product)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


def _pow2(v: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(v))


def _precision(dtype: torch.dtype) -> str:
    # bf16/fp16 streams are exact in tf32; fp32 streams get the 3-pass split for full fp32 accuracy.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _interpreted() -> bool:
    return type(_load_proj).__name__ == "InterpretedFunction"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_SM_REGISTERS, _SM_SHARED, _SM_WARPS = 65536, 233472, 64  # Hopper (sm_90): per multiprocessor
_resident: dict = {}


def resident_programs(kernel, make_args, dtypes: tuple, constexprs: dict, device: torch.device) -> int:
    """How many programs of ``kernel`` (at these ``constexprs``, ``num_warps`` included, and argument
    ``dtypes``) the GPU runs at once: SMs x programs per SM, as registers, shared memory and warps
    allow. The first time, compiles without launching on ``make_args()`` (cached by the above);
    the SM count alone on the CPU."""
    sms = _num_sms(device)
    if device.type != "cuda":
        return sms
    key = (kernel.fn.__name__, tuple(sorted(constexprs.items())), dtypes)
    if key not in _resident:
        try:
            compiled = kernel.warmup(*make_args(), grid=(1,), **constexprs)
            compiled._init_handles()  # loads the binary: n_regs
            warps = compiled.metadata.num_warps
            regs_per_warp = triton.cdiv(compiled.n_regs * 32, 256) * 256
            per_sm = min(
                _SM_REGISTERS // (regs_per_warp * warps), _SM_SHARED // (compiled.metadata.shared + 1024),
                _SM_WARPS // warps,
            )  # fmt: skip
            _resident[key] = sms * max(1, per_sm)
        except Exception:  # a Triton without these internals: one program per SM
            _resident[key] = sms
    return _resident[key]


def wave_splits(blocks: int, max_splits: int, slots: int) -> int:
    """Token splits s (1..max_splits) for a grid of s x ``blocks`` programs that wastes the least of
    its last wave on ``slots`` resident programs (ties: the fewest splits, the fewest partials)."""

    def waste(s: int) -> float:
        programs = s * blocks
        return round(triton.cdiv(programs, slots) * slots / programs - 1, 2)

    return min(range(1, max(1, max_splits) + 1), key=lambda s: (waste(s), s))


# Launch defaults (measured on H100: benchmarks/NOTES_kernels.md). A dict so that the
# benchmarks can A/B a whole configuration; the launchers' keyword arguments override it.
TUNING = {
    # bf16 x: the K-split pair (bf16 hi/lo dots, then finish + aggregate) when True; the single tf32
    # mapping kernel + aggregate kernel (v2) when False
    "fwd_split": True,
    "fwd_block_t": 64, "fwd_block_k": 64, "fwd_warps": 4, "fwd_stages": 4, "fwd_k_splits": None,
    "apply_dphi_bf16": True,  # bf16 x: dphi = x^T (draw_hi + draw_lo) in bf16 dots (v4); else tf32 (v2)
    # with apply_dphi_bf16: also the draw_lo dot (draw to ~2^-17); False: draw rounded to bf16, as cuBLAS
    # rounds dY for a bf16 Linear's weight gradient (3.5 % faster apply at C = 4096, H100 sweep of 2026-11-25)
    "apply_dphi_lo": False,
    "apply_block_t": 64, "apply_block_q": 256, "apply_warps": 8, "apply_stages": None, "apply_fuse_dphi": True,
    # apply's token loop as tl.range(num_stages=...): every load of a tile is issued (cp.async) a tile
    # ahead; None leaves the loop to the pipeliner's defaults, which stage only the dots' operands
    "apply_loop_stages": 2,
    "reduce_block_t": 4, "reduce_block_c": 256, "reduce_warps": 4, "reduce_loop_stages": None,
    # the post/res op (kernels.mhc_post): [BT, n, BC] tiles of about tile_values fp32 values
    "post_fwd_block_c": 1024, "post_fwd_tile_values": 8192, "post_fwd_warps": 8, "post_fwd_loop_stages": 2,
    "post_bwd_block_c": 256, "post_bwd_tile_values": 4096, "post_bwd_warps": 4, "post_bwd_loop_stages": 2,
}  # fmt: skip
V2_TUNING = {"fwd_split": False, "apply_dphi_bf16": False, "apply_dphi_lo": True, "apply_block_t": 32,
             "apply_block_q": None, "apply_warps": 8, "apply_stages": None, "apply_fuse_dphi": True,
             "apply_loop_stages": None,
             "reduce_block_t": 4, "reduce_block_c": 256, "reduce_warps": 4, "reduce_loop_stages": None}  # fmt: skip
# The apply kernel for fp32 / fp16 streams and for n = 8 (TUNING's sizes are for bf16, n <= 4): v2's
# with 16-token tiles, the largest that compile for sm_90 without spilling registers (fp32 n = 8 still
# spills some) and fit shared memory (benchmarks/kernel_resources.py); its loads staged through
# shared memory (loop stages 2), without which the fp32 tile spilled under Triton 3.9.
WIDE_APPLY_TUNING = {**V2_TUNING, "apply_block_t": 16, "apply_dphi_lo": True, "apply_loop_stages": 2}
# What benchmarks/bench_kernels.py --sweep times and tests/test_kernels.py checks on the GPU (n <= 4 keys;
# n = 8 keeps its own block sizes where the launchers say so).
FWD_CANDIDATES = [
    dict(fwd_split=True, fwd_block_t=bt, fwd_block_k=bk, fwd_warps=w, fwd_stages=st, fwd_k_splits=ks)
    for bt, bk, w, st, ks in [(128, 64, 4, 3, None), (128, 128, 8, 3, None), (64, 128, 4, 3, None),
                              (128, 64, 8, 4, None), (256, 64, 8, 3, None), (64, 64, 4, 4, None), (128, 64, 4, 3, 8)]
]  # fmt: skip
REDUCE_CANDIDATES = [
    dict(reduce_block_t=bt, reduce_block_c=bc, reduce_warps=w, reduce_loop_stages=ls)
    for bt, bc, w, ls in [(4, 256, 4, None), (8, 256, 4, None), (16, 256, 8, None), (4, 128, 2, None),
                          (4, 256, 4, 2), (4, 128, 2, 3), (8, 256, 4, 2), (4, 512, 4, 2)]
]  # fmt: skip
APPLY_CANDIDATES = [
    dict(apply_block_t=bt, apply_block_q=bq, apply_warps=w, apply_fuse_dphi=True, apply_dphi_bf16=True,
         apply_stages=None, apply_dphi_lo=lo, apply_loop_stages=ls)
    for bt, bq, w, lo, ls in [
        # the loop as written: Triton's pipeliner stages only the loads that feed the dots (x, draw)
        (64, 256, 8, False, None), (32, 256, 8, False, None), (16, 256, 4, False, None), (64, 256, 8, True, None),
        # tl.range(num_stages=ls): every load of the loop (g, du, H_pre, coef too) goes through
        # cp.async into shared memory, ls - 1 tiles ahead (sm_90 registers / shared KB with the g hand-over,
        # Triton 3.6: kernel_resources.py)
        (64, 256, 8, False, 2),  # 255 / 133: the default (H100 sweep, 2026-11-25)
        (64, 256, 8, False, 3),  # 255 / 218
        (32, 256, 8, False, 2),  # 172 / 79
        (32, 256, 8, False, 3),  # 184 / 121
        (32, 256, 8, False, 4),  # 196 / 164
        (16, 256, 4, False, 3),  # 251 / 79, two programs an SM
        (32, 128, 4, False, 3),  # 176 / 67, two programs an SM
    ]
]  # fmt: skip


POST_FWD_CANDIDATES = [
    dict(post_fwd_block_c=bc, post_fwd_tile_values=v, post_fwd_warps=w, post_fwd_loop_stages=ls)
    for bc, v, w, ls in [(512, 4096, 4, None), (512, 4096, 4, 2), (512, 4096, 4, 3), (256, 4096, 4, 2),
                         (256, 2048, 4, 3), (512, 8192, 8, 2), (1024, 8192, 8, 2), (256, 4096, 4, 3)]
]  # fmt: skip
POST_BWD_CANDIDATES = [
    dict(post_bwd_block_c=bc, post_bwd_tile_values=v, post_bwd_warps=w, post_bwd_loop_stages=ls)
    for bc, v, w, ls in [(256, 8192, 8, None), (256, 8192, 8, 2), (256, 8192, 8, 3), (512, 8192, 8, 2),
                         (128, 4096, 4, 3), (256, 4096, 4, 2), (128, 8192, 8, 3), (256, 16384, 8, 2)]
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
