"""The analysis of measured steps (scheduler/measured.py): one definition each of input wait
and exposed communication, the simulator's, used by ``run`` and ``profile`` alike."""

from __future__ import annotations

import pytest

from dualpipe_mhc.scheduler import Costs, build_schedule, simulate
from dualpipe_mhc.scheduler.config_view import ConfigView
from dualpipe_mhc.scheduler.measured import (
    analyse_step,
    exposed_comm,
    incoming_transfer_seconds,
    input_wait,
    measured_costs,
    measured_result,
    median_times,
)


def _replay(sched, result) -> list[dict]:
    """A simulated step written as the runtime's per-rank action records: the rank reaches an
    action when its previous one ends (wait_start) and computes from the simulated start."""
    ranks: list[dict] = [{"actions": []} for _ in range(sched.ranks)]
    for r, start, end, action in result._compute:
        halves = action.halves()
        records = ranks[r]["actions"]
        wait_start = records[-1]["end"] if records else 0.0
        per_half = (end - start) / len(halves)
        records.append({
            "label": action.label, "kind": action.kind, "action": action.to_dict(),
            "wait_start": wait_start, "start": start, "end": end,
            "halves": [{"kind": h.kind, "stage": h.stage, "microbatch": h.microbatch, "chunk": h.chunk,
                        "full": True, "seconds": per_half} for h in halves],
        })
    return ranks


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_a_replayed_simulation_measures_what_the_simulator_said(name):
    """Fed a simulated timeline as if measured, the analysis gives the simulator's own input
    wait and exposed communication: the two use one definition."""
    sched = build_schedule(name, 4, 9 if name != "dualpipe" else 10)
    costs = Costs.uniform(sched.num_stages, 1.0, 1.0, 0.0, act_bytes=1e9).with_link(2e9, 0.1)
    costs.fb_overlap = 1.0
    sim = simulate(sched, costs)
    ranks = _replay(sched, sim)
    times = analyse_step(sched, ranks, sim.step_time)
    assert max(times.exposed_comm) > 0
    assert times.exposed_comm == pytest.approx(sim.exposed_comm, abs=1e-9)
    assert times.input_wait == pytest.approx(sim.input_wait, abs=1e-9)
    assert times.busy == pytest.approx(sim.busy) and times.bubble == pytest.approx(sim.bubble)
    assert all(e <= w + 1e-9 for e, w in zip(times.exposed_comm, times.input_wait))


def test_input_wait_counts_the_bubble_exposed_comm_only_the_transfer():
    sched = build_schedule("1f1b", ranks=2, microbatches=1)

    def act(kind, stage, wait_start, start, seconds):
        return {"kind": kind, "wait_start": wait_start, "start": start, "end": start + seconds,
                "halves": [{"kind": kind, "stage": stage, "microbatch": 0, "chunk": 0, "seconds": seconds}]}

    # rank 1's F waits 1.3 s from 0.2: 0.8 s until rank 0's F ends at 1.0 (bubble), 0.5 s after it (transfer)
    ranks = [
        {"actions": [act("F", 0, 0.0, 0.0, 1.0), act("B", 0, 1.0, 3.2, 1.0)]},
        {"actions": [act("F", 1, 0.2, 1.5, 1.0), act("B", 1, 2.5, 2.5, 0.5)]},
    ]
    assert input_wait(ranks) == pytest.approx([2.2, 1.3])
    assert exposed_comm(sched, ranks) == pytest.approx([3.2 - 3.0, 1.5 - 1.0])
    med = median_times([analyse_step(sched, ranks, 4.2), analyse_step(sched, ranks, 4.0)])
    assert med.step_time == pytest.approx(4.1) and med.bubble == pytest.approx([4.1 - 2.0, 4.1 - 1.5])


def test_measured_costs_and_result_read_the_records():
    from dualpipe_mhc.config import load_config

    cfg = load_config(None, ["pipeline.schedule=1f1b", "pipeline.microbatches=1"])
    assert isinstance(cfg, ConfigView)  # the scheduler's view of a config is satisfied by RunConfig
    sched = build_schedule("1f1b", ranks=2, microbatches=1)
    costs = Costs.uniform(2, 1.0, 2.0, 0.0, act_bytes=1e6)
    sim = simulate(sched, costs)
    ranks = _replay(sched, sim)
    got = measured_costs(cfg, sched, [ranks, ranks])
    assert got.f == pytest.approx([1.0, 1.0]) and got.b == pytest.approx([2.0, 2.0]) and got.w == [0.0, 0.0]
    observed = measured_result(sched, ranks, sim.step_time, incoming_transfer_seconds(cfg, sched))
    def compute(result):
        return sorted((e.rank, e.start, e.name) for e in result.events if e.stream == "compute")

    assert compute(observed) == compute(sim)
    assert observed.exposed_comm == pytest.approx(sim.exposed_comm)
    # one message into each rank: the activation into rank 1, the gradient into rank 0
    assert observed.comm_time[0] == pytest.approx(observed.comm_time[1]) and observed.comm_time[0] > 0
