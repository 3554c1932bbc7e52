"""What ``bench_kernels.py --sweep`` times, ``kernel_resources.py`` compiles and the GPU test of
tests/test_kernels.py checks: launch-setting candidates per kernel, as overrides of
:class:`dualpipe_mhc.kernels.settings.LaunchSettings` (n <= 4, bf16; n = 8 keeps its own block
sizes where the launchers say so), and the previous defaults (v2) for A/B rows.

The winner of a sweep goes into ``kernels/settings.py``'s per-device ``TABLE``.
"""

from __future__ import annotations

# The defaults before the K-split forward and the bf16 dphi (v2): an A/B baseline.
V2 = {"fwd_split": False, "apply_dphi_bf16": False, "apply_dphi_lo": True, "apply_block_t": 32,
      "apply_block_q": None, "apply_warps": 8, "apply_stages": None, "apply_fuse_dphi": True,
      "apply_loop_stages": None,
      "reduce_block_t": 4, "reduce_block_c": 256, "reduce_warps": 4, "reduce_loop_stages": None}  # fmt: skip

FWD = [
    dict(fwd_split=True, fwd_block_t=bt, fwd_block_k=bk, fwd_warps=w, fwd_stages=st, fwd_k_splits=ks)
    for bt, bk, w, st, ks in [(128, 64, 4, 3, None), (128, 128, 8, 3, None), (64, 128, 4, 3, None),
                              (128, 64, 8, 4, None), (256, 64, 8, 3, None), (64, 64, 4, 4, None), (128, 64, 4, 3, 8),
                              # K splits that fill the H200's slots evenly (the rule before 2026-12-01 gave
                              # 5 at T = 8192: 320 programs for 396 slots, 2 or 3 an SM)
                              (128, 64, 4, 3, 3), (128, 64, 4, 3, 4), (128, 64, 4, 3, 6), (64, 64, 4, 3, 3),
                              (64, 64, 4, 3, 6), (128, 64, 4, 2, None)]
]  # fmt: skip
REDUCE = [
    dict(reduce_block_t=bt, reduce_block_c=bc, reduce_warps=w, reduce_loop_stages=ls)
    for bt, bc, w, ls in [(4, 256, 4, None), (8, 256, 4, None), (16, 256, 8, None), (4, 128, 2, None),
                          (4, 256, 4, 2), (4, 128, 2, 3), (8, 256, 4, 2), (4, 512, 4, 2),
                          # fewer tokens and warps a program: the H200 sweep's trend (4 tokens, 2 warps best), more
                          # programs an SM to hide each one's Sinkhorn backward tail
                          (2, 128, 1, None), (4, 128, 1, None), (2, 256, 2, None), (2, 128, 2, None),
                          (4, 64, 1, None), (1, 128, 1, None), (2, 128, 1, 2)]
]  # fmt: skip
APPLY = [
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
POST_FWD = [
    dict(post_fwd_block_c=bc, post_fwd_tile_values=v, post_fwd_warps=w, post_fwd_loop_stages=ls)
    for bc, v, w, ls in [(512, 4096, 4, None), (512, 4096, 4, 2), (512, 4096, 4, 3), (256, 4096, 4, 2),
                         (256, 2048, 4, 3), (512, 8192, 8, 2), (1024, 8192, 8, 2), (256, 4096, 4, 3)]
]  # fmt: skip
POST_BWD = [
    dict(post_bwd_block_c=bc, post_bwd_tile_values=v, post_bwd_warps=w, post_bwd_loop_stages=ls)
    for bc, v, w, ls in [(256, 8192, 8, None), (256, 8192, 8, 2), (256, 8192, 8, 3), (512, 8192, 8, 2),
                         (128, 4096, 4, 3), (256, 4096, 4, 2), (128, 8192, 8, 3), (256, 16384, 8, 2)]
]  # fmt: skip
# The junction of chained sublayers (kernels/mhc_chain.py): 2-D tiles of one stream at a time. sm_90 registers
# with Triton 3.9 (kernel_resources.py) in the comments.
CHAIN_FWD = [
    dict(chain_fwd_block_t=bt, chain_fwd_block_c=bc, chain_fwd_warps=w, chain_fwd_loop_stages=ls)
    for bt, bc, w, ls in [(64, 32, 8, 2),  # 237 registers
                          (64, 16, 4, 2),  # 168: the default (the H200 sweep's best)
                          (64, 32, 8, 3),  # 239
                          (64, 16, 8, 2), (128, 16, 8, 2), (32, 32, 4, 2)]
]  # fmt: skip
CHAIN_BWD = [
    dict(chain_bwd_block_t=bt, chain_bwd_block_c=bc, chain_bwd_warps=w, chain_bwd_loop_stages=ls)
    for bt, bc, w, ls in [(64, 16, 8, 2),  # 255 registers, no spill
                          (64, 32, 8, 2),  # spills 296 B
                          (32, 64, 8, 2),  # spills 176 B
                          (128, 16, 8, 2), (64, 16, 8, 3),
                          (16, 64, 4, 2)]  # spills 272 B: the default (the H200 sweep's best)
]  # fmt: skip
ALL = FWD + APPLY + REDUCE + POST_FWD + POST_BWD + [V2]  # the op-local kernels' (one sublayer)
CHAIN = CHAIN_FWD + CHAIN_BWD  # the junction's (two chained sublayers)
