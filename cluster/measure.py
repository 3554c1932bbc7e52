"""Measured steps of the runtime (:class:`cluster.runtime.StepResult`) handed to the
scheduler's analysis of measured steps (:mod:`dualpipe_mhc.scheduler.measured`, which holds
every definition: input wait, exposed communication, per-stage costs).

    costs = measured_costs(cfg, sched, results)      # medians per model stage
    costs.write_profile(path)                        # the "dualpipe-mhc-profile/1" file
    predicted = simulate(sched, costs)               # the simulator fed the measurements
    observed = measured_result(sched, results[-1])   # -> write_chrome_trace / write_timeline_png
    typical = step_times(sched, results[warmup:])    # per-rank medians: busy, bubble, input wait, exposed comm
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dualpipe_mhc.scheduler.costs import Costs
from dualpipe_mhc.scheduler.ir import Schedule
from dualpipe_mhc.scheduler.measured import (
    WAIT_STREAM,
    StepTimes,
    activation_bytes,
    analyse_step,
    incoming_transfer_seconds,
    median_times,
)
from dualpipe_mhc.scheduler.measured import measured_costs as _measured_costs
from dualpipe_mhc.scheduler.measured import measured_result as _measured_result
from dualpipe_mhc.scheduler.simulate import SimResult

if TYPE_CHECKING:
    from dualpipe_mhc.config import RunConfig

    from .runtime import StepResult

__all__ = ["WAIT_STREAM", "activation_bytes", "incoming_transfer_seconds", "measured_costs", "measured_result",
           "step_times"]


def _kept(results: list[StepResult], warmup: int) -> list[StepResult]:
    return results[warmup:] or results


def measured_costs(cfg: RunConfig, sched: Schedule, results: list[StepResult], warmup: int = 1,
                   meta: dict[str, Any] | None = None) -> Costs:
    """Median per-stage F / B / W seconds over the steps after ``warmup`` (all if that leaves none)."""
    return _measured_costs(cfg, sched, [res.ranks for res in _kept(results, warmup)], meta)


def measured_result(sched: Schedule, res: StepResult, comm_time: list[float] | None = None) -> SimResult:
    """One measured step as a :class:`SimResult` (see :func:`scheduler.measured.measured_result`)."""
    return _measured_result(sched, res.ranks, res.step_time, comm_time)


def step_times(sched: Schedule, results: list[StepResult]) -> StepTimes:
    """Per-rank medians over ``results`` of busy, bubble, input wait and exposed communication."""
    return median_times([analyse_step(sched, res.ranks, res.step_time) for res in results])
