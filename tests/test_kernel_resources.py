"""The fused kernels' launch defaults compile for Hopper (sm_90) without spilling registers and
within shared memory: benchmarks/kernel_resources.py --check, run on the CPU (no GPU needed; the
Triton wheel's ptxas does the register allocation). A spill here cost the backward apply kernel
a quarter of its speed on the H100 (benchmarks/NOTES_kernels.md, v5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton wheel ships no ptxas")
@pytest.mark.parametrize("device", ["default", "NVIDIA H200"])
def test_default_launches_fit_sm90(device):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--widths", "2048", "--defaults-only",
         "--check", "--device", device],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "_pre_bwd_apply_kernel" in proc.stdout  # the report did compile the kernels
