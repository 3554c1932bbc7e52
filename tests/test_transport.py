"""The transport between two CPU workers (gloo): a shaped link takes latency + bytes/bandwidth,
measured the way ``dualpipe-mhc calibrate-link`` measures it."""

from __future__ import annotations

import pytest

from dualpipe_mhc.cluster.linkbench import fit_line
from dualpipe_mhc.cluster.shaping import LinkShaper, chunk_bounds

pytestmark = pytest.mark.ray

RATE = 100e6  # 100 MB/s: far below gloo between two local processes (~1-3 GB/s)
LATENCY = 1e-3


def test_shaped_transfer_takes_latency_plus_bytes_over_bandwidth(pipeline2):
    from dualpipe_mhc.cluster.calibration import calibrate

    sizes = [2 << 20, 8 << 20]
    out = calibrate(pipeline2.group, {"test": (RATE, LATENCY)}, sizes, repeats=3)
    raw = out["raw"]["link"]["bandwidth_gbps"] * 1e9
    assert raw > 3 * RATE, f"raw gloo link measured {raw / 1e9:.2f} GB/s: too slow to test shaping at {RATE / 1e6:g} MB/s"
    entry = out["test"]
    assert entry["reachable"]
    for p in entry["points"]:
        target = LATENCY + p["bytes"] / RATE
        assert p["target_s"] == pytest.approx(target)
        assert abs(p["one_way_s"] / target - 1) < 0.15, f"{p['bytes']} B took {p['one_way_s'] * 1e3:.1f} ms, want {target * 1e3:.1f}"
    assert entry["link"]["bandwidth_gbps"] == pytest.approx(RATE / 1e9, rel=0.15)


def test_chunks_cover_the_message_and_respect_elements():
    for nbytes, chunk, elem in [(10, 4, 2), (4096, 1000, 4), (1, 64, 1), (0, 8, 4), (12, 12, 4)]:
        bounds = chunk_bounds(nbytes, chunk, elem)
        assert bounds[0][0] == 0 and bounds[-1][1] == nbytes
        assert all(a % elem == 0 and b > a or nbytes == 0 for a, b in bounds)
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


def test_chunk_size_follows_the_link():
    slow, fast = LinkShaper(100e6, 0.0), LinkShaper(200e9, 0.0)
    assert slow.chunk_bytes_for(1 << 30) == 98304  # ~1 ms of link time, 4 KiB aligned
    assert fast.chunk_bytes_for(1 << 30) == 64 << 20  # capped
    with pytest.raises(ValueError):
        LinkShaper(0.0, 0.0)


def test_fit_line_recovers_latency_and_bandwidth():
    points = [{"bytes": n, "one_way_s": 5e-6 + n / 50e9} for n in (1 << 20, 1 << 24, 1 << 28)]
    fit = fit_line(points)
    assert fit["bandwidth_gbps"] == pytest.approx(50.0, rel=1e-6)
    assert fit["latency_us"] == pytest.approx(5.0, rel=1e-4)


def test_pipeline_step_pays_for_a_shaped_link(pipeline2):
    """On a slow shaped link no step can beat micro-batch 0's round trip: DualPipeV on 2 ranks
    sends its activation out and back and its gradient out and back, four transfers in a row.
    Reconfiguring onto the link must rebuild the transport for that to hold."""
    from conftest import small_config
    from dualpipe_mhc.cluster.measure import activation_bytes
    from dualpipe_mhc.cluster.train import pipeline_schedule

    fast = small_config("dualpipev", 2, 4)
    slow = fast.model_copy(update={"link": fast.link.model_copy(update={"bandwidth_gbps": 0.0005, "latency_us": 2000.0,
                                                                        "shape": True})})
    per_message = 2e-3 + activation_bytes(slow) / 0.5e6
    assert per_message > 0.03
    steps = {}
    for name, cfg in (("fast", fast), ("slow", slow)):
        pipeline2.configure(cfg, pipeline_schedule(cfg))
        steps[name] = [pipeline2.step(s, apply_optimizer=False) for s in range(3)][1:]
    slowest_possible = 4 * per_message
    assert min(r.step_time for r in steps["slow"]) > 0.95 * slowest_possible
    # the ranks spend the transfers waiting for inputs, which the fast link does not make them do
    waits = {k: min(sum(r.waiting()) for r in v) for k, v in steps.items()}
    assert waits["slow"] > waits["fast"] + 2 * per_message, waits
