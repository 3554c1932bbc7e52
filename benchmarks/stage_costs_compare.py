"""What does mHC n = 4 cost? The measured-cost simulation beside the analytic and the calibrated ones.

    python benchmarks/stage_costs_compare.py [DIR]      (default benchmarks/results/profile_stages_h200)

Reads what ``benchmarks/profile_stages_h200.sh`` wrote into DIR: ``report.json`` (profile-stages: the
stages measured on one GPU; every schedule is simulated again here from its profiles, so a simulator
change shows without a GPU), ``simulate_analytic_h200.json``
(the analytic model, h200 preset) and ``simulate_calibrated_h200.json`` (the analytic model with
the fitted h200 calibration), and writes ``DIR/comparison.md``: per schedule, step time at n = 1
and n = 4 and the n = 4 overhead from each source, and the per-stage fit errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


NAMES = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}


def _by_schedule(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["schedule"], {})[r["streams"]] = r
    return out


def _full_b_in_stages(report: dict) -> None:
    """Profiles written before ``full_b`` was a per-stage field (2026-12-01's run) carry it in their meta."""
    for variant in report["variants"].values():
        for profile in variant["profiles"].values():
            full = profile.get("meta", {}).pop("full_b", None)
            for stage, value in zip(profile["stages"], full or []):
                stage.setdefault("full_b", value)


def main() -> None:
    from dualpipe_mhc.scheduler.sweep import simulate_profiles

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/profile_stages_h200")
    report = json.loads((folder / "report.json").read_text())
    _full_b_in_stages(report)
    pipeline = report["config"]["pipeline"]
    measured_rows, _ = simulate_profiles(pipeline["ranks"], pipeline["microbatches"], report)
    sources = {
        "measured": _by_schedule(measured_rows),
        "analytic": _by_schedule(json.loads((folder / "simulate_analytic_h200.json").read_text())["rows"]),
        "calibrated": _by_schedule(json.loads((folder / "simulate_calibrated_h200.json").read_text())["rows"]),
    }
    lines = [
        f"Stages measured on one {report['device']} (torch {report['torch']}, median of {report['repeats']}); "
        "every schedule simulated on H800-shaped links (200 GB/s one way + 3 us): H200 compute, modelled links, "
        "not a cluster measurement.",
        "",
        "| schedule | measured n=1 s | measured n=4 s | measured overhead | exposed comm n=4 ms | peak GiB n=4 "
        "| analytic n=1 / n=4 s | analytic overhead | calibrated n=1 / n=4 s | calibrated overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in NAMES.items():
        m, a, c = (sources[k].get(name) for k in ("measured", "analytic", "calibrated"))
        if not m:
            continue
        lines.append(
            f"| {label} | {m[1]['step_time_s']:.3f} | {m[4]['step_time_s']:.3f} | "
            f"{100 * m[4]['overhead_vs_n1']:+.1f} % | {1e3 * m[4]['exposed_comm_s']:.1f} | "
            f"{m[4]['peak_activation_gib']:.1f} | {a[1]['step_time_s']:.3f} / {a[4]['step_time_s']:.3f} | "
            f"{100 * a[4]['overhead_vs_n1']:+.1f} % | {c[1]['step_time_s']:.3f} / {c[4]['step_time_s']:.3f} | "
            f"{100 * c[4]['overhead_vs_n1']:+.1f} % |"
        )
    fit = report.get("hardware_fit") or {}
    errs, raw = fit.get("fit", {}).get("max_rel_error", {}), fit.get("fit", {}).get("max_rel_error_uncalibrated", {})
    if errs:
        lines += ["", "Worst per-stage error of the analytic model against the measured stages, before -> after the fit:",
                  ", ".join(f"{k if k != 'mem' else 'kept memory'} {100 * raw[k]:.0f} % -> {100 * errs[k]:.1f} %"
                            for k in errs)]
    text = "\n".join(lines) + "\n"
    (folder / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
