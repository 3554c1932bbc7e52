#!/bin/bash
# The fused-kernel GPU runs; each mode fits one device call (10-minute limit, at most 8 files in $OUT).
# On the GPU host (no registry): install .whl first (pydantic etc., see /work/shared/gpu-host), then
#   bash benchmarks/run_gpu_kernels.sh release  # every GPU test of the repo (3 processes); sweep of mhc_pre's
#       tuning candidates -> best_tuning.json; per-kernel table (C 2048/4096/7168) at the best; block: plain,
#       fused (best), fused v2, eager, torch.compile (the README's tables)
#   bash benchmarks/run_gpu_kernels.sh sweep    # sweep -> best; per-kernel table; block plain / fused;
#       GPU tests of every tuning candidate and the layer at T = 1537 (an A/B call after a kernel change)
#   bash benchmarks/run_gpu_kernels.sh final    # every GPU test; per-kernel table and block (plain, fused, fused
#       recompute, dsv4 fused; 5 interleaved passes) at the committed defaults: the figures a release quotes
#   bash benchmarks/run_gpu_kernels.sh fwdjunction  # every GPU test; the forward junction alone (chain, not
#       chain_bwd): its sweep, and the block plain / fused / fused chain fwd in 3 interleaved passes
#   bash benchmarks/run_gpu_kernels.sh retune "pre fwd" -- 7 8  # those kernels' sweep; block at the defaults and
#       at the sweep's best; GPU tests of the listed candidates
#   bash benchmarks/run_gpu_kernels.sh profile  # block with the per-kernel breakdown (torch.profiler), timed
#       first and profiled after (a variant timed right after a profiler pass ran 16 % slow)
#   bash benchmarks/run_gpu_kernels.sh ncu      # Nsight Compute on the apply, post/res backward and forward
#       partial kernels at C = 4096 (clocks left as found)
# The v1-v4 runs of benchmarks/NOTES_kernels.md used modes (check, block, final, ab, ab2) that this
# script had before 2026-11-25's second session; git history keeps them.
# Outputs go to $OUT (the device tool's folder) or benchmarks/results/gpu_run; copy them into benchmarks/results/.
set -o pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# dualpipe_mhc.kernels is the kernels/ folder only through the package-dir mapping: install the project (offline)
python3 -c "import dualpipe_mhc.kernels" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
rm -f "$OUT/pip.txt"
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
best="$OUT/best_tuning.json"

gpu_tests() {  # every GPU test of the repo, in four processes at once (compilation is the slow part)
  run() { timeout 300 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --tb=short \
            --continue-on-collection-errors -k "$1" >"/tmp/gpu_tests_$2.txt" 2>&1; echo "rc=$?" >>"/tmp/gpu_tests_$2.txt"; }
  run "layer_matches and fp32" 1 & run "layer_matches and bf16" 2 & run "tuning_candidates or chain" 3 &
  run "not layer_matches and not tuning_candidates and not chain" 4 & wait
  for i in 1 2 3 4; do echo "=== part $i"; cat /tmp/gpu_tests_$i.txt; done >"$OUT/gpu_tests_$tag.txt"
  grep -h "passed\|failed\|rc=" "$OUT/gpu_tests_$tag.txt"
}

sweep_and_table() {  # the sweep picks the best candidate per kernel; the table times it (and v2) per kernel
  timeout 150 python3 benchmarks/bench_kernels.py --sweep --no-cases --write-tuning "$best" --out "$OUT"
  [ -s "$best" ] || echo '{}' >"$best"
  timeout 90 python3 benchmarks/bench_kernels.py --widths 2048 4096 7168 --tuning "$best" --out "$OUT"
}

case "${1:-release}" in
  release)
    gpu_tests
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
      sweep_and_table
      timeout 220 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused v2" "mhc eager" \
        "mhc compile" --rep-ms 800 --tuning "$best" --out "$OUT"
    } 2>&1 | tee "$OUT/release.log"
    ;;
  sweep)
    { sweep_and_table
      timeout 100 python3 benchmarks/bench_block.py --variants plain "mhc fused" --rep-ms 800 \
        --tuning "$best" --out "$OUT"
    } 2>&1 | tee "$OUT/sweep.log"
    timeout 220 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -rfEs --tb=short \
      -k "tuning_candidates or ops_alone or (layer_matches and 1537)" 2>&1 | tail -15 | tee "$OUT/gpu_tests_$tag.txt"
    ;;
  final)
    gpu_tests
    { timeout 90 python3 benchmarks/bench_kernels.py --widths 2048 4096 7168 --out "$OUT"
      timeout 300 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused recompute" "dsv4 fused" \
        --passes 5 --rep-ms 400 --out "$OUT"
    } 2>&1 | tee "$OUT/final.log"
    ;;
  fwdjunction)
    # the forward junction alone (chain on, chain_bwd off): every GPU test, its launch-settings sweep, then the
    # block against the op-local kernels, interleaved passes
    gpu_tests
    { timeout 120 python3 benchmarks/bench_kernels.py --sweep --sweep-only "chain fwd" --no-cases \
        --write-tuning "$OUT/chain_fwd_best.json" --out "$OUT" | grep -v "^  sweep"
      [ -s "$OUT/chain_fwd_best.json" ] || echo '{}' >"$OUT/chain_fwd_best.json"
      timeout 200 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused chain fwd" --passes 3 \
        --rep-ms 400 --tuning "$OUT/chain_fwd_best.json" --out "$OUT"
    } 2>&1 | tee "$OUT/fwdjunction.log"
    ;;
  retune)
    # bash benchmarks/run_gpu_kernels.sh retune "pre fwd" "pre bwd reduce" [-- CANDIDATE_INDEX ...]: sweep those
    # kernels' candidates, then the block at the committed defaults ($OUT/defaults) and at the sweep's best ($OUT),
    # 3 interleaved passes each; the GPU test of each listed candidate (kernel_candidates.ALL indices)
    shift; kernels=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do kernels+=("$1"); shift; done; shift
    { timeout 150 python3 benchmarks/bench_kernels.py --sweep --sweep-only "${kernels[@]}" --no-cases \
        --write-tuning "$best" --out "$OUT" | grep -v "^  sweep"
      [ -s "$best" ] || echo '{}' >"$best"
      timeout 120 python3 benchmarks/bench_block.py --variants plain "mhc fused" --passes 3 --rep-ms 400 \
        --out "$OUT/defaults" | tail -4
      timeout 120 python3 benchmarks/bench_block.py --variants plain "mhc fused" --passes 3 --rep-ms 400 \
        --tuning "$best" --out "$OUT" | tail -4
    } 2>&1 | tee "$OUT/retune.log"
    ids=(); for i in "$@"; do ids+=("tests/test_kernels.py::test_tuning_candidates_gpu[$i]"); done
    [ ${#ids[@]} -gt 0 ] && timeout 150 python3 -m pytest -q -m gpu "${ids[@]}" -p no:cacheprovider -rfEs \
      --tb=short 2>&1 | tail -8 | tee "$OUT/gpu_tests_$tag.txt"
    ;;
  profile)
    timeout 300 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused v2" --rep-ms 800 \
      --profile --out "$OUT" 2>&1 | tee "$OUT/profile.log"
    ;;
  ncu)
    sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section ComputeWorkloadAnalysis --section SchedulerStats"
    for spec in "apply:_pre_bwd_apply" "post_bwd:_post_res_bwd" "pre_fwd:_pre_fwd_partial"; do
      op=${spec%%:*}; kernel=${spec##*:}
      timeout 150 ncu --clock-control none --kernel-name "regex:$kernel" --launch-skip 2 --launch-count 1 $sections \
        python3 benchmarks/ncu_target.py --op "$op" --width 4096 >"$OUT/ncu_$op.txt" 2>&1
      echo "== $op rc=$?"
      grep -E "Throughput|Duration|Registers|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Waves" \
        "$OUT/ncu_$op.txt" | head -30
    done
    ;;
  *) echo "usage: $0 release|sweep|final|fwdjunction|retune|profile|ncu"; exit 2 ;;
esac
