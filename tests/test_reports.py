"""Each command's JSON report against its schema (dualpipe_mhc.reports), and each command's tables
readable at 80 columns: nothing cut off with an ellipsis. Runs every command on the CPU in seconds;
the Ray-backed parts (workers, the link benchmark) are replaced by stand-ins of the same shape, and
tests/test_runtime_cli.py checks a real ``run``'s report against the same schema."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from dualpipe_mhc import cli
from dualpipe_mhc.reports import SCHEMAS, check_report


def _render(*tables) -> str:
    console = Console(width=80, file=io.StringIO(), color_system=None)
    for table in tables:
        console.print(table)
    return console.file.getvalue()


def _json(path) -> dict:
    return json.loads(path.read_text())


def test_every_command_has_a_schema():
    assert set(SCHEMAS) == set(cli.COMMANDS)


def test_check_report_names_missing_unexpected_and_mistyped_keys():
    report = {"command": "simulate", "costs": "analytic", "traffic": 1, "rows": [], "skipped": [], "files": {},
              "extra": True}
    problems = check_report("simulate", report)
    assert "simulate.config: missing" in problems and "simulate.extra: unexpected key" in problems
    assert "simulate.traffic: expected str, got int" in problems
    assert check_report("plan", {**_plan_like(), "feasible": 1}) == ["plan.feasible: expected bool, got int"]


def _plan_like() -> dict:
    row = {"block_layers": None, "activation_gib": 1.0, "total_gib": 2.0, "recompute_s": 0.0, "step_time_s": 1.0,
           "fits": True}
    return {"command": "plan", "schedule": "1f1b", "streams": 4, "layers": 8, "closed_form": 1.2,
            "closed_form_block": 1, "budget_gib": 80, "state_gib": 1.0, "state_bytes_per_param": 6.0,
            "feasible": True, "choice": row, "rows": [row], "block_layers": None, "enabled": False, "sharding": "zero1",
            "alternatives": [], "files": {}}


def test_simulate_report_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    args = ["simulate", "--schedule", "dualpipev", "--set", "pipeline.ranks=4", "--set", "pipeline.microbatches=8"]
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")]) == 0
    assert check_report("simulate", _json(tmp_path / "r.json")) == []
    assert cli.main(["simulate", "--json", str(tmp_path / "all.json")]) == 0
    assert check_report("simulate", _json(tmp_path / "all.json")) == []
    printed = capsys.readouterr().out
    assert "DualPipeV" in printed and "…" not in printed


@pytest.mark.parametrize("budget, rc", [("200", 0), ("10", 2)], ids=["feasible", "infeasible"])
def test_plan_report_table_and_files(budget, rc, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "out"
    assert cli.main(["plan", "--budget-gib", budget, "--out", str(out), "--json", str(tmp_path / "r.json")]) == rc
    report = _json(tmp_path / "r.json")
    assert check_report("plan", report) == []
    assert report["feasible"] is (rc == 0) and (report["choice"] is None) is (rc == 2)
    assert report["files"] == {"md": str(out / "plan.md"), "png": str(out / "plan.png"), "json": str(out / "plan.json")}
    assert _json(out / "plan.json") == report  # the file under --out is the --json report
    md = (out / "plan.md").read_text()
    assert md.count("\n| ") == len(report["rows"]) + 2 and ("(chosen)" in md) is (rc == 0)
    assert (out / "plan.png").stat().st_size > 10_000
    assert "…" not in capsys.readouterr().out


def _fake_run(step: float, streams: int) -> dict:
    """A run report of cluster.profile.run_report's shape, 6 steps, the first a slow warm-up."""
    times = [3 * step] + [step * (1 + 0.01 * k) for k in range(5)]
    steps = [{"step_time_s": t, "bubble_s": [0.1 * t, 0.2 * t], "input_wait_s": [0.05 * t] * 2,
              "exposed_comm_s": [0.01 * t, 0.02 * t], "comm_s": [0.05 * streams * t] * 2,
              "peak_memory_bytes": [2**20 * streams] * 2, "loss": 5.0} for t in times]
    return {"device": "cpu", "on_gpu": False, "steps": steps, "nvml": [],
            "simulated": {"step_time_s": step, "bubble_s": [0.1, 0.2], "exposed_comm_s": [0.0, 0.0]}}


class _FakeRunner:
    def __call__(self, cfg):
        return _fake_run({"plain": 0.1, "mhc": 0.105, "hc": 0.12}[cfg.model.residual], cfg.model.streams)

    def close(self):
        pass


def test_profile_report_table_and_spread(tmp_path, monkeypatch):
    from dualpipe_mhc.cluster import profile as prof
    from dualpipe_mhc.commands.profile import tables

    monkeypatch.setattr(prof, "PipelineRunner", _FakeRunner)
    out = tmp_path / "out"
    args = ["profile", "--with-hc", "--steps", "6", "--out", str(out), "--json", str(tmp_path / "r.json")]
    assert cli.main(args) == 0
    report = _json(tmp_path / "r.json")
    assert check_report("profile", report) == []
    assert report["files"]["json"] == str(out / "profile_report.json") and (out / "profile.png").exists()
    spread = report["overhead_spread_pct"]["mhc"]
    assert spread["steps"] == 5 and spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
    assert spread["median"] == pytest.approx(5.0)  # 0.105 / 0.1, step for step
    assert report["warnings"] == []  # identical drift in both variants: the spread is ~0
    text = _render(*tables(report))
    assert "…" not in text and "+5.0 %" in text
    # Wide values, as a noisy CPU run gives them (it once cut "107.2-143.9" to "107.2-143…").
    report["variants"]["mhc"]["step_time_quartiles_s"] = [10.1234, 14.3456, 19.8765]
    report["overhead_spread_pct"]["mhc"].update(q1=-194.4, q3=1299.1)
    report["variants"]["mhc"]["energy_j_per_step_per_gpu"] = [12345.6, 23456.7]
    text = _render(*tables(report))
    assert "…" not in text and "10123.4-19876.5" in text and "-194..+1299" in text and "23456.7" in text


def test_profile_warns_when_the_spread_is_wider_than_the_effect():
    from dualpipe_mhc.cluster.profile import overhead_spread, spread_warnings

    variants = {"plain": {"step_times_s": [9.0, 1.0, 1.0, 1.0, 1.0]},
                "mhc": {"step_times_s": [9.0, 0.8, 1.3, 0.9, 1.2]}}
    spread = overhead_spread(variants, warmup_steps=1)
    assert spread["mhc"]["min"] == pytest.approx(-20.0) and spread["mhc"]["max"] == pytest.approx(30.0)
    warnings = spread_warnings({"mhc": 5.0}, spread)
    assert len(warnings) == 1 and "wider than the effect (+5.0 %)" in warnings[0]
    assert spread_warnings({"mhc": 80.0}, spread) == []


def test_stability_report_and_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    args = ["stability", "--steps", "2", "--depth", "1", "--batch-size", "2", "--demo-depth", "12",
            "--demo-trials", "2", "--set", "model.width=16", "--set", "model.heads=2", "--set", "model.seq_len=16",
            "--no-plot", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")]
    assert cli.main(args) == 0
    assert check_report("stability", _json(tmp_path / "r.json")) == []
    printed = capsys.readouterr().out
    assert "random matrices" in printed and "…" not in printed
    assert "plain: 2 of 2 steps" in printed  # not a terminal: a line per phase, not a vanished bar


def test_stability_tables_of_the_published_run_fit_80_columns():
    from dualpipe_mhc.commands.stability import tables

    report = _json(Path(__file__).parents[1] / "benchmarks" / "stability_cpu" / "stability.json")
    text = _render(*tables(report))
    hc_gain = f"{report['kinds']['hc']['composite_forward_gain'][-1]:.4f}"
    assert "…" not in text and hc_gain in text and "1.11e+14" in text  # HC's gains, whole


def _points(target):
    out = []
    for mib in (0.25, 1, 4, 16, 64, 256, 1024):
        n = int(mib * 2**20)
        p = {"bytes": n, "one_way_s": 1e-3 + n / 2.4e9, "achieved_gbps": n / (1e-3 + n / 2.4e9) / 1e9}
        if target:
            p["target_s"] = 3e-6 + n / 200e9
            p["error_pct"] = 100 * (p["one_way_s"] / p["target_s"] - 1)
        out.append(p)
    return out


def test_calibrate_link_report_and_table(tmp_path, monkeypatch):
    import ray

    from dualpipe_mhc.cluster import calibration, launch, runtime
    from dualpipe_mhc.commands.calibrate_link import table

    def fake_calibrate(group, links, sizes, repeats, progress=None):
        fit = {"bandwidth_gbps": 2.4, "latency_us": 1000.0}
        out = {"raw": {"link": fit, "points": _points(False), "reachable": True}}
        for name in links:
            out[name] = {"target": {"bandwidth_gbps": 200.0, "latency_us": 3.0}, "link": fit,
                         "points": _points(True), "reachable": name == "config"}
        return out

    class Group:
        actors: list = []

        def kill(self):
            pass

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    monkeypatch.setattr(launch, "connect", lambda address, timeout_s=60.0: False)
    monkeypatch.setattr(launch.WorkerGroup, "launch", staticmethod(lambda *a, **k: Group()))
    monkeypatch.setattr(runtime, "resolve_placement", lambda cfg: (False, "gloo"))
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: [])
    out = tmp_path / "out"
    assert cli.main(["calibrate-link", "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = _json(tmp_path / "r.json")
    assert check_report("calibrate-link", report) == []
    assert report["files"] == {"json": str(out / "link_calibration.json")}
    report["links"]["h800-nvlink-long-preset-name"] = report["links"]["h800-nvlink"]
    text = _render(table(report))
    assert "…" not in text and "h800-nvlink" in text and "+25632 %" in text and "448.392" in text


def test_run_comparison_table_fits_80_columns():
    from dualpipe_mhc.commands.run import comparison_table

    ranks = 4
    report = {
        "measured": {"step_time_s": 0.1516, "bubble_fraction": 0.234, "busy_s": [0.1234] * ranks,
                     "input_wait_s": [0.0145] * ranks, "exposed_comm_s": [0.0011] * ranks},
        "simulated": {"step_time_s": 0.1543, "bubble_fraction": 0.21, "busy_s": [0.12] * ranks,
                      "input_wait_s": [0.0009] * ranks, "exposed_comm_s": [0.0008] * ranks},
    }
    text = _render(comparison_table(report))
    assert "…" not in text and "sim - meas" in text and "+1.8 %" in text


def test_the_library_modules_moved_out_of_commands_load_no_heavy_package():
    import subprocess
    import sys

    code = ("import sys, dualpipe_mhc.scheduler.sweep, dualpipe_mhc.scheduler.plan_files, dualpipe_mhc.reports, "
            "dualpipe_mhc.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'triton', 'matplotlib', 'rich'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
