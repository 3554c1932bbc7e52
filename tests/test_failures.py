"""A broken run ends within run.timeout_s, names the rank and the action, and leaves no
worker process behind: a killed worker, an exception in one rank, a transfer that never
completes, a rank that stops making progress. A bad config fails before any worker starts."""

from __future__ import annotations

import os
import time

import pytest

from conftest import small_config

pytestmark = pytest.mark.ray

TIMEOUT_S = 4.0
CLEANUP_S = 8.0  # killing actors and freeing the placement group, on a loaded 2-core box


def _pids(pipe) -> list[int]:
    return [int(d.split(" pid ")[1].split()[0]) for d in pipe.group.descriptions]


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def fresh_pipeline(ray_cluster):
    from dualpipe_mhc.cluster.runtime import Pipeline
    from dualpipe_mhc.cluster.train import pipeline_schedule

    cfg = small_config("dualpipev", 2, 4, timeout_s=TIMEOUT_S)
    pipe = Pipeline.start(cfg, pipeline_schedule(cfg))
    pipe.step(0)  # warm: the failure then hits a running pipeline, mid-step
    yield pipe
    pipe.close()


def _fail_step(pipe, rank: int, index: int, mode: str) -> tuple[str, float]:
    from dualpipe_mhc.cluster.runtime import PipelineError

    pipe.inject_fault(rank, 1, index, mode)
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        pipe.step(1)
    return str(info.value), time.monotonic() - t0


@pytest.mark.parametrize("mode", ["exit", "raise", "drop_sends", "hang", "hang_last"])
def test_failure_ends_run_naming_rank_and_action(fresh_pipeline, mode):
    pipe = fresh_pipeline
    pids = _pids(pipe)
    sched = pipe.sched
    # hang_last: rank 1 hangs in its last action, a W nobody waits for, so no peer times out
    # and the driver's own progress watch has to end the run
    index = len(sched.actions[1]) - 1 if mode == "hang_last" else 6
    action = sched.actions[1][index]
    assert mode != "hang_last" or action.kind == "W"
    message, elapsed = _fail_step(pipe, 1, index, "hang" if mode == "hang_last" else mode)
    assert "\n" not in message
    assert elapsed < TIMEOUT_S + CLEANUP_S, f"took {elapsed:.1f} s: {message}"
    if mode == "exit":
        assert "rank 1 died" in message and str(action) in message
    elif mode == "raise":
        assert "rank 1 failed in step 1" in message and str(action) in message and "injected failure" in message
    elif mode == "drop_sends":
        # rank 1 stops sending from this action on; rank 0 waits for it in vain
        assert "rank 0" in message and "from rank 1 did not complete" in message and "needed by" in message
    elif mode == "hang_last":
        assert "no rank made progress" in message and f"rank 1 at step 1 action {index} {action}" in message
    else:
        # rank 0's receive from the hung rank times out first; the message says where rank 1 hangs
        assert "from rank 1 did not complete" in message
        assert f"still running: rank 1 at step 1 action {index} {action}" in message
    assert pipe.group.actors == []
    assert _gone(pids), f"worker processes {pids} still alive after: {message}"


def test_bad_config_fails_in_one_line_before_launch(capsys, monkeypatch):
    from dualpipe_mhc import cli

    def no_launch(*a, **k):
        raise AssertionError("workers must not start for a bad config")

    monkeypatch.setattr("dualpipe_mhc.cluster.launch.WorkerGroup.launch", no_launch)
    assert cli.main(["run", "--set", "pipeline.schedule=dualpipe", "--set", "pipeline.ranks=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "even number of ranks" in err
