"""The recomputation plan's files (``dualpipe-mhc plan --out DIR``): its table as Markdown and JSON,
and a PNG of memory and time against the block size L_r. Reads the plan's JSON report, so an
infeasible plan draws the same way; matplotlib is imported only when drawing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _label(block_layers: int | None) -> str:
    return "off" if block_layers is None else str(block_layers)


def plan_markdown(report: dict[str, Any]) -> str:
    """Every searched L_r as a Markdown table, the choice marked."""
    choice = report.get("choice")
    lines = [
        f"# Recomputation plan: {report['layers']} layers, n = {report['streams']}, {report['schedule']}",
        "",
        f"Budget {report['budget_gib']:g} GiB per GPU; parameters, gradients and optimizer state "
        f"{report['state_gib']:.1f} GiB ({report['state_bytes_per_param']:g} bytes per parameter); closed form "
        f"sqrt(nL/(2(n+2))) = {report['closed_form']:.2f} -> L_r = {report['closed_form_block']}.",
        "",
        "| L_r | activations GiB | total GiB | recompute s | step s | fits |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        chosen = choice is not None and row == choice
        lines.append(
            f"| {_label(row['block_layers'])} | {row['activation_gib']:.2f} | {row['total_gib']:.2f} | "
            f"{row['recompute_s']:.4f} | {row['step_time_s']:.4f} | {'yes' if row['fits'] else 'no'}"
            f"{' (chosen)' if chosen else ''} |"
        )
    lines.append("")
    lines.append(f"error: {report['error']}" if "error" in report else
                 f"choice: L_r = {_label(report['block_layers'])}")
    return "\n".join(lines) + "\n"


def plot_plan(report: dict[str, Any], path: Path) -> Path:
    """Left: activation and total memory against L_r with the budget; right: step and recompute time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [_label(r["block_layers"]) for r in rows]
    xs = range(len(rows))
    fig, (mem, time) = plt.subplots(1, 2, figsize=(12, 4.5))
    mem.plot(xs, [r["activation_gib"] for r in rows], marker="o", label="activations")
    mem.plot(xs, [r["total_gib"] for r in rows], marker="o", label="total (with parameter state)")
    mem.axhline(report["budget_gib"], color="tab:red", ls="--", label=f"budget {report['budget_gib']:g} GiB")
    mem.set(title="memory on the fullest rank", xlabel="L_r (layers per recompute block)", ylabel="GiB")
    time.plot(xs, [r["step_time_s"] for r in rows], marker="o", label="step time")
    time.plot(xs, [r["recompute_s"] for r in rows], marker="o", label="recompute (busiest rank)")
    time.set(title="time per step", xlabel="L_r (layers per recompute block)", ylabel="s")
    choice = report.get("choice")
    for ax in (mem, time):
        ax.set_xticks(list(xs), labels)
        if choice is not None:
            ax.axvline(rows.index(choice), color="tab:green", alpha=0.4, lw=6, label="chosen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    verdict = report.get("error") or f"chosen L_r = {_label(report['block_layers'])}"
    fig.suptitle(f"recomputation plan, {report['schedule']}, n = {report['streams']}: {verdict}"[:160], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plan_files(report: dict[str, Any], out: Path) -> dict[str, str]:
    """plan.md, plan.png and plan.json under ``out``; sets and returns ``report["files"]`` (role -> path),
    so plan.json is the report ``--json`` writes."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": str(out / "plan.md"), "png": str(out / "plan.png"), "json": str(out / "plan.json")}
    report["files"] = files
    (out / "plan.md").write_text(plan_markdown(report))
    plot_plan(report, out / "plan.png")
    (out / "plan.json").write_text(json.dumps(report, indent=2) + "\n")
    return files
