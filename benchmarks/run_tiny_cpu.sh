#!/usr/bin/env bash
# `dualpipe-mhc run` on the tiny default (DualPipeV, 2 Ray CPU actors over gloo, 5 steps):
# measured step time beside the simulator fed the run's own measured action costs.
# Device: the project's 2-core CPU machine. Writes benchmarks/results/run_tiny_cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/run_tiny_cpu
mkdir -p "$out"
COLUMNS=110 dualpipe-mhc run --out "$out" --json "$out/report.json" --set run.checkpoint_dir=/tmp/dualpipe-mhc-ckpt "$@" \
  | tee "$out/table.txt"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, $(date -u +%FT%TZ)" > "$out/load.txt"
