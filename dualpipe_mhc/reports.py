"""The JSON report of each command (``--json FILE``): one schema per command, documented in the
README's "JSON reports" and checked by ``tests/test_reports.py`` against what each command writes.

A schema is plain data: a dict maps each key to the spec of its value; every key is required
unless wrapped in :class:`Optional`, and a report may hold no key its schema does not name.
``check_report("simulate", report)`` returns the problems found (empty: the report conforms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUM = (int, float)
NONE = type(None)


@dataclass(frozen=True)
class Optional:
    """A key that may be absent (a run that measured nothing has no ``measured``)."""

    spec: Any


@dataclass(frozen=True)
class ListOf:
    spec: Any


@dataclass(frozen=True)
class DictOf:
    """Any keys (variant names, link names), every value of ``spec``."""

    spec: Any


@dataclass(frozen=True)
class Either:
    specs: tuple


NUMS = ListOf(NUM)
NUMS_OR_NA = Either((NUMS, str))  # per-rank numbers, or "unavailable"
FILES = DictOf(str)  # what the command wrote: role -> path

_SIM_ROW = {
    "schedule": str, "streams": (int, NONE), "step_time_s": NUM, "bubble_fraction": NUM, "exposed_comm_s": NUM,
    "hidden_comm_s": NUM, "peak_activation_gib": NUM, "peak_inflight": int, "overhead_vs_n1": (NUM, NONE),
    "per_rank": {"bubble_s": NUMS, "exposed_comm_s": NUMS, "peak_activation_bytes": NUMS},
}
_PLAN_ROW = {"block_layers": (int, NONE), "activation_gib": NUM, "total_gib": NUM, "recompute_s": NUM,
             "step_time_s": NUM, "fits": bool}
_VARIANT = {
    "residual": str, "streams": int, "step_time_s": NUM, "step_time_range_s": NUMS, "step_times_s": NUMS,
    "step_time_quartiles_s": NUMS, "bubble_s": NUMS, "bubble_fraction": NUM, "busy_s": NUMS, "input_wait_s": NUMS,
    "exposed_comm_s": NUMS, "comm_s": NUMS, "hidden_comm_s": NUMS, "peak_memory_bytes": NUMS_OR_NA,
    "loss": (NUM, NONE), "simulated": Either(({"step_time_s": NUM, "bubble_s": NUMS, "exposed_comm_s": NUMS}, str)),
    "energy_j_per_step": (NUM, str), "energy_j_per_step_per_gpu": NUMS_OR_NA, "energy_source": str,
    "mean_power_w_per_gpu": NUMS_OR_NA, "nvlink_tx_bytes_per_step_per_gpu": NUMS_OR_NA,
}
_LINK_FIT = {"bandwidth_gbps": NUM, "latency_us": NUM}

SCHEMAS: dict[str, dict[str, Any]] = {
    "simulate": {
        "command": str, "costs": str, "traffic": str,
        "config": {"layers": int, "width": int, "streams": int, "ranks": int, "microbatches": int,
                   "tokens_per_microbatch": int, "link_bandwidth_gbps": NUM, "link_latency_us": NUM,
                   "hardware": (str, NONE)},
        "rows": ListOf(_SIM_ROW), "skipped": ListOf(str), "files": DictOf(FILES),
    },
    "plan": {
        "command": str, "schedule": str, "streams": int, "layers": int, "closed_form": NUM,
        "closed_form_block": int, "budget_gib": NUM, "state_gib": NUM, "state_bytes_per_param": NUM,
        "feasible": bool, "choice": (_PLAN_ROW, NONE), "rows": ListOf(_PLAN_ROW), "block_layers": (int, NONE),
        "enabled": bool, "sharding": str, "alternatives": ListOf({"changes": dict, **_PLAN_ROW}), "files": FILES,
        "error": Optional(str),
    },
    "run": {
        "schedule": str, "ranks": int, "microbatches": int, "device": str, "backend": (str, NONE),
        "workers": ListOf(str), "start_step": int, "resumed_from": (str, NONE),
        "steps": ListOf({"step": int, "loss": NUM, "step_time_s": NUM, "wall_s": NUM, "bubble_fraction": NUM}),
        "final_loss": (NUM, NONE), "checkpoints": ListOf(str), "warmup_steps": int, "files": FILES, "config": dict,
        "measured": Optional({"step_time_s": NUM, "bubble_fraction": NUM, "busy_s": NUMS, "input_wait_s": NUMS,
                              "exposed_comm_s": NUMS, "modelled_comm_s": NUMS, "hidden_comm_fraction": NUMS}),
        "simulated": Optional({"step_time_s": NUM, "bubble_fraction": NUM, "busy_s": NUMS, "input_wait_s": NUMS,
                               "exposed_comm_s": NUMS}),
        "sim_error_pct": Optional((NUM, NONE)),
        "costs": Optional({"f_s": NUMS, "b_s": NUMS, "w_s": NUMS, "fb_overlap": NUM}),
        "error": Optional(str),
    },
    "profile": {
        "format": str, "setting": str, "device": str, "schedule": str, "ranks": int, "microbatches": int,
        "link": {"preset": (str, NONE), "bandwidth_gbps": NUM, "latency_us": NUM, "shaped": bool},
        "recompute_block_layers": (int, NONE), "warmup_steps": int, "nvml_note": (str, NONE),
        "variants": DictOf(_VARIANT), "overhead_pct": DictOf(NUM),
        "overhead_spread_pct": DictOf({"min": NUM, "q1": NUM, "median": NUM, "q3": NUM, "max": NUM, "steps": int}),
        "delta_vs_plain": DictOf(DictOf(NUM)), "paper_overhead_pct": NUM, "verdict": str,
        "warnings": ListOf(str), "config": dict, "files": FILES,
    },
    "profile-stages": {
        "command": str, "device": str, "torch": str, "repeats": int, "warmup": int, "stage_counts": dict,
        "measurements": ListOf(dict), "variants": DictOf({"streams": int, "residual": str, "profiles": dict,
                                                         "analytic": dict}),
        "skipped": ListOf(str), "config": dict, "rows": ListOf(_SIM_ROW), "hardware_fit": (dict, NONE),
        "files": dict,
    },
    "stability": {
        "settings": dict, "kinds": DictOf(dict), "random_demo": dict, "verdict": ListOf(str), "files": FILES,
    },
    "calibrate-link": {
        "format": str, "device": str, "backend": str, "sizes": ListOf(int), "repeats": int,
        "links": DictOf({
            "link": _LINK_FIT, "target": Optional(_LINK_FIT), "reachable": bool,
            "points": ListOf({"bytes": int, "one_way_s": NUM, "achieved_gbps": NUM,
                              "target_s": Optional(NUM), "error_pct": Optional(NUM)}),
        }),
        "files": FILES,
    },
}


def check_report(command: str, report: Any) -> list[str]:
    """Where ``report`` departs from ``SCHEMAS[command]``, one line per problem."""
    return _problems(SCHEMAS[command], report, command)


def _problems(spec: Any, value: Any, where: str) -> list[str]:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        out = [f"{where}.{key}: unexpected key" for key in value if key not in spec]
        for key, sub in spec.items():
            if key not in value:
                if not isinstance(sub, Optional):
                    out.append(f"{where}.{key}: missing")
                continue
            out += _problems(sub.spec if isinstance(sub, Optional) else sub, value[key], f"{where}.{key}")
        return out
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in _problems(spec.spec, item, f"{where}[{i}]")]
    if isinstance(spec, DictOf):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        return [p for key, item in value.items() for p in _problems(spec.spec, item, f"{where}.{key}")]
    if isinstance(spec, Either):
        found = [_problems(s, value, where) for s in spec.specs]
        return [] if any(not f for f in found) else found[0]
    if isinstance(spec, tuple) and any(isinstance(s, (dict, ListOf, DictOf, Either)) for s in spec):
        return _problems(Either(spec), value, where)
    types = spec if isinstance(spec, tuple) else (spec,)
    flat = tuple(t for s in types for t in (s if isinstance(s, tuple) else (s,)))
    # bool is an int to Python, never a number to a reader of the report.
    if isinstance(value, bool) and bool not in flat:
        return [f"{where}: expected {_names(flat)}, got bool"]
    if not isinstance(value, flat):
        return [f"{where}: expected {_names(flat)}, got {type(value).__name__}"]
    return []


def _names(types: tuple) -> str:
    return " or ".join("null" if t is NONE else t.__name__ for t in types)
