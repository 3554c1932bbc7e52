#!/usr/bin/env bash
# The README's main table: `dualpipe-mhc simulate` on its default (paper-27b, 8 H800-linked ranks),
# analytic costs, all four schedules at n = 1 and n = 4, plus the recomputation plan for it.
# Deterministic (no timing): any machine reproduces it. Writes benchmarks/results/simulate_paper27b/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/simulate_paper27b
mkdir -p "$out"
COLUMNS=100 dualpipe-mhc simulate --out "$out" --json "$out/report.json" | tee "$out/table.txt"
# An infeasible budget exits 2 by design; plan.json / plan.md / plan.png are written either way.
COLUMNS=100 dualpipe-mhc plan --out "$out" 2>&1 | tee "$out/plan.txt" || true  # 2>&1: the verdict is on stderr
# keep one trace (DualPipe, n = 4) and the PNGs; the rest regenerate in seconds
find "$out" -name "trace_*.json" ! -name "trace_dualpipe_n4.json" -delete
