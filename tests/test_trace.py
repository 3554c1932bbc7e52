"""Chrome/Perfetto trace and PNG timeline export."""

from __future__ import annotations

import json
import subprocess
import sys

from dualpipe_mhc.scheduler import Costs, build_schedule, simulate
from dualpipe_mhc.scheduler.trace import write_chrome_trace, write_timeline_png


def _result():
    sched = build_schedule("dualpipe", 4, 8)
    return simulate(sched, Costs.uniform(4, 1e-3, 1e-3, 5e-4, act_bytes=1e6, link_bandwidth=1e9, link_latency=1e-5))


def test_trace_json_is_valid_chrome_trace_format(tmp_path):
    result = _result()
    data = json.loads(write_chrome_trace(result, tmp_path / "t.json", "DualPipe").read_text())
    events = data["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(result.events)
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys()
        assert isinstance(e["ts"], float) and e["dur"] >= 0 and isinstance(e["pid"], int)
    names = {e["name"] for e in complete}
    assert "F0.c0" in names and any("&" in n for n in names)  # an overlapped pair, named F..&B..
    threads = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert (0, "compute") in threads and (0, "send->r1") in threads
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == {f"rank {r}" for r in range(4)}
    assert max(e["ts"] + e["dur"] for e in complete) == __import__("pytest").approx(result.step_time * 1e6)


def test_png_timeline_is_written(tmp_path):
    path = write_timeline_png(_result(), tmp_path / "t.png", "DualPipe")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_scheduler_imports_without_torch_ray_triton_or_matplotlib():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         "import dualpipe_mhc.scheduler, dualpipe_mhc.scheduler.measured, dualpipe_mhc.scheduler.config_view"],
        capture_output=True, text=True, check=True,
    ).stderr
    modules = {line.split("|")[-1].strip().split(".")[0] for line in out.splitlines() if "|" in line}
    assert "dualpipe_mhc" in modules
    # pydantic too: the measured-step analysis reads a config through scheduler.config_view only
    assert not modules & {"torch", "ray", "triton", "matplotlib", "pydantic"}
