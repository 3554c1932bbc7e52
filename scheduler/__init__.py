"""Schedules as data: IR, builders, validator, cost model, simulator, planner, trace export.

Imports no torch (DESIGN.md §2): planning a 64-rank cluster happens on a laptop.
"""

from .ir import Action, Schedule

__all__ = ["Action", "Schedule"]
