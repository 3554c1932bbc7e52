"""Launch settings of the fused mHC kernels: block sizes, warps and pipelining, looked up per call.

    s = launch_settings(x.device, x.dtype, n, C)                # the device's swept table entry
    s = launch_settings(x.device, x.dtype, n, C, {"apply_block_t": 32})  # explicit override wins
    s.apply_block_t, s.fwd_split, ...                          # a frozen LaunchSettings

Nothing here is mutated at run time: a worker actor runs its step and its status thread at
once, so settings are values resolved per call and handed down. The fused autograd ops resolve
them in the forward and keep them for the backward (which may run on autograd's device thread).
A benchmark that times a whole model under other settings wraps it in :func:`overriding`, a
context variable: it reaches only the forwards started in that thread and context.

The table is keyed by device name (``torch.cuda.get_device_name``), with ``"default"`` for any
device not listed (the H100's). Each entry comes from
``python benchmarks/bench_kernels.py --sweep --write-tuning best.json`` run on that device
(H100: benchmarks/NOTES_kernels.md, results/kernels_sweep_*; H200: results/kernels_sweep_h200/).
The sweep's candidate lists live in ``benchmarks/kernel_candidates.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchSettings:
    """Every launch knob of the pre op (``fwd_*``, ``apply_*``, ``reduce_*``), the post/res op
    (``post_fwd_*``, ``post_bwd_*``) and the junction of chained sublayers (``chain*``); ``None``
    leaves a choice to the launcher or Triton."""

    # bf16 x: the K-split pair (bf16 hi/lo dots, then finish + aggregate) when True; the single tf32
    # mapping kernel + aggregate kernel (v2) when False
    fwd_split: bool = True
    fwd_block_t: int = 64
    fwd_block_k: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 4
    fwd_k_splits: int | None = None
    apply_dphi_bf16: bool = True  # bf16 x: dphi = x^T (draw_hi + draw_lo) in bf16 dots (v4); else tf32 (v2)
    # with apply_dphi_bf16: also the draw_lo dot (draw to ~2^-17); False: draw rounded to bf16, as cuBLAS
    # rounds dY for a bf16 Linear's weight gradient (3.5 % faster apply at C = 4096, H100 sweep of 2026-11-25)
    apply_dphi_lo: bool = False
    apply_block_t: int = 64
    apply_block_q: int | None = 256
    apply_warps: int = 8
    apply_stages: int | None = None
    apply_fuse_dphi: bool = True
    # apply's token loop as tl.range(num_stages=...): every load of a tile is issued (cp.async) a tile
    # ahead; None leaves the loop to the pipeliner's defaults, which stage only the dots' operands
    apply_loop_stages: int | None = 2
    reduce_block_t: int = 4
    reduce_block_c: int = 256
    reduce_warps: int = 4
    reduce_loop_stages: int | None = None
    # the post/res op (kernels.mhc_post): [BT, n, BC] tiles of about tile_values fp32 values
    post_fwd_block_c: int = 1024
    post_fwd_tile_values: int = 8192
    post_fwd_warps: int = 8
    post_fwd_loop_stages: int | None = 2
    post_bwd_block_c: int = 256
    post_bwd_tile_values: int = 4096
    post_bwd_warps: int = 4
    post_bwd_loop_stages: int | None = 2
    # the junction of two chained sublayers (kernels.mhc_chain; bf16 streams, n <= 4): post/res_l fused
    # with pre_{l+1}'s projection (forward) and apply (backward), on 2-D one-stream tiles. Off: on an H200
    # (2026-12-01, benchmarks/results/kernels_chain_h200/) its kernels ran at 35 % (forward) and 18-20 %
    # (backward) of copy at these tiles, the swept best, against 70-101 % for the op-local kernels of the same
    # run, so the block was slower with it (+27.6 / +14.0 % over plain against +15.5 / +6.2 %), though it
    # moves 24 C fewer bytes a token and sublayer. This backward tile spills on sm_90 (272 B); the tiles that
    # do not spill ran slower.
    chain: bool = False
    # with chain on, the backward junction too; False: the forward junction alone (post/res_l's forward sums
    # pre_{l+1}'s projection partials), each op's own backward, and x_{l+1}'s gradient formed as without chain.
    # Slower as well on an H200: +17.0 / +8.5 % over plain against +15.0 / +6.9 % op-local (same call,
    # benchmarks/results/kernels_fwd_junction_h200/): its forward kernel takes 0.207 ms at C 2048, the two
    # launches it replaces 0.126 ms
    chain_bwd: bool = True
    chain_fwd_block_t: int = 64
    chain_fwd_block_c: int = 16
    chain_fwd_warps: int = 4
    chain_fwd_loop_stages: int | None = 2
    chain_bwd_block_t: int = 16
    chain_bwd_block_c: int = 64
    chain_bwd_warps: int = 4
    chain_bwd_loop_stages: int | None = 2

    def replace(self, overrides: Mapping[str, Any] | None = None, **more: Any) -> LaunchSettings:
        """A copy with ``overrides`` (and ``more``) applied; a name that is no setting is a KeyError."""
        changes = {**(overrides or {}), **more}
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise KeyError(f"unknown launch settings {sorted(unknown)}; known: {sorted(FIELDS)}")
        return dataclasses.replace(self, **changes) if changes else self


FIELDS = tuple(f.name for f in dataclasses.fields(LaunchSettings))
APPLY_FIELDS = tuple(f for f in FIELDS if f.startswith("apply_"))


@dataclass(frozen=True)
class DeviceTuning:
    """One device's measured settings: ``narrow`` for bf16 streams with n <= 4 (what the sweeps
    time), ``wide_apply`` for the apply kernel's fields otherwise."""

    narrow: LaunchSettings
    wide_apply: LaunchSettings


# H100 sweep of 2026-11-25 (benchmarks/NOTES_kernels.md): the class defaults above.
H100 = LaunchSettings()
# The apply kernel for fp32 / fp16 streams and for n = 8: fp32 tiles and n = 8's [128, q] dphi tile
# ran out of shared memory at block_t = 64 on H100 (262-524 KB asked, 227 KB there) and spilled
# registers at block_t = 32. 16-token tiles are the largest that compile for sm_90 without spilling
# (fp32 n = 8 still spills some) and fit shared memory (benchmarks/kernel_resources.py); the loads
# staged through shared memory (loop stages 2), without which the fp32 tile spilled under Triton 3.9.
H100_WIDE_APPLY = H100.replace(
    apply_dphi_bf16=False, apply_dphi_lo=True, apply_block_t=16, apply_block_q=None, apply_warps=8,
    apply_stages=None, apply_fuse_dphi=True, apply_loop_stages=2,
)
# H200 sweep of 2026-12-01 (benchmarks/results/kernels_sweep_h200/, `bench_kernels.py --sweep`): the
# H100 candidates timed again; the winners differ where the faster HBM moves the balance towards
# latency (128-token forward blocks, 3 loop stages in the apply and post/res kernels, a narrower
# reduce). The wide apply sizes were not swept there: H100's, which compile without spilling for sm_90.
# The reduce retuned the same day with narrower candidates (results/kernels_retune_h200/): 2 tokens and one
# warp a program, 10 % / 5 % faster at C 2048 / 4096 than the sweep's 4 tokens and 2 warps.
H200 = H100.replace(
    fwd_block_t=128, fwd_stages=3, apply_loop_stages=3, reduce_block_t=2, reduce_block_c=128, reduce_warps=1,
    post_fwd_block_c=512, post_fwd_tile_values=4096, post_fwd_warps=4, post_fwd_loop_stages=3,
    post_bwd_block_c=128, post_bwd_loop_stages=3,
)
DEFAULT = "default"
TABLE: dict[str, DeviceTuning] = {
    DEFAULT: DeviceTuning(H100, H100_WIDE_APPLY),
    "NVIDIA H100 80GB HBM3": DeviceTuning(H100, H100_WIDE_APPLY),
    "NVIDIA H200": DeviceTuning(H200, H100_WIDE_APPLY),
}

_override: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("mhc_launch_override", default={})


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str) -> str:
    """The table key of ``device``: the CUDA device's name, else its type (``cpu``); a string is
    taken as the name itself (compiling for a device that is not here: benchmarks/kernel_resources.py)."""
    if isinstance(device, str):
        return device
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def wide_apply(dtype: torch.dtype, n: int) -> bool:
    """Whether the apply kernel takes the device's ``wide_apply`` sizes: the swept ones are for bf16
    streams and n <= 4 (2n + n^2 <= 32 mapping columns)."""
    return dtype != torch.bfloat16 or 2 * n + n * n > 32


def launch_settings(
    device: torch.device | str, dtype: torch.dtype, n: int, c: int,
    override: LaunchSettings | Mapping[str, Any] | None = None,
) -> LaunchSettings:  # fmt: skip
    """The settings for one launch on ``x [T, n, C]`` of ``dtype`` on ``device``: the device's table
    entry (or ``"default"``), the wide apply sizes where :func:`wide_apply` says, then any
    :func:`overriding` in this context, then ``override`` (a LaunchSettings is taken as is).
    ``c`` is part of the key so that a table entry can later depend on the width; none does yet."""
    if isinstance(override, LaunchSettings):
        return override
    entry = TABLE.get(device_name(device), TABLE[DEFAULT])
    settings = entry.narrow
    if wide_apply(dtype, n):
        settings = settings.replace({f: getattr(entry.wide_apply, f) for f in APPLY_FIELDS})
    return settings.replace(_override.get()).replace(override)


@contextlib.contextmanager
def overriding(overrides: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, launches resolved in this thread and context take ``overrides`` (a whole-model
    A/B run in a benchmark). Names are checked at once; nothing outside the block or thread sees it."""
    LaunchSettings().replace(overrides)  # a KeyError for an unknown name, before anything runs
    token = _override.set({**_override.get(), **overrides})
    try:
        yield
    finally:
        _override.reset(token)
