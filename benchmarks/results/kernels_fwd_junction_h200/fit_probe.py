"""GPU diagnostic behind fit_probe.txt (run from the repository root on the H200, 2026-12-01): does
mhc_pre_common.fit_loop_stages see the apply kernel's shared memory on the device? Kept as run; not a test."""
import traceback

import torch
import triton

from dualpipe_mhc.kernels import mhc_pre_bwd
from dualpipe_mhc.kernels import mhc_pre_common as mpc

print("triton", triton.__version__, "limit", mpc._shared_limit(torch.device("cuda", 0)))
orig = mpc.fit_loop_stages


def traced(kernel, make_args, dtypes, constexprs, device):
    print("fit called:", kernel.fn.__name__, device, {k: constexprs.get(k) for k in ("n", "BT", "BC", "LOOP_STAGES")})
    for s in (3, 2):
        try:
            k = kernel.warmup(*make_args(), grid=(1,), **dict(constexprs, LOOP_STAGES=s))
            print("  stages", s, "type", type(k).__name__, "shared", getattr(getattr(k, "metadata", None), "shared", None))
        except Exception:
            traceback.print_exc()
    r = orig(kernel, make_args, dtypes, constexprs, device)
    print("  fitted ->", r.get("LOOP_STAGES"))
    return r


mhc_pre_bwd.fit_loop_stages = traced
from dualpipe_mhc.kernels import fused  # noqa: E402

t, n, c = 77, 1, 2048
x = torch.randn(t, n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
m = 2 * n + n * n
phi = (torch.randn(n * c, m, device="cuda") * 0.02).requires_grad_()
alpha = torch.ones(3, device="cuda", requires_grad=True)
bias = torch.zeros(m, device="cuda", requires_grad=True)
try:
    u, hp, hr = fused.mhc_pre(x, phi, alpha, bias, 20)  # no post_res: the apply without the g hand-over
    (u.float().sum() + hp.sum() + hr.sum()).backward()
    torch.cuda.synchronize()
    print("n=1 backward ok")
except Exception:
    traceback.print_exc()
