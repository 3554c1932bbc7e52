#!/usr/bin/env bash
# Link calibration on the CPU box: two Ray CPU actors over gloo, raw and shaped.
# Shaping can only slow a link down, so on gloo (~1-3 GB/s between two local processes)
# the GPU presets measure the raw link ("reachable": false); 0.1 GB/s + 1 ms (the
# config's link here) is the case the shaper is checked on (tests/test_transport.py).
# Result: benchmarks/results/calibrate_cpu/link_calibration.json (+ report.json, load.txt:
# the box is shared, so the load average during the run is recorded beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/calibrate_cpu
dualpipe-mhc calibrate-link --presets config,gloo-cpu,ib-400g \
  --set link.preset=none --set link.bandwidth_gbps=0.1 --set link.latency_us=1000 \
  --sizes-mib 0.25,1,4,16,64 --repeats 5 --out "$out" --json "$out/report.json"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, $(date -u +%FT%TZ)" > "$out/load.txt"
