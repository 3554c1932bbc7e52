"""One launch of one fused mHC op, for Nsight Compute (the device tool's H100 image has ncu):

    ncu --clock-control none --kernel-name regex:_pre_bwd_apply --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 benchmarks/ncu_target.py --op apply --width 4096

Each op runs three times (the first compiles; skip those launches in ncu), bf16, T = 8192, n = 4.
``--clock-control none``: the card is measured as found (never change its clocks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import ITERS, make_case  # noqa: E402

from dualpipe_mhc.kernels import reference as ref  # noqa: E402
from dualpipe_mhc.kernels.mhc_post import post_res_backward, post_res_forward  # noqa: E402
from dualpipe_mhc.kernels.mhc_pre import pre_backward_apply, pre_backward_reduce, pre_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", choices=["pre_fwd", "reduce", "apply", "post_fwd", "post_bwd"], default="apply")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    t, n, c = args.tokens, 4, args.width
    x, phi, alpha, bias, y, du, gx = make_case(t, n, c, "cuda")
    u, h_pre, h_post, h_res, proj, rstd = pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS)
    dh_post, dh_res = torch.randn_like(h_post), torch.randn_like(h_res)
    _, _, draw, coef = pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, ITERS)
    op = {  # as a sublayer's backward runs them: the post/res op's dx formed in the apply kernel
        "pre_fwd": lambda: pre_forward(x, phi, alpha, bias, ITERS, ref.RMS_EPS),
        "reduce": lambda: pre_backward_reduce(x, alpha, bias, proj, rstd, du, dh_post, dh_res, ITERS),
        "apply": lambda: pre_backward_apply(x, phi, h_pre, du, draw, coef, res_grad=(gx, h_res)),
        "post_fwd": lambda: post_res_forward(x, y, h_post, h_res),
        "post_bwd": lambda: post_res_backward(gx, x, y, h_post, h_res, write_dx=False),
    }[args.op]
    for _ in range(3):
        op()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
