"""Pipeline rules apply to the schedules asked for (issue 11 items 5 and 6).

The builders own the per-schedule rules (``scheduler.builders.check_schedule_args``); a
config checks them for ``pipeline.schedule`` only, and ``simulate`` checks each schedule
it sweeps: one that cannot take the count is skipped and listed, not the whole command.
"""

from __future__ import annotations

import json

import pytest

from dualpipe_mhc.cli import main


def _report(tmp_path, *args: str) -> dict:
    out = tmp_path / "r.json"
    assert main(["simulate", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_count_only_dualpipev_refuses_does_not_refuse_1f1b(tmp_path):
    # paper-27b is configured for DualPipeV on 8 ranks, which needs >= 16 micro-batches.
    report = _report(tmp_path, "--schedule", "1f1b", "--set", "pipeline.microbatches=5")
    assert {r["schedule"] for r in report["rows"]} == {"1f1b"} and report["skipped"] == []


def test_a_sweep_skips_and_lists_the_schedules_that_cannot_take_the_count(tmp_path):
    report = _report(tmp_path, "--set", "pipeline.microbatches=5")
    assert {r["schedule"] for r in report["rows"]} == {"1f1b", "zb1p"}
    assert len(report["skipped"]) == 2
    assert report["skipped"][0].startswith("dualpipe skipped: DualPipe needs an even number of micro-batches >= 2*ranks=16")
    assert report["skipped"][1].startswith("dualpipev skipped: DualPipeV needs a micro-batch count >= 2*ranks=16, got 5")


def test_dualpipev_takes_an_odd_count(tmp_path):
    report = _report(tmp_path, "--schedule", "dualpipev", "--set", "pipeline.microbatches=17")
    assert [r["schedule"] for r in report["rows"]] == ["dualpipev", "dualpipev"]
    assert all(0 < r["bubble_fraction"] < 1 for r in report["rows"])


BAD = [
    # (command line, the one line on stderr)
    (["simulate", "--schedule", "dualpipev", "--set", "pipeline.microbatches=5"],
     "dualpipe-mhc simulate: error: DualPipeV needs a micro-batch count >= 2*ranks=16, got 5; use microbatches=16"),
    # asked for two: the one that cannot take the count refuses before the other is simulated
    (["simulate", "--schedule", "1f1b,dualpipe", "--set", "pipeline.microbatches=17"],
     "dualpipe-mhc simulate: error: DualPipe needs an even number of micro-batches >= 2*ranks=16, got 17; "
     "use microbatches=18"),
    (["run", "--set", "pipeline.microbatches=3"],
     "dualpipe-mhc run: error: pipeline.microbatches=3: DualPipeV needs a micro-batch count >= 2*ranks=4, got 3; "
     "use microbatches=4"),
    (["run", "--set", "pipeline.schedule=dualpipe", "--set", "pipeline.microbatches=5"],
     "dualpipe-mhc run: error: pipeline.microbatches=5: DualPipe needs an even number of micro-batches >= "
     "2*ranks=4, got 5; use microbatches=6"),
]


@pytest.mark.parametrize("argv, line", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_count_the_schedule_cannot_take_is_one_line_before_any_work(argv, line, capsys, monkeypatch):
    import dualpipe_mhc.commands.run as run_command
    import dualpipe_mhc.scheduler as scheduler

    def no_work(*_a, **_k):
        raise AssertionError("worked before refusing")

    # simulate imports these from the package when it runs; run would start here
    for name in ("simulate", "validate"):
        monkeypatch.setattr(scheduler, name, no_work)
    monkeypatch.setattr(run_command, "main", no_work)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n"
    assert "Traceback" not in captured.out + captured.err
