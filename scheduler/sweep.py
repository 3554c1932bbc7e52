"""A sweep over schedules and stream counts: build, validate, cost and simulate each
(``dualpipe-mhc simulate`` prints it; benchmarks and tests call :func:`run_sweep` directly)."""

from __future__ import annotations

from typing import Any

from .analytic import costs_from_config
from .builders import build_schedule
from .costs import Costs
from .ir import ScheduleError
from .simulate import check_simulation_size, largest_simulated_microbatches, simulate
from .validate import validate

GIB = 2**30


def run_sweep(cfg, schedules: list[str], streams: list[int], strict: bool, profile: str | None = None,
              traffic: str = "fused", progress=None, recompute_block: int | None = None,
              ) -> tuple[list[dict[str, Any]], list[str], dict]:
    """Simulate every (schedule, n); returns rows, notes about skipped schedules, and results by key.

    Every schedule is checked (size, the builder's rules, the stage count) before any is simulated;
    with ``strict`` (schedules asked for by name) a failing one raises, otherwise it is skipped and
    noted. ``progress(phase)`` is told each phase. ``recompute_block``: the run's L_r
    (``planner.resolve_block_layers(cfg)``), None for none."""
    progress = progress or (lambda _phase: None)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    results = {}
    ranks, microbatches = cfg.pipeline.ranks, cfg.pipeline.microbatches
    measured = Costs.from_profile(profile, cfg.link.bandwidth, cfg.link.latency) if profile is not None else None
    too_big = {}
    for name in schedules:  # sizes first: building is linear in the size too
        try:
            check_simulation_size(name, ranks, microbatches)
        except ScheduleError as exc:
            too_big[name] = exc
    if too_big and (strict or len(too_big) == len(schedules)):
        # Nothing to sweep: one line, naming the schedule that fits the most micro-batches.
        raise too_big[max(too_big, key=lambda n: largest_simulated_microbatches(n, ranks))]
    scheds = []
    for name in schedules:
        try:
            if name in too_big:
                raise too_big[name]
            progress(f"building {name}")
            sched = build_schedule(name, ranks, microbatches)
            # A profile was measured on one stage count: a swept schedule may need other stages.
            if measured is not None and measured.num_stages != sched.num_stages:
                raise ScheduleError(
                    f"profile {profile} has {measured.num_stages} stages but {name} on {ranks} ranks has "
                    f"{sched.num_stages}; profile that schedule or pick one with --schedule"
                )
            if measured is None and cfg.model.layers < sched.num_stages:
                raise ScheduleError(
                    f"{name} on {ranks} ranks has {sched.num_stages} stages, more than model.layers="
                    f"{cfg.model.layers}; use model.layers>={sched.num_stages} or fewer ranks"
                )
        except ScheduleError as exc:
            if strict:
                raise
            notes.append(f"{name} skipped: {exc}")
            continue
        scheds.append((name, sched))
    if not scheds:
        raise ScheduleError(_nothing_to_simulate(measured, profile, schedules, ranks, microbatches, notes))
    for name, sched in scheds:
        progress(f"validating {name}")
        validate(sched)
        base_step = None
        for n in (streams if measured is None else [None]):
            costs = measured if measured is not None else costs_from_config(
                cfg, sched.num_stages, n, traffic, recompute_block
            )
            progress(f"simulating {name}" + (f" n={n}" if n is not None else ""))
            result = simulate(sched, costs)
            results[(name, n)] = result
            if n == 1:
                base_step = result.step_time
            rows.append(_row(name, n, result, base_step))
    return rows, notes, results


def _nothing_to_simulate(measured: Costs | None, profile: str | None, schedules: list[str], ranks: int,
                         microbatches: int, notes: list[str]) -> str:
    """Every schedule was skipped: say why and, for a profile, which ranks would take its stage count."""
    if measured is None:
        return "nothing to simulate: " + "; ".join(notes)
    stages = measured.num_stages
    fits: dict[int, list[str]] = {}
    for name in schedules:
        # A schedule's stage count is ranks or 2 x ranks: those two are the only candidates.
        for r in sorted({stages, stages // 2} - {0}):
            try:
                if build_schedule(name, r, microbatches).num_stages == stages:
                    fits.setdefault(r, []).append(name)
            except ScheduleError:
                continue
    where = measured.meta.get("schedule"), measured.meta.get("ranks")
    source = f" (measured: {where[0]} on {where[1]} ranks)" if all(where) else ""
    options = [f"--set pipeline.ranks={r} ({', '.join(names)})" for r, names in sorted(fits.items(), reverse=True)]
    hint = (f"; use {' or '.join(options)}" if fits
            else f"; no schedule takes {stages} stages at {microbatches} micro-batches")
    return (f"nothing to simulate: profile {profile} has {stages} stages{source}, and no schedule on "
            f"pipeline.ranks={ranks} has {stages}{hint}")


def _row(name: str, n: int | None, result, base_step: float | None) -> dict[str, Any]:
    return {
        "schedule": name,
        "streams": n,
        "step_time_s": result.step_time,
        "bubble_fraction": result.bubble_fraction,
        "exposed_comm_s": max(result.exposed_comm),
        "hidden_comm_s": max(result.hidden_comm),
        "peak_activation_gib": max(result.peak_activation_bytes) / GIB,
        "peak_inflight": max(result.peak_inflight),
        "overhead_vs_n1": (result.step_time / base_step - 1.0) if base_step and n != 1 else None,
        "per_rank": {
            "bubble_s": result.bubble,
            "exposed_comm_s": result.exposed_comm,
            "peak_activation_bytes": result.peak_activation_bytes,
        },
    }


def simulate_profiles(ranks: int, microbatches: int, report: dict[str, Any]
                      ) -> tuple[list[dict[str, Any]], dict]:
    """Every schedule of a ``profile-stages`` report from its measured profiles (plain n = 1 first, then
    the configured residual): rows as :func:`run_sweep`'s, and the results by (schedule, n)."""
    rows, results = [], {}
    for num_stages, names in report["stage_counts"].items():
        for name in names:
            sched = build_schedule(name, ranks, microbatches)
            validate(sched)
            base = None
            for variant in ("plain", "mhc"):
                v = report["variants"][variant]
                profile = v["profiles"][num_stages]
                result = simulate(sched, Costs.from_profile(profile))
                n = v["streams"]
                results[(name, n)] = result
                if variant == "plain":
                    base = result.step_time
                rows.append(_row(name, n, result, base))
    order = {"1f1b": 0, "zb1p": 1, "dualpipe": 2, "dualpipev": 3}
    rows.sort(key=lambda r: (order.get(r["schedule"], 9), r["streams"]))
    return rows, results
