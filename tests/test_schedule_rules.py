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


SIZE = [
    (["simulate", "--set", "pipeline.microbatches=1000000"],
     "dualpipe-mhc simulate: error: 1F1B on 8 ranks x 1000000 micro-batches is 16,000,000 compute actions, over "
     "the simulator's bound of 1,000,000 per schedule (time and memory grow linearly); use microbatches<=62500"),
    (["simulate", "--schedule", "zb1p,dualpipev", "--set", "pipeline.ranks=4", "--set", "pipeline.microbatches=70000"],
     "dualpipe-mhc simulate: error: DualPipeV on 4 ranks x 70000 micro-batches is 1,120,000 compute actions"),
    (["simulate", "--schedule", "dualpipev", "--set", "pipeline.microbatches=31251"],
     "dualpipe-mhc simulate: error: DualPipeV on 8 ranks x 31251 micro-batches is 1,000,032 compute actions, over "
     "the simulator's bound of 1,000,000 per schedule (time and memory grow linearly); use microbatches<=31250 "
     "or fewer ranks"),
]


@pytest.mark.parametrize("argv, start", SIZE, ids=[" ".join(a) for a, _ in SIZE])
def test_a_size_that_would_not_finish_is_refused_in_one_line_before_any_work(argv, start, capsys, monkeypatch):
    import dualpipe_mhc.scheduler as scheduler

    def no_work(*_a, **_k):
        raise AssertionError("built a schedule before refusing")

    monkeypatch.setattr(scheduler, "build_schedule", no_work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err


def test_a_sweep_skips_only_the_schedules_over_the_size_bound(monkeypatch):
    # 40000 micro-batches on 8 ranks: DualPipeV's 16 stages make 1.28 M actions, 1F1B's 8 fit.
    import dualpipe_mhc.scheduler as scheduler
    from dualpipe_mhc.config import load_config
    from dualpipe_mhc.scheduler import sweep

    cfg = load_config("paper-27b", ["pipeline.microbatches=40000"], schedule_rules=False)
    built = []

    def record(name, ranks, mb):  # stands in for the build, which would take seconds
        built.append(name)
        raise scheduler.ScheduleError("not built in this test")

    monkeypatch.setattr(sweep, "build_schedule", record)
    with pytest.raises(scheduler.ScheduleError) as err:
        sweep.run_sweep(cfg, ["1f1b", "dualpipev"], [1], strict=False)
    assert built == ["1f1b"]
    assert "dualpipev skipped: DualPipeV on 8 ranks x 40000 micro-batches is 1,280,000 compute actions" in str(err.value)


def test_a_long_simulation_prints_a_line_per_phase(capsys):
    assert main(["simulate", "--schedule", "1f1b", "--set", "pipeline.microbatches=2048"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("simulate: ")]
    assert [ln.split(" (")[0] for ln in lines] == [
        "simulate: building 1f1b", "simulate: validating 1f1b", "simulate: simulating 1f1b n=1",
        "simulate: simulating 1f1b n=4",
    ]
