"""``dualpipe-mhc profile``: the config run as mHC (n streams) and as the plain residual (n = 1), optionally
HC, on the same schedule, micro-batches and link; the mHC overhead and where it goes.

Writes ``profile_report.json`` (this report; not the measured-cost ``costs.json`` that
``run`` writes) and ``profile.png`` under ``--out`` (default ``out/profile``); prints the
step and per-rank tables, a one-line verdict against the paper's +6.7 %, and a warning
where the per-step overhead spreads wider than the overhead itself. On a machine without
NVML the energy fields read "unavailable".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Four measured steps gave +197 % to +410 % on the tiny default over four runs (issue 11); the
# report's per-step spread, and its warning, say whether this many were enough on a given machine.
DEFAULT_STEPS = 20


class ProfileFailed(ValueError):
    """A variant's pipeline run stopped (a rank died, raised or hung); one line, printed by the CLI."""



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with-hc", action="store_true", help="also run unconstrained HC at the same n")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS,
        help=f"steps per variant, warm-up included (default {DEFAULT_STEPS}; replaces run.steps)",
    )
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the medians (default 1)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def main(cfg, args) -> dict:
    from rich.console import Console

    from ..cluster.profile import profile
    from ..config import config_from_dict, dump_config

    steps = getattr(args, "steps", None) or cfg.run.steps
    if steps < 1:
        raise ValueError(f"--steps={steps} is invalid: use a positive step count (default {DEFAULT_STEPS})")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps={args.warmup_steps} is invalid: use 0 or more")
    if args.warmup_steps >= steps:
        raise ValueError(
            f"--warmup-steps={args.warmup_steps} leaves none of the {steps} steps (--steps, else run.steps) to "
            f"measure; use --steps {args.warmup_steps + DEFAULT_STEPS} or fewer warm-up steps"
        )
    if steps != cfg.run.steps:
        data = dump_config(cfg)
        data["run"]["steps"] = steps
        cfg = config_from_dict(data)
    console = Console()
    console.print(
        f"[bold]profile[/]: {cfg.model.layers} layers, C={cfg.model.width}, {cfg.pipeline.schedule} on "
        f"{cfg.pipeline.ranks} ranks, {cfg.pipeline.microbatches} micro-batches x {cfg.tokens_per_microbatch()} "
        "tokens, "
        f"{steps} steps ({args.warmup_steps} warm-up), variants mhc, plain{', hc' if args.with_hc else ''}"
    )
    from ..cluster.runtime import PipelineError

    current = {}

    def progress(name: str) -> None:
        current["variant"] = name
        console.print(f"running {name} ...")  # a line per phase: readable in a log, not only on a terminal

    try:
        report = profile(cfg, with_hc=args.with_hc, warmup_steps=args.warmup_steps, progress=progress)
    except PipelineError as exc:
        raise ProfileFailed(f"variant {current.get('variant')}: {exc}") from None
    for table in tables(report):
        console.print(table)
    console.print(report["verdict"])
    for line in report["warnings"]:
        console.print(f"[yellow]warning: {line}[/yellow]")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": str(out / "profile_report.json")}
    if not args.no_plot:
        from ..cluster.profile_plot import plot

        report["files"]["png"] = str(plot(report, out / "profile.png"))
    (out / "profile_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    console.print(f"wrote {', '.join(report['files'].values())}")
    return report


def _ms(value) -> str:
    return f"{value * 1e3:.1f}" if isinstance(value, (int, float)) else "n/a"


def tables(report: dict) -> list:
    """The step table (one row per variant) and the per-rank table; both fit 80 columns."""
    from rich.table import Table

    step = Table(
        title=f"{report['setting']}; device {report['device']}",
        caption="medians after the warm-up; q1-q3 ms: quartiles over steps; overhead: median step over plain's; "
        "q1-q3 %: quartiles of the per-step overhead (step i over plain's step i); sim: the simulator fed this "
        "run's median op times",
    )
    # fold, not the default ellipsis: a value too wide for 80 columns breaks over lines, never loses digits
    for col in ("variant", "n", "step ms", "q1-q3 ms", "sim ms", "overhead", "q1-q3 %"):
        step.add_column(col, justify="left" if col == "variant" else "right", overflow="fold")
    for name, v in report["variants"].items():
        q1, _, q3 = v["step_time_quartiles_s"]
        pct = report["overhead_pct"].get(name)
        spread = report["overhead_spread_pct"].get(name)
        sim = v["simulated"]["step_time_s"] if isinstance(v["simulated"], dict) else None
        step.add_row(
            name, str(v["streams"]), _ms(v["step_time_s"]), f"{_ms(q1)}-{_ms(q3)}", _ms(sim),
            "-" if pct is None else f"{pct:+.1f} %",
            "-" if spread is None else f"{spread['q1']:+.0f}..{spread['q3']:+.0f}",
        )
    ranks = Table(
        title="per rank, ms per step (medians)",
        caption="input wait: blocked on receives; exposed: the part of it after the producer had finished; "
        "hidden: modelled transfer time - exposed; J: NVML energy per step of the rank's GPU (n/a: no NVML)",
    )
    for col in ("variant", "rank", "bubble", "input wait", "exposed", "hidden", "peak MiB", "J"):
        ranks.add_column(col, justify="left" if col == "variant" else "right", overflow="fold")
    for name, v in report["variants"].items():
        memory, energy = v["peak_memory_bytes"], v["energy_j_per_step_per_gpu"]
        for r in range(len(v["bubble_s"])):
            ranks.add_row(
                name if r == 0 else "", str(r), _ms(v["bubble_s"][r]), _ms(v["input_wait_s"][r]),
                _ms(v["exposed_comm_s"][r]), _ms(v["hidden_comm_s"][r]),
                f"{memory[r] / 2**20:.0f}" if isinstance(memory, list) else "n/a",
                f"{energy[r]:.1f}" if isinstance(energy, list) and r < len(energy) else "n/a",
                end_section=r == len(v["bubble_s"]) - 1,
            )
    return [step, ranks]
