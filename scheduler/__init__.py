"""Schedules as data: IR, builders, validator, cost model, simulator, planner, trace export,
and the analysis of measured steps in the same terms (``scheduler.measured``).

Imports no torch (docs/DESIGN.md §2): planning a 64-rank cluster happens on a laptop.

    from dualpipe_mhc.scheduler import build_schedule, validate, simulate, Costs
    sched = build_schedule("dualpipev", ranks=4, microbatches=10)
    validate(sched)                                   # ScheduleError names the offending action
    result = simulate(sched, Costs.uniform(sched.num_stages, f=1.0, b=1.0, w=1.0))
"""

from .builders import SCHEDULES, build_schedule
from .comms import add_comms
from .costs import Costs
from .ir import Action, Schedule, ScheduleError
from .simulate import Event, SimResult, simulate
from .validate import ValidationReport, validate

__all__ = [
    "Action",
    "Costs",
    "Event",
    "SCHEDULES",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "ValidationReport",
    "add_comms",
    "build_schedule",
    "simulate",
    "validate",
]
