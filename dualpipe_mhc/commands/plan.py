"""``dualpipe-mhc plan``: choose the mHC recomputation block size L_r under a per-GPU memory budget.

Prints the closed form sqrt(n*L/(2(n+2))) (docs/DESIGN.md's sqrt(n*L/(n+2)) over sublayers, in layers), then every searched L_r with the fullest rank's
activation and total memory, the recomputation time and the simulated step time, and the
choice; the runtime takes ``block_layers`` from the JSON (or ``plan_recompute(cfg)``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", metavar="NAME", help="schedule to plan for (default: pipeline.schedule)")
    parser.add_argument("--budget-gib", type=float, metavar="GIB", help="per-GPU memory (default: recompute.memory_budget_gib, else hardware.memory_gib)")
    parser.add_argument(
        "--state-bytes-per-param", type=float, default=None, metavar="B",
        help="parameter + gradient + optimizer bytes per parameter on a rank (6: bf16 weights, fp32 grads, optimizer "
        "sharded over data parallel, ZeRO-1; 2: gradients sharded too, ZeRO-2; 18 unsharded; default: ZeRO-1, "
        "ZeRO-2 if nothing fits under ZeRO-1)",
    )


def _table(rows, cfg, schedule: str, budget: float, choice, closed_form: float, closed_block: int):
    from rich.table import Table

    m = cfg.model
    title = (
        f"recomputation plan: {m.layers} layers, n={m.streams}, {schedule} "
        f"on {cfg.pipeline.ranks} ranks, budget {budget:g} GiB; closed form sqrt(nL/(2(n+2))) = {closed_form:.2f} -> L_r={closed_block}"
    )
    table = Table(title=title, caption="memory on the fullest rank; recompute = seconds per step on the busiest rank")
    for col in ("L_r", "activations GiB", "total GiB", "recompute s", "step s", "fits"):
        table.add_column(col, justify="right", overflow="fold")
    # Up to twice the closed form is where the optimum lives; the JSON keeps every row.
    limit = max(8, 2 * closed_block)
    for row in rows:
        chosen = row is choice
        if row.block_layers is not None and row.block_layers > limit and not chosen:
            continue
        style = "bold green" if chosen else None
        table.add_row(
            "off" if row.block_layers is None else str(row.block_layers),
            f"{row.activation_gib:.1f}", f"{row.total_gib:.1f}", f"{row.recompute_s:.3f}", f"{row.step_time_s:.3f}",
            ("yes" if row.fits else "no") + (" <- chosen" if chosen else ""),
            style=style,
        )
    return table


def main(cfg, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from dualpipe_mhc.scheduler.planner import InfeasiblePlan, plan_recompute

    console = Console()
    schedule = getattr(args, "schedule", None)
    budget = getattr(args, "budget_gib", None)
    state_bytes = getattr(args, "state_bytes_per_param", None)
    # "not x > 0" also refuses nan, which every "<= 0" check lets through.
    if budget is not None and not 0 < budget < math.inf:
        raise ValueError(f"--budget-gib {budget:g} is invalid: use a positive GiB")
    if state_bytes is not None and not 0 <= state_bytes < math.inf:
        raise ValueError(
            f"--state-bytes-per-param {state_bytes:g} is invalid: use bytes >= 0 (6: bf16 weights, fp32 grads, "
            "sharded optimizer; 18 unsharded)"
        )
    try:
        plan = plan_recompute(cfg, schedule, budget, state_bytes)
    except InfeasiblePlan as exc:
        plan = exc.result
        console.print(
            _table(plan.rows, cfg, plan.schedule, plan.budget_gib, None, plan.closed_form, plan.closed_form_block)
        )
        _print_alternatives(console, plan)
        # The feasible report's keys: a script reads one schema either way.
        exc.report = {**plan.to_dict(), "command": "plan", "files": {}, "error": str(exc)}
        _write_files(exc.report, args, console)
        raise
    console.print(
        _table(plan.rows, cfg, plan.schedule, plan.budget_gib, plan.choice, plan.closed_form, plan.closed_form_block)
    )
    if plan.enabled:
        verdict = f"recompute.block_layers={plan.block_layers} (set recompute.enabled=true)"
    else:
        verdict = "no recomputation needed: the step fits without it"
    report = {**plan.to_dict(), "command": "plan", "files": {}}
    console.print(
        f"choice: {verdict}; {plan.choice.total_gib:.1f} of {plan.budget_gib:g} GiB on the fullest rank "
        f"with {report['sharding']} state ({plan.state_bytes_per_param:g} bytes per parameter)"
    )
    _write_files(report, args, console)
    return report


def _print_alternatives(console, plan) -> None:
    from dualpipe_mhc.scheduler.planner import describe_change

    for alt in plan.alternatives[:5]:
        console.print(
            f"  fits with {describe_change(alt.changes)}: L_r={alt.choice.block_layers}, "
            f"{alt.choice.total_gib:.1f} GiB, step {alt.choice.step_time_s:.3f} s"
        )


def _write_files(report: dict[str, Any], args: argparse.Namespace, console) -> None:
    """Under ``--out``: the table (plan.md, plan.json) and memory and time against L_r (plan.png)."""
    if getattr(args, "out", None):
        from pathlib import Path

        from dualpipe_mhc.scheduler.plan_files import write_plan_files

        files = write_plan_files(report, Path(args.out))
        console.print(f"wrote {', '.join(files.values())}")
