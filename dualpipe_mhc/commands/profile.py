"""``dualpipe-mhc profile``: the config run as mHC (n streams) and as the plain residual (n = 1), optionally
HC, on the same schedule, micro-batches and link; the mHC overhead and where it goes.

Writes ``profile.json`` and ``profile.png`` under ``--out`` (default: the current
directory), prints a table per variant and a one-line verdict against the paper's
+6.7 %. On a machine without NVML the energy columns read "unavailable".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

class ProfileFailed(ValueError):
    """A variant's pipeline run stopped (a rank died, raised or hung); one line, printed by the CLI."""




def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with-hc", action="store_true", help="also run unconstrained HC at the same n")
    p.add_argument(
        "--warmup-steps", type=int, default=1, help="steps left out of the medians (default 1; run.steps sets the total)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def main(cfg, args) -> dict:
    from rich.console import Console

    from ..cluster.profile import profile

    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps={args.warmup_steps} is invalid: use 0 or more")
    if args.warmup_steps >= cfg.run.steps:
        raise ValueError(
            f"--warmup-steps={args.warmup_steps} leaves none of run.steps={cfg.run.steps} to measure; "
            f"use --set run.steps={args.warmup_steps + 3} or fewer warm-up steps"
        )
    console = Console(width=None if Console().is_terminal else 150)  # pipes get 80 columns otherwise
    console.print(
        f"[bold]profile[/]: {cfg.model.layers} layers, C={cfg.model.width}, {cfg.pipeline.schedule} on "
        f"{cfg.pipeline.ranks} ranks, {cfg.pipeline.microbatches} micro-batches x {cfg.tokens_per_microbatch()} tokens, "
        f"{cfg.run.steps} steps ({args.warmup_steps} warm-up), variants mhc, plain{', hc' if args.with_hc else ''}"
    )
    from ..cluster.runtime import PipelineError

    current = {}

    def progress(name: str) -> None:
        current["variant"] = name
        console.print(f"running {name} ...")

    try:
        report = profile(cfg, with_hc=args.with_hc, warmup_steps=args.warmup_steps, progress=progress)
    except PipelineError as exc:
        raise ProfileFailed(f"variant {current.get('variant')}: {exc}") from None
    _print_table(console, report)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    report["files"] = {"json": str(out / "profile.json")}
    if not args.no_plot:
        from ..cluster.profile_plot import plot

        report["files"]["png"] = str(plot(report, out / "profile.png"))
    console.print(f"wrote {', '.join(report['files'].values())}")
    return report


def _fmt(value, scale: float = 1.0, spec: str = ".1f") -> str:
    if isinstance(value, (int, float)):
        return format(value * scale, spec)
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return "/".join(format(v * scale, spec) for v in value)
    return str(value)


def _print_table(console, report: dict) -> None:
    from rich.table import Table

    t = Table(
        title=f"{report['setting']} — device {report['device']}",
        caption="sim: the simulator fed this run's median op times; per-rank lists are rank0/rank1/...; input wait = blocked on receives; exposed comm = the part "
        "of it after the producer had finished; hidden comm = modelled transfer time - exposed",
    )
    cols = ("variant", "n", "step ms", "sim ms", "overhead", "bubble ms", "input wait ms", "exposed comm ms", "hidden comm ms",
            "energy J/step", "peak mem MiB")
    for col in cols:
        t.add_column(col, justify="right")
    for name, v in report["variants"].items():
        pct = report["overhead_pct"].get(name)
        t.add_row(
            name, str(v["streams"]), _fmt(v["step_time_s"], 1e3, ".2f"),
            _fmt(v["simulated"]["step_time_s"], 1e3, ".2f") if isinstance(v["simulated"], dict) else "-",
            "-" if pct is None else f"{pct:+.1f} %",
            _fmt(v["bubble_s"], 1e3), _fmt(v["input_wait_s"], 1e3), _fmt(v["exposed_comm_s"], 1e3),
            _fmt(v["hidden_comm_s"], 1e3),
            _fmt(v["energy_j_per_step"], 1.0, ".1f"), _fmt(v["peak_memory_bytes"], 2**-20, ".0f"),
        )
    console.print(t)
    console.print(report["verdict"])
