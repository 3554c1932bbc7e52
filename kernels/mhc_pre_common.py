"""Pieces shared by the mHC pre forward (:mod:`kernels.mhc_pre`) and backward
(:mod:`kernels.mhc_pre_bwd`): the on-chip mapping code and the occupancy helpers. Launch
settings are looked up per call in :mod:`kernels.settings`.

Residual kinds are constexpr flags of the same kernels (:func:`variant`): ``DSV4`` (DeepSeek-V4)
adds ``HC_EPS`` to H_pre, runs the eps-guarded Sinkhorn from a column softmax, and works on the comb
logits transposed (``RES_T`` loads), so that the tile is H_res = comb^T itself and everything
downstream (h_res, post/res, dh_res) keeps mHC's layout."""

from __future__ import annotations

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
SM90_PROGRAM_SHARED = _SM_SHARED - 1024  # what one program may take on sm_90: Triton's launch limit there
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


_fitted: dict = {}
_FIT_OFF_DEVICE = False  # benchmarks/kernel_resources.py compiles for sm_90 from CPU tensors: fit there too


def fit_loop_stages(kernel, make_args, dtypes: tuple, constexprs: dict, device: torch.device) -> dict:
    """``constexprs`` with ``LOOP_STAGES`` lowered until the compiled kernel fits the device's shared
    memory: a table entry swept for one shape can ask too much at another (H200 apply, 3 stages: 239 KB
    at n = 1 against 227 KB a block). Compiles without launching, cached; unchanged off CUDA. What the
    launch itself refuses all the same is fitted by :func:`launch_fitted`."""
    key = _fit_key(kernel, constexprs, dtypes, device)
    stages = constexprs.get("LOOP_STAGES")
    if key in _fitted or (device.type != "cuda" and not _FIT_OFF_DEVICE) or not stages or stages <= 1:
        return _fitted.get(key, constexprs)  # a fit launch_fitted found (e.g. of num_stages) included
    limit = _shared_limit(device)
    fitted = dict(constexprs)
    while fitted["LOOP_STAGES"] > 1:
        try:
            shared = kernel.warmup(*make_args(), grid=(1,), **fitted).metadata.shared
        except triton.runtime.errors.OutOfResources:  # a Triton that checks while compiling
            shared = limit + 1
        except (AttributeError, TypeError):  # a Triton without these internals: the launch fits it
            break
        if shared <= limit:
            break
        fitted["LOOP_STAGES"] -= 1
    _fitted[key] = fitted
    return _fitted[key]


_TRITON_STAGES = 3  # Triton's num_stages when a launch sets none (CUDA backend)


def launch_fitted(kernel, grid: tuple, args: tuple, dtypes: tuple, constexprs: dict, device: torch.device) -> None:
    """``kernel[grid](*args, **constexprs)``; where Triton refuses the launch for shared memory (it checks
    when the binary loads, before anything runs), again at one pipeline stage fewer (the loop's
    ``LOOP_STAGES`` where set, else the kernel's ``num_stages``), the fit remembered for
    :func:`fit_loop_stages`. The H200's GPU tests found the compile-time fit alone not enough: a launch with
    the g hand-over at n = 1 asked 239 KB at 3 loop stages, and sweep candidates that leave the stages to
    Triton (3) asked 245 KB at n = 8."""
    fitted = dict(constexprs)
    while True:
        try:
            kernel[grid](*args, **fitted)
            break
        except triton.runtime.errors.OutOfResources:
            knob = "LOOP_STAGES" if fitted.get("LOOP_STAGES") else "num_stages"
            stages = fitted.get(knob) or _TRITON_STAGES
            if stages <= 1:
                raise
            fitted[knob] = stages - 1
    if fitted != constexprs:
        _fitted[_fit_key(kernel, constexprs, dtypes, device)] = fitted


def _fit_key(kernel, constexprs: dict, dtypes: tuple, device: torch.device) -> tuple:
    return kernel.fn.__name__, tuple(sorted(constexprs.items())), dtypes, device.index


def _shared_limit(device: torch.device) -> int:
    """Shared memory a program may use on ``device``: the limit Triton checks a launch against."""
    if device.type != "cuda":
        return SM90_PROGRAM_SHARED  # compiling for sm_90 off the device (kernel_resources.py)
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # another Triton layout: Hopper's 227 KB
        return SM90_PROGRAM_SHARED


MAX_PARTIALS = 16  # most splits a launch sums partials over afterwards (each split writes a partial; 37 cost 1.7x)


def wave_splits(blocks: int, max_splits: int, slots: int) -> int:
    """Token splits s (1..max_splits) for a grid of s x ``blocks`` programs that wastes the least of
    its last wave on ``slots`` resident programs (ties: the fewest splits, the fewest partials)."""

    def waste(s: int) -> float:
        programs = s * blocks
        return round(triton.cdiv(programs, slots) * slots / programs - 1, 2)

    return min(range(1, max(1, max_splits) + 1), key=lambda s: (waste(s), s))
