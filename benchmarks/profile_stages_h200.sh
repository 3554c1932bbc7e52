#!/bin/bash
# Issue 12 on one H200: measure paper-27b's distinct pipeline stages (plain n = 1 and mHC n = 4, fused
# kernels, bf16, 4096 tokens per micro-batch), simulate every schedule from them on H800-shaped links
# (200 GB/s + 3 us one way), fit the analytic model to the measurements, and simulate again from the fit.
#   bash benchmarks/profile_stages_h200.sh OUTDIR          (about 3-5 minutes; hard limit 7.5)
# Writes to OUTDIR: device.txt; log.txt (progress, tables); report.json (every measurement, the profiles,
# the simulated rows, the fit); profile_{plain,mhc}_{8,16}st.json (dualpipe-mhc-profile/1: use with
# `simulate --profile`); table.txt; stage_costs.png; timeline_*.png / trace_*.json per schedule;
# hardware_h200-fitted.json (the fitted preset: commit it as dualpipe_mhc/configs/hardware/h200-fitted.json);
# simulate_analytic_h200.json / simulate_calibrated_h200.json (the analytic model before and after the fit).
# On the GPU host without a registry, install .whl first (pydantic etc., see ../shared/gpu-host).
set -euo pipefail
OUT=${1:?usage: bash benchmarks/profile_stages_h200.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import dualpipe_mhc.kernels" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$OUT/device.txt"
cli() { python3 -m dualpipe_mhc.cli "$@"; }
# hardware.preset=h200: the analytic side (and the fit's base rates) is the H200 preset; the link stays
# paper-27b's h800-nvlink. model.split is the default (balanced).
time timeout 450 python3 -m dualpipe_mhc.cli profile-stages --config paper-27b --set hardware.preset=h200 \
  --device cuda --repeats 5 --warmup 2 --fit-hardware h200-fitted --out "$OUT" --json "$OUT/report.json" \
  2>&1 | tee "$OUT/log.txt"
cli simulate --config paper-27b --set hardware.preset=h200 --json "$OUT/simulate_analytic_h200.json" \
  | tee -a "$OUT/log.txt"
cli simulate --config paper-27b --set "hardware.calibration=$OUT/hardware_h200-fitted.json" \
  --json "$OUT/simulate_calibrated_h200.json" | tee -a "$OUT/log.txt"
