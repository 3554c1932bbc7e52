"""Compile the fused mHC kernels for Hopper (sm_90) on a machine without a GPU and report what
each launch costs on the chip: registers, spills (stack bytes, local loads/stores in the SASS),
shared memory, and which matrix instructions the dots became.

    pip install --no-deps --target /tmp/t36 triton==3.6.0      # the GPU host's Triton, once
    PYTHONPATH=/tmp/t36 python benchmarks/kernel_resources.py [--widths 2048 4096] [--out FILE]
                                                               [--defaults-only] [--check] [--device NAME]

The launchers run unchanged on CPU tensors; a stand-in driver reports an sm_90 target, and
every ``kernel[grid](...)`` compiles (Triton's own argument specialisation, ptxas from the
Triton wheel) instead of launching. Costs no device time; a kernel that spills here spills there.
The launch settings are the table entry of ``--device`` (kernels/settings.py), plus each
candidate of benchmarks/kernel_candidates.py unless ``--defaults-only``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_candidates as cands  # noqa: E402

from dualpipe_mhc.kernels import mhc_chain, mhc_pre, mhc_pre_common  # noqa: E402
from dualpipe_mhc.kernels import reference as ref  # noqa: E402
from dualpipe_mhc.kernels.mhc_post import post_res_backward, post_res_forward  # noqa: E402
from dualpipe_mhc.kernels.settings import DEFAULT, TABLE, launch_settings  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _Sm90Driver:
    """Just enough of Triton's driver for JITFunction.run to compile for sm_90 without a GPU."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def resources(cubin: bytes) -> dict:
    """Registers, stack, shared bytes and instruction counts of one compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([BIN / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([BIN / "cuobjdump", "--dump-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage.stdout))
    ops = collections.Counter(m.group(1) for m in re.finditer(r"\b([A-Z][A-Z0-9]{2,})(?:\.[\w.]+)?\s", sass))
    mma = sorted({m for m in re.findall(r"\b([HIQ]?G?MMA\.[\w.]+)", sass)})
    return {
        "regs": int(fields.get("REG", 0)),
        "stack": int(fields.get("STACK", 0)),
        "local_ld_st": ops["LDL"] + ops["STL"],
        "async_copies": ops["LDGSTS"],  # cp.async: loads the software pipeliner moved into shared memory
        "mma": mma,
    }


@contextlib.contextmanager
def compile_only(records: list):
    """Every kernel launch inside compiles for sm_90 and appends (name, constexprs, options, compiled);
    a launcher's own trial compiles (``kernel.warmup``, e.g. fitting loop stages) are not launches."""
    saved_run, saved_driver = JITFunction.run, driver._active  # None without a GPU
    saved_sms = mhc_pre_common._num_sms

    def run(self, *args, grid, warmup, **kwargs):
        kernel = saved_run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            consts = {k: v for k, v in kwargs.items() if k in self.arg_names}
            records.append((self.fn.__name__, consts, {k: v for k, v in kwargs.items() if k not in consts}, kernel))
        return kernel

    driver.set_active(_Sm90Driver())
    JITFunction.run = run
    mhc_pre_common._num_sms = lambda device: 132  # an H100's multiprocessors, for the launchers' grid sizes
    mhc_pre_common._FIT_OFF_DEVICE = True  # the launchers fit their loop stages to sm_90's shared memory here too
    try:
        yield
    finally:
        JITFunction.run, mhc_pre_common._num_sms = saved_run, saved_sms
        mhc_pre_common._FIT_OFF_DEVICE = False
        driver._active = saved_driver


def launches(t: int, n: int, c: int, dtype: torch.dtype, device_name: str, overrides: dict) -> None:
    """One forward and backward of both ops through the launchers, with ``device_name``'s launch
    settings and ``overrides``, as a sublayer runs them (the post/res backward hands g and H_res to
    the pre backward)."""
    m = 2 * n + n * n
    x = torch.randn(t, n, c).to(dtype)
    st = launch_settings(device_name, dtype, n, c, overrides)
    phi, alpha, bias = torch.randn(n * c, m), torch.ones(3), torch.zeros(m)
    u, h_pre, h_post, h_res, proj, rstd = mhc_pre.pre_forward(x, phi, alpha, bias, 20, ref.RMS_EPS, settings=st)
    du, dh_post, dh_res = torch.randn(t, c).to(dtype), torch.zeros(t, n), torch.zeros(t, n, n)
    post_res_forward(x, u, h_post, h_res, settings=st)
    post_res_backward(x, x, u, h_post, h_res, write_dx=False, settings=st)
    mhc_pre.pre_backward(
        x, phi, alpha, bias, h_pre, proj, rstd, du, dh_post, dh_res, 20, res_grad=(x, h_res), settings=st
    )
    cst = st.replace(chain=True)  # the junction of two chained sublayers, as a model runs it when switched on
    if mhc_chain.chain_supported(x, cst):
        mhc_chain.chain_forward(x, u, h_post, h_res, phi, cst)
        draw, coef = torch.zeros(t, m), torch.zeros(t)
        mhc_chain.chain_backward(x, u, h_post, h_res, phi, du, h_pre, draw, coef, (x, h_res), None, cst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--tokens", type=int, default=512, help="tokens of the CPU tensors (grid sizes only)")
    ap.add_argument("--out", default=None, help="also write the table here (Markdown)")
    ap.add_argument("--defaults-only", action="store_true", help="only the launch defaults (bf16 n 1, 2, 4, 8; fp32)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a kernel spills or overflows shared memory")
    ap.add_argument("--device", default=DEFAULT, choices=sorted(TABLE),
                    help="whose launch settings to compile (kernels/settings.py's TABLE)")
    args = ap.parse_args()
    # bf16 at n = 1 and 2 too: an entry swept at n = 4 can overflow shared memory there (H200 apply, n = 1)
    configs = [("default", {}, dtype, n) for dtype, n in ((torch.bfloat16, 4), (torch.float32, 4), (torch.bfloat16, 8),
                                                          (torch.bfloat16, 1), (torch.bfloat16, 2))]
    if not args.defaults_only:
        configs += [("v2", cands.V2, torch.bfloat16, 4)]
        for label, group in (("apply", cands.APPLY), ("fwd", cands.FWD), ("reduce", cands.REDUCE),
                             ("post fwd", cands.POST_FWD), ("post bwd", cands.POST_BWD),
                             ("chain fwd", cands.CHAIN_FWD), ("chain bwd", cands.CHAIN_BWD)):
            configs += [(f"{label} cand {i}", kw, torch.bfloat16, 4) for i, kw in enumerate(group)]
    bad = []
    lines = [f"triton {triton.__version__}, target sm_90; regs per thread, stack bytes, local ld/st in SASS",
             "", "| config | dtype | n | C | kernel | warps | stages | regs | stack | local ld/st | cp.async | shared B | mma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    seen = set()
    for label, overrides, dtype, n in configs:
        for c in args.widths:
            records: list = []
            with compile_only(records):
                launches(args.tokens, n, c, dtype, args.device, overrides)
            for name, consts, opts, kernel in records:
                key = (name, tuple(sorted(consts.items())), tuple(sorted(opts.items())), str(dtype))
                if key in seen:
                    continue
                seen.add(key)
                r = resources(kernel.asm["cubin"])
                lines.append(
                    f"| {label} | {str(dtype)[6:]} | {n} | {c} | {name} | {kernel.metadata.num_warps} | "
                    f"{kernel.metadata.num_stages} | {r['regs']} | {r['stack']} | {r['local_ld_st']} | "
                    f"{r['async_copies']} | {kernel.metadata.shared} | {' '.join(r['mma'])} |"
                )
                print(lines[-1], flush=True)
                # fp32 streams at n = 8 spill on sm_90 at every tile that fits shared memory (the wide apply sizes);
                # the junction (off by default) spills at the tiles it ran fastest at (NOTES_kernels.md v7)
                spill_ok = (dtype == torch.float32 and n == 8) or name.startswith("_chain")
                if (r["stack"] and not spill_ok) or kernel.metadata.shared > mhc_pre_common.SM90_PROGRAM_SHARED:
                    bad.append(f"{name} ({label}, {str(dtype)[6:]}, n={n}, C={c}): stack {r['stack']} B, "
                               f"shared {kernel.metadata.shared} B")  # fmt: skip
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.check and bad:
        sys.exit("kernels that spill registers or exceed shared memory on sm_90:\n  " + "\n  ".join(bad))


if __name__ == "__main__":
    main()
