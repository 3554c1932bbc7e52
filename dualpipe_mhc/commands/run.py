"""``dualpipe-mhc run``: train the configured model with the chosen schedule on Ray workers.

One StageWorker actor per pipeline rank (a GPU each, or CPU actors with gloo), every
rank executing its action list from the scheduler. Prints one line per step (loss,
step time, bubble), then measured vs simulated, where the simulator is fed the
per-action costs this run measured. Under ``--out`` (default ``out/run``):

    costs.json       measured per-stage costs (format dualpipe-mhc-profile/1): simulate --profile reads it
    trace.json       Perfetto/Chrome trace of the last measured step (compute + input waits)
    timeline.png     the same step drawn like ``simulate`` draws its steps

JSON keys (``--json``): schedule, ranks, microbatches, device, backend, workers,
start_step, resumed_from, steps (list of {step, loss, step_time_s, wall_s,
bubble_fraction}), final_loss, measured {step_time_s, bubble_fraction, busy_s,
input_wait_s, modelled_comm_s (the link's time for the messages each rank receives),
hidden_comm_fraction (1 - min(wait, comm) / comm: a lower bound, waits also cover
upstream compute)}, simulated {step_time_s, bubble_fraction, busy_s, exposed_comm_s},
sim_error_pct, costs {f_s, b_s, w_s, fb_overlap}, files {costs, trace, png},
checkpoints, warmup_steps, config.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any



class RunFailed(ValueError):
    """The pipeline stopped (a rank died, raised or hung); ``report`` holds the steps that ran."""

    report: dict[str, Any] | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.checkpoint_dir")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the config's run.steps)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the medians (default 1)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def main(cfg, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dualpipe_mhc.config import config_from_dict, dump_config

    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps={args.steps} is invalid: use a positive step count")
        data = dump_config(cfg)
        data["run"]["steps"] = args.steps
        cfg = config_from_dict(data)
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} is invalid: use 0 or more steps")

    from dualpipe_mhc.cluster import checkpoint
    from dualpipe_mhc.cluster.train import pipeline_schedule, train

    sched = pipeline_schedule(cfg)  # a bad schedule fails here, before any worker starts
    if args.resume:
        checkpoint.find_latest(cfg.run.checkpoint_dir, dump_config(cfg))
    console = Console()
    p, m, link = cfg.pipeline, cfg.model, cfg.link
    console.print(
        f"[bold]run[/]: {p.schedule} on {p.ranks} ranks, {p.microbatches} micro-batches of {p.microbatch_size}x{m.seq_len} "
        f"tokens, model {m.layers} layers C={m.width} n={m.streams} ({m.residual}), {cfg.run.dtype}, "
        f"link {link.preset or 'custom'}{' shaped to ' + f'{link.bandwidth / 1e9:g} GB/s' if link.shape else ''}"
    )
    progress = Progress(
        TextColumn("[bold]step"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=True,
    )
    state: dict[str, Any] = {}

    def on_start(pipe, start: int) -> None:
        state["workers"] = list(pipe.group.descriptions)
        state["backend"] = pipe.group.backend
        state["task"] = progress.add_task("steps", total=cfg.run.steps, completed=start, info="")

    def on_step(res) -> None:
        line = (f"step {res.step:4d}  loss {res.loss:.4f}  step {res.step_time * 1e3:8.1f} ms  "
                f"bubble {100 * res.bubble_fraction:5.1f} %")
        progress.console.print(line)
        progress.update(state["task"], advance=1, info=f"loss {res.loss:.4f}")

    from dualpipe_mhc.cluster.runtime import PipelineError

    try:
        with progress:
            outcome = train(cfg, resume=args.resume, on_step=on_step, on_start=on_start)
    except PipelineError as exc:
        failed = RunFailed(str(exc))
        partial = getattr(exc, "outcome", None)
        if partial is not None:
            failed.report = _report(cfg, sched, partial, state, None, None, None, {}, args.warmup)
        raise failed from None
    if not outcome.results:
        console.print(f"nothing to run: the checkpoint is already at step {outcome.start_step} of {cfg.run.steps}")
        return _report(cfg, sched, outcome, state, None, None, None, {}, args.warmup)
    if args.warmup >= len(outcome.results):
        # Too few steps to leave any out: measure them all, and say so in the report.
        console.print(f"--warmup {args.warmup} >= the {len(outcome.results)} steps run: the medians use every step")
        args.warmup = 0
    out = Path(args.out)
    files, measured, predicted, costs = _compare_and_write(cfg, sched, outcome, out, args)
    report = _report(cfg, sched, outcome, state, measured, predicted, costs, files, args.warmup)
    console.print(comparison_table(report))
    console.print(f"link in the simulation: {cfg.link.bandwidth / 1e9:g} GB/s one way, {cfg.link.latency * 1e6:g} us "
                  f"({'shaped' if cfg.link.shape else 'the config preset; the run was not shaped'})")
    console.print(f"wrote {', '.join(files.values())}")
    return report


def _compare_and_write(cfg, sched, outcome, out: Path, args):
    from dualpipe_mhc.cluster.measure import incoming_transfer_seconds, measured_costs, measured_result, step_times
    from dualpipe_mhc.scheduler import simulate
    from dualpipe_mhc.scheduler.trace import write_chrome_trace, write_timeline_png

    results = outcome.results
    kept = results[args.warmup:]
    meta = {"source": "dualpipe-mhc run", "device": outcome.device, "schedule": sched.name,
            "ranks": sched.ranks, "microbatches": sched.microbatches, "steps_measured": len(kept)}
    costs = measured_costs(cfg, sched, results, warmup=args.warmup, meta=meta)
    predicted = simulate(sched, costs)
    # The trace shows the measured step closest to the median.
    median_time = statistics.median(r.step_time for r in kept)
    typical = min(kept, key=lambda r: abs(r.step_time - median_time))
    comm = incoming_transfer_seconds(cfg, sched)
    measured = measured_result(sched, typical, comm_time=comm)
    measured.step_time = median_time  # the table quotes medians
    out.mkdir(parents=True, exist_ok=True)
    files = {"costs": str(out / "costs.json")}
    costs.write_profile(out / "costs.json")
    title = f"{sched.name} measured, step {typical.step}"
    files["trace"] = str(write_chrome_trace(measured_result(sched, typical), out / "trace.json", title))
    if not args.no_plot:
        files["png"] = str(write_timeline_png(measured_result(sched, typical), out / "timeline.png", title))
    # Medians throughout, and the bubble from them, so the table's rows add up.
    typical_times = step_times(sched, kept)
    measured.busy, measured.bubble = typical_times.busy, typical_times.bubble
    measured.input_wait, measured.exposed_comm = typical_times.input_wait, typical_times.exposed_comm
    return files, measured, predicted, costs


def comparison_table(report: dict[str, Any]):
    """Measured vs simulated from the report; the last column is (simulated - measured) / measured."""
    from rich.table import Table

    meas, sim = report["measured"], report["simulated"]
    table = Table(title="measured vs simulated (simulator fed this run's measured action costs)",
                  caption="input wait: all time blocked on receives; exposed comm: the part after every "
                          "input's producer had finished",
                  title_style="bold")
    for col in ("", "measured", "simulated", "sim - meas, % of meas"):
        table.add_column(col, justify="right" if col else "left", overflow="fold")

    def row(name: str, a: float, b: float) -> None:
        diff = f"{100 * (b / a - 1):+.1f} %" if a else "-"
        table.add_row(name, f"{a * 1e3:.2f} ms", f"{b * 1e3:.2f} ms", diff)

    row("step time", meas["step_time_s"], sim["step_time_s"])
    table.add_row("bubble", f"{100 * meas['bubble_fraction']:.1f} %", f"{100 * sim['bubble_fraction']:.1f} %",
                  f"{100 * (sim['bubble_fraction'] - meas['bubble_fraction']):+.1f} pt")
    for r, busy in enumerate(meas["busy_s"]):
        row(f"rank {r} compute", busy, sim["busy_s"][r])
        row(f"rank {r} input wait", meas["input_wait_s"][r], sim["input_wait_s"][r])
        row(f"rank {r} exposed comm", meas["exposed_comm_s"][r], sim["exposed_comm_s"][r])
    return table


def _report(cfg, sched, outcome, state, measured, predicted, costs, files, warmup) -> dict[str, Any]:
    from dualpipe_mhc.config import dump_config

    steps = [{"step": r.step, "loss": r.loss, "step_time_s": r.step_time, "wall_s": r.wall_time,
              "bubble_fraction": r.bubble_fraction} for r in outcome.results]
    report: dict[str, Any] = {
        "schedule": sched.name, "ranks": sched.ranks, "microbatches": sched.microbatches,
        "device": outcome.device, "backend": state.get("backend"), "workers": state.get("workers", []),
        "start_step": outcome.start_step, "resumed_from": outcome.resumed_from, "steps": steps,
        "final_loss": steps[-1]["loss"] if steps else None, "checkpoints": outcome.checkpoints,
        "warmup_steps": warmup, "files": files, "config": dump_config(cfg),
    }
    if measured is not None:
        hidden = [1.0 - min(e, c) / c if c else 1.0 for e, c in zip(measured.exposed_comm, measured.comm_time)]
        report["measured"] = {"step_time_s": measured.step_time, "bubble_fraction": measured.bubble_fraction,
                              "busy_s": measured.busy, "input_wait_s": measured.input_wait,
                              "exposed_comm_s": measured.exposed_comm,
                              "modelled_comm_s": measured.comm_time, "hidden_comm_fraction": hidden}
        report["simulated"] = {"step_time_s": predicted.step_time, "bubble_fraction": predicted.bubble_fraction,
                               "busy_s": predicted.busy, "input_wait_s": predicted.input_wait,
                               "exposed_comm_s": predicted.exposed_comm}
        report["sim_error_pct"] = 100 * (predicted.step_time / measured.step_time - 1) if measured.step_time else None
        report["costs"] = {"f_s": costs.f, "b_s": costs.b, "w_s": costs.w, "fb_overlap": costs.fb_overlap}
    return report
