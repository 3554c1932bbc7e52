"""``dualpipe-mhc profile-stages``: measure each distinct pipeline stage on this one device, then let the
simulator place the measured stages on the cluster and the configured link.

For the plain residual (n = 1) and the configured residual at n, it builds each distinct stage
(:mod:`dualpipe_mhc.cluster.stage_profile`) and times F, the input-gradient B, W, the full
backward, an F&B pair and the recomputation inside B, and records kept and peak memory. Under
``--out`` (default ``out/profile-stages/``) it writes one ``dualpipe-mhc-profile/1`` file per variant
and stage count (``profile_<variant>_<stages>st.json``, usable with ``simulate --profile``), the
simulated table of every schedule from them (``table.txt``), a Perfetto trace per run, a timeline
PNG per schedule and ``stage_costs.png`` (measured against analytic per stage). The figures are
one device's compute on a modelled link: not a cluster measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schedule", action="append", metavar="NAME",
        help="1f1b, zb1p, dualpipe or dualpipev (repeat or comma-separate; default: all four)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per stage, median taken (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to build and time (default: cuda if visible)")
    parser.add_argument(
        "--fit-hardware", metavar="NAME",
        help="fit the analytic model's per-part efficiencies to these measurements; writes hardware_NAME.json "
        "(use it with --set hardware.calibration=FILE)",
    )


def main(cfg, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from dualpipe_mhc.cluster.stage_profile import fit_hardware, profile_stages
    from dualpipe_mhc.scheduler.sweep import simulate_profiles

    from .simulate import _schedules, _write_files, table

    schedules, _ = _schedules(args)
    fit_name = getattr(args, "fit_hardware", None)
    if fit_name is not None and (not fit_name or "/" in fit_name or fit_name.startswith(".")):
        raise ValueError(f"--fit-hardware {fit_name!r} is invalid; give a plain name such as h200-fitted")
    out = Path(args.out or "profile-stages")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = profile_stages(cfg, schedules, args.repeats, args.warmup, args.device, progress)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"profiles": {}}
    for name, variant in report["variants"].items():
        for num_stages, profile in variant["profiles"].items():
            path = out / f"profile_{name}_{num_stages}st.json"
            path.write_text(json.dumps(profile, indent=2) + "\n")
            files["profiles"][f"{name}_{num_stages}st"] = str(path)
    rows, results = simulate_profiles(cfg.pipeline.ranks, cfg.pipeline.microbatches, report)
    print(f"measured on one {report['device']}, link modelled: not a cluster measurement")
    console = Console()
    console.print(table(_simulate_report(cfg, rows)))
    for note in report["skipped"]:
        console.print(f"[yellow]{note}[/yellow]")
    files["runs"] = _write_files(out, results)
    files["stage_costs_png"] = str(plot_stage_costs(report, out / "stage_costs.png"))
    _write_table(out / "table.txt", rows, report)
    files["table"] = str(out / "table.txt")
    fit = None
    if fit_name:
        cal = fit_hardware(cfg, report, fit_name)
        files["hardware"] = str(cal.write(out / f"hardware_{fit_name}.json"))
        fit = cal.to_dict()
        errs = cal.fit["max_rel_error"]
        before = cal.fit["max_rel_error_uncalibrated"]
        print("fitted " + fit_name + ": worst stage error " + ", ".join(
            f"{k.upper() if k != 'mem' else 'kept'} {100 * before[k]:.0f}% -> {100 * errs[k]:.1f}%" for k in errs))
    print(f"wrote {len(files['profiles'])} profiles, traces and pictures to {out}")
    return {"command": "profile-stages", **report, "rows": rows, "hardware_fit": fit, "files": files}


def _simulate_report(cfg, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``simulate``'s table reads: its rows and the config they ran on."""
    return {"costs": "profile", "rows": rows, "config": {
        "layers": cfg.model.layers, "width": cfg.model.width, "ranks": cfg.pipeline.ranks,
        "microbatches": cfg.pipeline.microbatches, "tokens_per_microbatch": cfg.tokens_per_microbatch(),
        "link_bandwidth_gbps": cfg.link.bandwidth / 1e9, "link_latency_us": cfg.link.latency * 1e6,
        "hardware": cfg.hardware.preset}}


def _write_table(path: Path, rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    lines = [
        f"profile-stages: compute measured on one {report['device']} (torch {report['torch']}, median of "
        f"{report['repeats']}), link modelled; not a cluster measurement",
        f"{'schedule':10} {'n':>2} {'step s':>9} {'bubble %':>9} {'exposed ms':>11} {'peak GiB':>9} {'overhead %':>11}",
    ]
    for r in rows:
        over = "-" if r["overhead_vs_n1"] is None else f"{100 * r['overhead_vs_n1']:+.2f}"
        lines.append(f"{r['schedule']:10} {r['streams']:>2} {r['step_time_s']:9.4f} {100 * r['bubble_fraction']:9.1f} "
                     f"{1e3 * r['exposed_comm_s']:11.2f} {r['peak_activation_gib']:9.2f} {over:>11}")
    lines.append("")
    lines.append(f"{'variant':8} {'stage':28} {'F ms':>8} {'B ms':>8} {'W ms':>8} {'full B ms':>10} {'F&B/(F+B)':>10} "
                 f"{'recomp ms':>10} {'kept GiB':>9} {'peak B GiB':>10}")
    for m in report["measurements"]:
        peak = "-" if m["peak_b_bytes"] is None else f"{m['peak_b_bytes'] / GIB:.3f}"
        lines.append(f"{m['variant']:8} {m['stage_kind']:28} {1e3 * m['f']:8.2f} {1e3 * m['b']:8.2f} {1e3 * m['w']:8.2f} "
                     f"{1e3 * m['full_b']:10.2f} {m['fb_overlap']:10.3f} {1e3 * m['recompute']:10.2f} "
                     f"{m['kept_bytes'] / GIB:9.3f} {peak:>10}")
    path.write_text("\n".join(lines) + "\n")


def plot_stage_costs(report: dict[str, Any], path: Path) -> Path:
    """Per stage of the largest stage count: measured F, B, W and kept memory beside the analytic model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, variant in report["variants"].items():
        num_stages = max(variant["profiles"])
        meas, ana = variant["profiles"][num_stages]["stages"], variant["analytic"][num_stages]["stages"]
        xs = range(len(meas))
        total = [1e3 * (s["f"] + s["b"] + s["w"]) for s in meas]
        axes[0].plot(xs, total, marker="o", label=f"{name} n={variant['streams']} measured")
        axes[0].plot(xs, [1e3 * (s["f"] + s["b"] + s["w"]) for s in ana], ls="--", label=f"{name} analytic")
        axes[1].plot(xs, [s.get("act_mem_bytes", 0) / GIB for s in meas], marker="o", label=f"{name} measured")
        axes[1].plot(xs, [s.get("act_mem_bytes", 0) / GIB for s in ana], ls="--", label=f"{name} analytic")
    axes[0].set(title=f"F + B + W per micro-batch ({report['device']})", xlabel="stage", ylabel="ms")
    axes[1].set(title="kept activations per micro-batch", xlabel="stage", ylabel="GiB")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
