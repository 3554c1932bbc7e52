#!/bin/bash
# The fused-kernel GPU session; each mode fits one device call (10-minute limit):
#   bash benchmarks/run_gpu_kernels.sh check   # GPU tests at full shapes + per-kernel benchmark with block-size sweep
#   bash benchmarks/run_gpu_kernels.sh block   # whole-block fwd+bwd benchmark, shapes a and b, with a kernel breakdown
#   bash benchmarks/run_gpu_kernels.sh final   # block benchmark, per-kernel benchmark, then the GPU tests
#   bash benchmarks/run_gpu_kernels.sh ab      # one tight call: sweep of mhc_pre's tuning candidates -> best;
#       per-kernel table (best vs v2 defaults); block A/B (plain, fused v2, fused best); NVML smoke;
#       every GPU test of the repo (pydantic etc. from .whl, see /work/shared/gpu-host). At most 8 files in $OUT.
#   bash benchmarks/run_gpu_kernels.sh tune    # every GPU test (3 processes), then the sweep (CUDA-graph timing)
#       -> $OUT/best_tuning.json, the split forward's parts, the per-kernel table at the best tuning
#   bash benchmarks/run_gpu_kernels.sh release # every GPU test, sweep -> best, per-kernel table (C 2048/4096/7168),
#       block: plain, fused (best), fused v2, eager, torch.compile, with the kernel breakdown. 8 files in $OUT.
# Outputs go to $OUT (the device tool's folder) or benchmarks/results/gpu_run; copy them into benchmarks/results/.
set -o pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# dualpipe_mhc.kernels is the kernels/ folder only through the package-dir mapping: install the project (offline)
python3 -c "import dualpipe_mhc.kernels" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
rm -f "$OUT/pip.txt"
case "${1:-check}" in
  check)
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider --durations=5 2>&1 | tail -40
    } 2>&1 | tee "$OUT/kernels_gpu_tests.log"
    python3 benchmarks/bench_kernels.py --sweep --out "$OUT" 2>&1 | tee "$OUT/kernels_bench.log"
    ;;
  block)
    python3 benchmarks/bench_block.py --profile --out "$OUT" 2>&1 | tee "$OUT/kernels_block.log"
    ;;
  final)
    timeout 330 python3 benchmarks/bench_block.py --profile --out "$OUT" 2>&1 | tee "$OUT/kernels_block.log"
    timeout 80 python3 benchmarks/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels_bench.log"
    { timeout 40 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -k "77-2048-1-bf16"
      timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -rf --tb=short
    } 2>&1 | tee "$OUT/kernels_gpu_tests.log"
    ;;
  ab)
    tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    best=/tmp/best_tuning.json
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      timeout 110 python3 benchmarks/bench_kernels.py --sweep --no-cases --write-tuning $best --out "$OUT"
      [ -s $best ] || echo '{"fwd_split": false, "apply_dphi_bf16": false}' >$best
      timeout 60 python3 benchmarks/bench_kernels.py --widths 2048 4096 --tuning $best --out "$OUT"
      timeout 140 python3 benchmarks/bench_block.py --variants plain "mhc fused v2" "mhc fused" --rep-ms 800 \
        --profile --tuning $best --out "$OUT"
      timeout 25 python3 benchmarks/nvml_smoke.py --out "$OUT/nvml_smoke_$tag.json"
    } 2>&1 | tee "$OUT/all.log"
    timeout 150 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --tb=short \
      --continue-on-collection-errors --durations=5 2>&1 | tee "$OUT/gpu_tests_$tag.txt"
    ;;
  ab2)  # the second call: new defaults vs v2 in the block (order swapped), the split forward's parts, GPU tests
    tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    { timeout 40 python3 benchmarks/bench_kernels.py --split-parts --widths 2048 4096
      timeout 110 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused v2" --rep-ms 800 \
        --profile --out "$OUT"
    } 2>&1 | tee "$OUT/all2.log"
    # every GPU test of the repo, in three processes at once (compilation is the slow part; no timing here)
    run() { timeout 240 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --tb=short \
              --continue-on-collection-errors -k "$1" >"/tmp/gpu_tests_$2.txt" 2>&1; echo "rc=$?" >>"/tmp/gpu_tests_$2.txt"; }
    run "layer_matches and fp32" 1 & run "layer_matches and bf16" 2 & run "not layer_matches" 3 & wait
    for i in 1 2 3; do echo "=== part $i"; cat /tmp/gpu_tests_$i.txt; done | tee "$OUT/gpu_tests_$tag.txt"
    ;;
  tune)
    tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
    run() { timeout 240 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --tb=short \
              --continue-on-collection-errors -k "$1" >"/tmp/gpu_tests_$2.txt" 2>&1; echo "rc=$?" >>"/tmp/gpu_tests_$2.txt"; }
    run "layer_matches and fp32" 1 & run "layer_matches and bf16" 2 & run "not layer_matches" 3 & wait
    for i in 1 2 3; do echo "=== part $i"; cat /tmp/gpu_tests_$i.txt; done >"$OUT/gpu_tests_$tag.txt"
    grep -h "passed\|failed\|rc=" "$OUT/gpu_tests_$tag.txt"
    { timeout 150 python3 benchmarks/bench_kernels.py --sweep --no-cases --write-tuning "$OUT/best_tuning.json" --out "$OUT"
      [ -s "$OUT/best_tuning.json" ] || echo '{}' >"$OUT/best_tuning.json"
      timeout 40 python3 benchmarks/bench_kernels.py --split-parts --widths 2048 4096
      timeout 90 python3 benchmarks/bench_kernels.py --widths 2048 4096 --tuning "$OUT/best_tuning.json" --out "$OUT"
    } 2>&1 | tee "$OUT/tune.log"
    ;;
  release)
    tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    run() { timeout 240 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --tb=short \
              --continue-on-collection-errors -k "$1" >"/tmp/gpu_tests_$2.txt" 2>&1; echo "rc=$?" >>"/tmp/gpu_tests_$2.txt"; }
    run "layer_matches and fp32" 1 & run "layer_matches and bf16" 2 & run "not layer_matches" 3 & wait
    for i in 1 2 3; do echo "=== part $i"; cat /tmp/gpu_tests_$i.txt; done >"$OUT/gpu_tests_$tag.txt"
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
      grep -h "passed\|failed\|rc=" "$OUT/gpu_tests_$tag.txt"
      timeout 120 python3 benchmarks/bench_kernels.py --sweep --no-cases --write-tuning "$OUT/best_tuning.json" --out "$OUT"
      [ -s "$OUT/best_tuning.json" ] || echo '{}' >"$OUT/best_tuning.json"
      timeout 90 python3 benchmarks/bench_kernels.py --widths 2048 4096 7168 --tuning "$OUT/best_tuning.json" --out "$OUT"
      timeout 280 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused v2" "mhc eager" "mhc compile" \
        --rep-ms 800 --profile --tuning "$OUT/best_tuning.json" --out "$OUT"
    } 2>&1 | tee "$OUT/release.log"
    ;;
  apply)  # sweep (apply candidates at <= 128 registers added) -> best; per-kernel table; block A/B; candidate tests
    tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    { timeout 150 python3 benchmarks/bench_kernels.py --sweep --no-cases --write-tuning "$OUT/best_tuning.json" --out "$OUT"
      [ -s "$OUT/best_tuning.json" ] || echo '{}' >"$OUT/best_tuning.json"
      timeout 70 python3 benchmarks/bench_kernels.py --widths 2048 4096 7168 --tuning "$OUT/best_tuning.json" --out "$OUT"
      timeout 120 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused v2" --rep-ms 800 \
        --tuning "$OUT/best_tuning.json" --out "$OUT"
    } 2>&1 | tee "$OUT/apply.log"
    timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -rfEs --tb=short \
      -k "tuning_candidates or ops_alone" 2>&1 | tail -15 | tee "$OUT/gpu_tests_$tag.txt"
    ;;
  ncu)  # Nsight Compute on the apply kernel and, for contrast, the post/res backward (C = 4096)
    sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section ComputeWorkloadAnalysis --section SchedulerStats"
    for spec in "apply:_pre_bwd_apply" "post_bwd:_post_res_bwd" "pre_fwd:_pre_fwd_partial"; do
      op=${spec%%:*}; kernel=${spec##*:}
      timeout 150 ncu --clock-control none --kernel-name "regex:$kernel" --launch-skip 2 --launch-count 1 $sections \
        python3 benchmarks/ncu_target.py --op "$op" --width 4096 >"$OUT/ncu_$op.txt" 2>&1
      echo "== $op rc=$?"; grep -E "Throughput|Duration|Registers|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Stall|Bank|L1/TEX Hit|L2 Hit|One or More|No Eligible" "$OUT/ncu_$op.txt" | head -30
    done
    ;;
  *) echo "usage: $0 check|block|final|ab|ab2|tune|release|apply|ncu"; exit 2 ;;
esac
