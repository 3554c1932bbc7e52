"""``dualpipe-mhc simulate`` end to end: the table, --json keys, --out files, one-line errors."""

from __future__ import annotations

import json

from dualpipe_mhc.cli import main

ROW_KEYS = {
    "schedule", "streams", "step_time_s", "bubble_fraction", "exposed_comm_s", "hidden_comm_s",
    "peak_activation_gib", "peak_inflight", "overhead_vs_n1", "per_rank",
}


def test_default_run_compares_four_schedules_at_n1_and_n4(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["simulate", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("1F1B", "ZB1P", "DualPipe", "DualPipeV", "overhead %"):
        assert name in printed
    report = json.loads(out.read_text())
    assert {"command", "costs", "traffic", "config", "rows", "skipped", "files"} <= report.keys()
    rows = report["rows"]
    assert [(r["schedule"], r["streams"]) for r in rows] == [
        (s, n) for s in ("1f1b", "zb1p", "dualpipe", "dualpipev") for n in (1, 4)
    ]
    for row in rows:
        assert row.keys() == ROW_KEYS
        assert len(row["per_rank"]["bubble_s"]) == report["config"]["ranks"] == 8
        if row["streams"] == 4:
            assert row["overhead_vs_n1"] > 0 and row["exposed_comm_s"] > 0
        else:
            assert row["overhead_vs_n1"] is None
    step = {(r["schedule"], r["streams"]): r["step_time_s"] for r in rows}
    assert step[("dualpipe", 4)] < step[("zb1p", 4)] < step[("1f1b", 4)]


def test_out_writes_traces_and_a_png(tmp_path):
    out_dir = tmp_path / "out"
    report_path = tmp_path / "r.json"
    args = ["simulate", "--schedule", "dualpipev", "--set", "pipeline.ranks=4", "--set", "pipeline.microbatches=8"]
    assert main([*args, "--out", str(out_dir), "--json", str(report_path)]) == 0
    files = json.loads(report_path.read_text())["files"]
    assert set(files) == {"dualpipev_n1", "dualpipev_n4"}
    assert (out_dir / "trace_dualpipev_n1.json").exists() and (out_dir / "timeline_dualpipev_n4.png").exists()
    assert json.loads((out_dir / "trace_dualpipev_n4.json").read_text())["traceEvents"]


def test_profile_costs_replace_the_analytic_model(tmp_path):
    from dualpipe_mhc.scheduler import Costs

    profile = tmp_path / "costs.json"
    Costs.uniform(4, 0.01, 0.01, 0.005, act_bytes=1e6).write_profile(profile)
    report_path = tmp_path / "r.json"
    args = ["simulate", "--schedule", "1f1b", "--set", "pipeline.ranks=4", "--profile", str(profile)]
    assert main([*args, "--json", str(report_path)]) == 0
    rows = json.loads(report_path.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["streams"] is None
    assert rows[0]["bubble_fraction"] > 0


def test_bad_input_is_one_line_naming_the_fix(capsys):
    assert main(["simulate", "--schedule", "dualpipe", "--set", "pipeline.ranks=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "dualpipe-mhc simulate: error: DualPipe needs an even number of ranks, got 3; "
        "use 1F1B, ZB1P or DualPipeV, or 4 ranks"
    )
    assert main(["simulate", "--schedule", "gpipe"]) == 2
    assert "use one of ['1f1b', 'dualpipe', 'dualpipev', 'zb1p']" in capsys.readouterr().err


def test_without_schedule_an_impossible_one_is_skipped_with_a_note(tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert main(["simulate", "--set", "pipeline.ranks=3", "--set", "pipeline.schedule=1f1b", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert {r["schedule"] for r in report["rows"]} == {"1f1b", "zb1p", "dualpipev"}
    assert report["skipped"] and "DualPipe needs an even number of ranks" in report["skipped"][0]


def test_with_a_profile_and_no_schedule_the_ones_of_other_stage_counts_are_skipped(tmp_path):
    from dualpipe_mhc.scheduler import Costs

    profile = tmp_path / "costs.json"
    Costs.uniform(4, 0.01, 0.01, 0.005, act_bytes=1e6).write_profile(profile)  # 2 ranks x 2 chunks: DualPipeV
    report_path = tmp_path / "r.json"
    assert main(["simulate", "--config", "tiny", "--profile", str(profile), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert [r["schedule"] for r in report["rows"]] == ["dualpipev"]
    assert len(report["skipped"]) == 3 and "has 4 stages but 1f1b" in report["skipped"][0]


def test_a_swept_schedule_with_more_stages_than_layers_is_skipped(tmp_path):
    report_path = tmp_path / "r.json"
    args = ["--set", "pipeline.schedule=1f1b", "--set", "model.layers=4", "--set", "pipeline.ranks=4"]
    assert main(["simulate", *args, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert {r["schedule"] for r in report["rows"]} == {"1f1b", "zb1p", "dualpipe"}
    assert any("dualpipev" in note and "model.layers>=8" in note for note in report["skipped"])


def test_streams_in_any_order_still_compare_against_n1(tmp_path):
    report_path = tmp_path / "r.json"
    assert main(["simulate", "--schedule", "1f1b", "--streams", "4,1,4", "--json", str(report_path)]) == 0
    rows = json.loads(report_path.read_text())["rows"]
    assert [r["streams"] for r in rows] == [1, 4] and rows[1]["overhead_vs_n1"] > 0


def test_calibrate_link_refuses_a_non_finite_size_before_starting_anything(capsys):
    for sizes in ("1,nan", "inf", "-1"):
        assert main(["calibrate-link", "--sizes-mib", sizes]) == 2
        err = capsys.readouterr().err
        assert f"--sizes-mib '{sizes}' is invalid: sizes must be positive and finite" in err and err.count("\n") == 1
