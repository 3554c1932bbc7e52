"""``dualpipe-mhc run`` end to end on CPU workers: JSON keys, measured costs, trace and PNG."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray

KEYS = {"schedule", "ranks", "microbatches", "device", "backend", "workers", "start_step", "resumed_from", "steps",
        "final_loss", "measured", "simulated", "sim_error_pct", "costs", "files", "checkpoints", "warmup_steps",
        "config"}


def test_run_command_writes_report_profile_and_trace(ray_cluster, tmp_path):
    from dualpipe_mhc import cli
    from dualpipe_mhc.reports import check_report
    from dualpipe_mhc.scheduler import Costs

    report_file = tmp_path / "run.json"
    out = tmp_path / "out"
    rc = cli.main(["run", "--steps", "3", "--json", str(report_file), "--out", str(out),
                   "--set", "run.checkpoint_every=3", "--set", f"run.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert rc == 0
    report = json.loads(report_file.read_text())
    assert KEYS <= set(report)
    assert check_report("run", report) == []
    assert report["schedule"] == "dualpipev" and report["device"] == "cpu" and report["backend"] == "gloo"
    assert [s["step"] for s in report["steps"]] == [0, 1, 2]
    assert report["steps"][-1]["loss"] < report["steps"][0]["loss"]
    assert report["measured"]["step_time_s"] > 0 and report["simulated"]["step_time_s"] > 0
    assert len(report["checkpoints"]) == 1
    costs = Costs.from_profile(report["files"]["costs"])
    assert costs.num_stages == 4 and all(f > 0 for f in costs.f)
    trace = json.loads((out / "trace.json").read_text())
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert "F0.c0" in names and any("&" in n for n in names)  # DualPipeV has F&B pairs
    assert (out / "timeline.png").stat().st_size > 0
    assert report["files"]["costs"] == str(out / "costs.json")
