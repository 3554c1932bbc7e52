"""Real-NVML smoke test of cluster/nvml.py's NvmlSampler on the local GPU: start, a few steps of
GPU work (bf16 matrix products), stop; print and save the report.

    python benchmarks/nvml_smoke.py [--steps 5] [--out benchmarks/results/nvml_smoke.json]

Checks the counters answer on this GPU: each step should show energy from the counter,
a mean power above idle and utilisation near 100 %; NVLink bytes stay ~0 on one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualpipe_mhc.cluster.nvml import NvmlSampler, nvml_device_for_torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--step-s", type=float, default=0.4, help="GPU work per step, seconds (about)")
    ap.add_argument("--out", default="benchmarks/results/nvml_smoke.json")
    args = ap.parse_args()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    (a @ b).sum().item()  # warm-up: cuBLAS handle and kernel selection outside the steps
    device = nvml_device_for_torch(0)
    sampler = NvmlSampler(device=device, period_s=0.02).start()
    t0 = time.time()
    for _ in range(args.steps):
        sampler.begin_step()
        t_end = time.time() + args.step_s
        while time.time() < t_end:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
        sampler.end_step()
    sampler.stop()
    report = sampler.report()
    report.update(
        torch_device=torch.cuda.get_device_name(), nvml_device_arg=str(device), wall_s=time.time() - t0,
        samples=len(sampler.samples), first_samples=sampler.samples_as_dicts()[:3],
    )  # fmt: skip
    text = json.dumps(report, indent=1, default=str)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    ok = report["available"] and all(s.get("energy_source") != "unavailable" for s in report["steps"])
    print("NVML smoke:", "OK" if ok else "INCOMPLETE", f"({len(report['steps'])} steps)")


if __name__ == "__main__":
    main()
