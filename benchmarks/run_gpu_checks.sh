#!/bin/bash
# The GPU checks and benchmarks behind the README's H200 figures, one mode per device call
# (10-minute limit). On the GPU host (no registry): carry .whl/base (pydantic; and .whl/ray for
# the pipeline modes, .whl/hf for transformers 5.23), built here by
#   bash ../shared/gpu-host/make-wheelhouse.sh   (then sort: base/ ray/ hf/, drop the project's own wheel)
# and run from the repository root:
#   bash benchmarks/run_gpu_checks.sh recompute   # GPU tests of recomputation; bench_recompute (time, memory,
#                                                 # the planner's model beside, per-kernel profile)
#   bash benchmarks/run_gpu_checks.sh dsv4        # GPU tests of the dsv4 kernels and against transformers;
#                                                 # bench_dsv4_wrapper
#   bash benchmarks/run_gpu_checks.sh block       # bench_block, both shapes: plain and plain compile (the baselines),
#                                                 # mhc fused (+ compile'd sublayers), mhc liger, mhc compile; carry
#                                                 # .whl/liger too (Liger-Kernel 0.8.5's wheel, from
#                                                 # pip download liger-kernel==0.8.5 --no-deps -d .whl/liger)
#   bash benchmarks/run_gpu_checks.sh stages      # profile-stages on paper-27b (measured stage costs, fitted preset)
#   bash benchmarks/run_gpu_checks.sh pipeline    # the pipeline on one GPU: ranks sharing the device
# Outputs go to $OUT (the device tool's folder) or benchmarks/results/gpu_run; copy them into benchmarks/results/.
set -o pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
wheels=$(ls .whl/*/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# dualpipe_mhc.kernels is the kernels/ folder only through the package-dir mapping: install the project (offline)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
rm -f "$OUT/pip.txt"
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
gpu_tests() {  # $1: log name, then pytest arguments
  local name=$1; shift
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short "$@" >"$OUT/gpu_tests_${name}_$tag.txt" 2>&1
  echo "rc=$?" >>"$OUT/gpu_tests_${name}_$tag.txt"
  grep -h "passed\|failed\|rc=" "$OUT/gpu_tests_${name}_$tag.txt" | tail -3
}

case "$1" in
  recompute)
    gpu_tests recompute -m gpu tests/test_recompute.py
    timeout 330 python3 benchmarks/bench_recompute.py --norm fused eager --profile --passes 3 --out "$OUT" \
      2>&1 | grep -v "top (ms)"
    ;;
  dsv4)
    gpu_tests dsv4_kernels -m gpu -k dsv4 tests/test_kernels.py
    gpu_tests dsv4_transformers tests/test_dsv4_transformers.py tests/test_dsv4_weights.py
    timeout 120 python3 benchmarks/bench_dsv4_wrapper.py --out "$OUT"
    ;;
  block)
    # LigerBlock against its float64 reference in bf16 (skips without .whl/liger), then the benchmark. Its budget,
    # est. per shape: torch.compile warm-ups ~30-40 s each (plain compile's graphs serve mhc fused compile
    # too; mhc compile), Liger's Triton JIT ~30 s, 3 passes x 7 variants x ~0.6 s; 378 s for both shapes
    # with the tests on an H200 (2026-12-01).
    gpu_tests block -m gpu tests/test_bench_block.py
    timeout 480 python3 benchmarks/bench_block.py --variants plain "plain compile" "mhc fused" "mhc fused compile" \
      "mhc fused recompute" "mhc liger" "mhc compile" --passes 3 --rep-ms 400 --out "$OUT"
    ;;
  chain)
    # the junction across sublayers: GPU tests, its launch-settings sweep, the per-kernel table and a quick block A/B
    gpu_tests chain -m gpu tests/test_chain.py tests/test_recompute.py
    timeout 120 python3 benchmarks/bench_kernels.py --sweep --sweep-only chain --no-cases \
      --write-tuning "$OUT/chain_best_tuning.json" --out "$OUT" 2>&1 | grep "best\|device"
    [ -s "$OUT/chain_best_tuning.json" ] || echo '{}' >"$OUT/chain_best_tuning.json"
    timeout 120 python3 benchmarks/bench_kernels.py --widths 2048 4096 7168 --tuning "$OUT/chain_best_tuning.json" \
      --out "$OUT" 2>&1 | grep "chain\|pre fwd \|pre bwd \|post_res" | tail -18
    timeout 200 python3 benchmarks/bench_block.py --variants plain "mhc fused" "mhc fused chain" --passes 3 \
      --rep-ms 400 --tuning "$OUT/chain_best_tuning.json" --out "$OUT" 2>&1 | tail -12
    ;;
  stages)
    gpu_tests stages -m gpu tests/test_stage_build.py tests/test_profile_stages.py tests/test_recompute.py
    timeout 500 bash benchmarks/profile_stages_h200.sh /tmp/stages >/dev/null 2>&1; echo "profile_stages rc=$?"
    tail -40 /tmp/stages/log.txt
    # $OUT brings back 8 files: the small ones as they are, the whole folder as one archive
    cp /tmp/stages/table.txt /tmp/stages/log.txt /tmp/stages/hardware_h200-fitted.json "$OUT"/ 2>/dev/null
    tar czf "$OUT/stages.tar.gz" -C /tmp stages
    ;;
  pipeline)
    timeout 400 python3 benchmarks/run_pipeline_1gpu.py --out /tmp/pipeline 2>&1 | tail -60
    cp /tmp/pipeline/pipeline_1gpu_*.md "$OUT"/ 2>/dev/null
    tar czf "$OUT/pipeline.tar.gz" -C /tmp pipeline
    ;;
  *) echo "usage: bash benchmarks/run_gpu_checks.sh recompute|dsv4|block|chain|stages|pipeline"; exit 2 ;;
esac
