#!/usr/bin/env bash
# The stability report as published: plain / HC / mHC on the bundled corpus, default settings of
# `dualpipe-mhc stability` (tiny config: C=64, 4 heads, n=4; --depth 8 layers, 300 steps, lr 3e-3,
# batch 16 x 64 bytes, clip 1.0, seed 0) plus the random-matrix demo to depth 500.
# Device: the project's 2-core CPU machine (torch 2.13.0+cpu). Writes benchmarks/stability_cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/stability_cpu
COLUMNS=110 dualpipe-mhc stability --out benchmarks/stability_cpu "$@" | tee benchmarks/stability_cpu/table.txt
