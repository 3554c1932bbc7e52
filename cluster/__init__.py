"""Ray launch, stage-worker actors, P2P transport with link shaping, NVML sampling, profiling."""
