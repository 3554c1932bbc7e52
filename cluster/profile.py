"""The profiler: one config run twice — mHC (n streams) and the plain residual (n = 1), optionally HC —
on the same schedule, micro-batches and link, and the mHC overhead that results (DESIGN.md §3).

    report = profile(cfg, with_hc=False)          # runs the variants through the runtime
    report["overhead_pct"]["mhc"]                 # +x.x % step time over plain
    report["verdict"]                             # one line against the paper's +6.7 %

Each variant is the same :class:`RunConfig` with only ``model.residual`` and
``model.streams`` changed, executed by a *runner*: ``runner(cfg) -> run report``,
the runtime's ``run`` by default. The run report is reduced here to the numbers a
comparison needs (see :func:`measurement`); per-rank lists are kept per rank.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

PAPER_OVERHEAD_PCT = 6.7  # mHC n = 4 over the plain residual, training time (arXiv 2512.24880)
UNAVAILABLE = "unavailable"

Runner = Callable[[Any], dict[str, Any]]


def variant_configs(cfg: Any, with_hc: bool = False) -> dict[str, Any]:
    """``{"mhc": cfg', "plain": cfg'', ["hc": ...]}``: the config with only the residual kind and n changed.

    mHC and HC take the config's n when it asks for a hyper-connected residual, else 4 (the paper's).
    """
    from dualpipe_mhc.config import config_from_dict, dump_config

    n = cfg.model.streams if cfg.model.residual != "plain" and cfg.model.streams > 1 else 4
    kinds = {"mhc": ("mhc", n), "plain": ("plain", 1)}
    if with_hc:
        kinds["hc"] = ("hc", n)
    out = {}
    for name, (residual, streams) in kinds.items():
        data = dump_config(cfg)
        data["model"].update(residual=residual, streams=streams)
        out[name] = config_from_dict(data)
    return out


def _per_rank(value: Any, ranks: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * ranks
    return [float(v) for v in value]


def measurement(run: dict[str, Any], warmup_steps: int = 1) -> dict[str, Any]:
    """The comparison's numbers from one run report.

    Step time is the median over the steps after ``warmup_steps`` (all of them if
    that leaves none). Bubble, exposed and total communication are per rank, as the
    run measured them; hidden communication = total - exposed. Energy per step is
    the median per rank over the same steps and their sum over ranks, or
    ``"unavailable"`` where NVML gave none.
    """
    measured = run.get("measured", run)
    steps = [float(t) for t in measured["step_times_s"]] if "step_times_s" in measured else [measured["step_time_s"]]
    kept = steps[warmup_steps:] or steps
    step_time = statistics.median(kept)
    ranks = len(measured["bubble_s"])
    bubble = _per_rank(measured["bubble_s"], ranks)
    exposed = _per_rank(measured.get("exposed_comm_s", [0.0] * ranks), ranks)
    comm = _per_rank(measured.get("comm_s", exposed), ranks)
    out: dict[str, Any] = {
        "step_time_s": step_time,
        "step_times_s": steps,
        "bubble_s": bubble,
        "bubble_fraction": sum(bubble) / (ranks * step_time) if step_time else 0.0,
        "busy_s": [max(0.0, step_time - b) for b in bubble],
        "exposed_comm_s": exposed,
        "comm_s": comm,
        "hidden_comm_s": [max(0.0, c - e) for c, e in zip(comm, exposed)],
        "peak_memory_bytes": measured.get("peak_memory_bytes", UNAVAILABLE),
        "loss": run.get("loss", measured.get("loss")),
    }
    out.update(_energy(run.get("nvml", measured.get("nvml")), warmup_steps))
    return out


def _energy(nvml: list[dict[str, Any]] | None, warmup_steps: int) -> dict[str, Any]:
    """Per-rank median energy, power and NVLink bytes per step from the ranks' NVML reports."""
    out: dict[str, Any] = {
        "energy_j_per_step": UNAVAILABLE,
        "energy_j_per_step_per_rank": UNAVAILABLE,
        "mean_power_w_per_rank": UNAVAILABLE,
        "nvlink_bytes_per_step_per_rank": UNAVAILABLE,
        "energy_source": UNAVAILABLE,
    }
    if not nvml:
        return out

    def per_rank(key: str) -> list[float] | str:
        values = []
        for rank_report in nvml:
            steps = rank_report.get("steps", [])
            got = [s[key] for s in (steps[warmup_steps:] or steps) if isinstance(s.get(key), (int, float))]
            if not got:
                return UNAVAILABLE
            values.append(statistics.median(got))
        return values

    energy = per_rank("energy_j")
    out["energy_j_per_step_per_rank"] = energy
    if energy != UNAVAILABLE:
        out["energy_j_per_step"] = sum(energy)
    out["mean_power_w_per_rank"] = per_rank("mean_power_w")
    tx = per_rank("nvlink_tx_bytes")
    out["nvlink_bytes_per_step_per_rank"] = tx
    sources = {s.get("energy_source") for r in nvml for s in r.get("steps", [])} - {None}
    out["energy_source"] = ",".join(sorted(sources)) if sources else UNAVAILABLE
    return out


def compare(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overhead of each hyper-connected variant over ``plain``, and where the extra time goes."""
    base = variants["plain"]
    overhead, breakdown = {}, {}
    for name, v in variants.items():
        if name == "plain":
            continue
        overhead[name] = 100.0 * (v["step_time_s"] / base["step_time_s"] - 1.0)

        def mean_delta(key: str) -> float:
            return statistics.fmean(v[key]) - statistics.fmean(base[key])

        breakdown[name] = {
            "step_time_s": v["step_time_s"] - base["step_time_s"],
            "busy_s": mean_delta("busy_s"),  # compute, recomputation included
            "bubble_s": mean_delta("bubble_s"),
            "exposed_comm_s": mean_delta("exposed_comm_s"),
        }
        if isinstance(v["energy_j_per_step"], float) and isinstance(base["energy_j_per_step"], float):
            breakdown[name]["energy_pct"] = 100.0 * (v["energy_j_per_step"] / base["energy_j_per_step"] - 1.0)
    return {"overhead_pct": overhead, "delta_vs_plain": breakdown}


def verdict(overhead_pct: float, streams: int, setting: str, on_gpu: bool) -> str:
    """One line against the paper's +6.7 %."""
    where = "within" if overhead_pct <= PAPER_OVERHEAD_PCT else "above"
    line = (
        f"mHC n={streams} costs {overhead_pct:+.1f} % step time over the plain residual ({setting}): "
        f"{where} the paper's +{PAPER_OVERHEAD_PCT} %"
    )
    if not on_gpu:
        line += " — a CPU run, not comparable to the paper's H800 figure"
    return line


def profile(
    cfg: Any,
    with_hc: bool = False,
    runner: Runner | None = None,
    warmup_steps: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the variants one after another through ``runner`` and compare them; returns the report."""
    from dualpipe_mhc.config import dump_config

    runner = runner or default_runner()
    configs = variant_configs(cfg, with_hc)
    variants, runs = {}, {}
    for name, vcfg in configs.items():
        if progress is not None:
            progress(name)
        runs[name] = runner(vcfg)
        variants[name] = measurement(runs[name], warmup_steps) | {
            "residual": vcfg.model.residual,
            "streams": vcfg.model.streams,
        }
    cmp = compare(variants)
    link = cfg.link
    setting = (
        f"{cfg.pipeline.schedule}, {cfg.pipeline.ranks} ranks, {cfg.pipeline.microbatches} micro-batches, "
        f"link {link.preset or 'custom'} {link.bandwidth / 1e9:g} GB/s{' shaped' if link.shape else ''}"
    )
    device = next((r.get("device") for r in runs.values() if r.get("device")), "unknown")
    on_gpu = any("cuda" in str(r.get("device", "")).lower() or "gpu" in str(r.get("device", "")).lower()
                 or "h100" in str(r.get("device", "")).lower() or "h200" in str(r.get("device", "")).lower()
                 for r in runs.values())
    return {
        "format": "dualpipe-mhc-profile-report/1",
        "setting": setting,
        "device": device,
        "schedule": cfg.pipeline.schedule,
        "ranks": cfg.pipeline.ranks,
        "microbatches": cfg.pipeline.microbatches,
        "link": {"preset": link.preset, "bandwidth_gbps": link.bandwidth / 1e9,
                 "latency_us": link.latency * 1e6, "shaped": link.shape},
        "recompute_block_layers": cfg.recompute.block_layers if cfg.recompute.enabled else None,
        "warmup_steps": warmup_steps,
        "variants": variants,
        **cmp,
        "paper_overhead_pct": PAPER_OVERHEAD_PCT,
        "verdict": verdict(cmp["overhead_pct"]["mhc"], variants["mhc"]["streams"], setting, on_gpu),
        "config": dump_config(cfg),
    }


def default_runner() -> Runner:
    """The runtime's ``run``; one Ray session serves every variant."""
    raise NotImplementedError("the runtime's run entry point is not available yet")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Step time split into compute / bubble (exposed comm shown inside it), per variant, and per-rank bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    v = report["variants"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    ms = 1e3
    busy = [statistics.fmean(v[n]["busy_s"]) * ms for n in names]
    exposed = [statistics.fmean(v[n]["exposed_comm_s"]) * ms for n in names]
    bubble = [statistics.fmean(v[n]["bubble_s"]) * ms - e for n, e in zip(names, exposed)]
    labels = [f"{n} (n={v[n]['streams']})" for n in names]
    ax[0].bar(labels, busy, label="compute (mean over ranks)", color="tab:blue")
    ax[0].bar(labels, exposed, bottom=busy, label="exposed comm", color="tab:red")
    ax[0].bar(labels, bubble, bottom=[b + e for b, e in zip(busy, exposed)], label="other bubble", color="tab:gray")
    for i, n in enumerate(names):
        pct = report["overhead_pct"].get(n)
        text = f"{v[n]['step_time_s'] * ms:.1f} ms" + (f"\n{pct:+.1f} %" if pct is not None else "")
        ax[0].text(i, v[n]["step_time_s"] * ms, text, ha="center", va="bottom", fontsize=9)
    ax[0].set(title=f"step time; paper: mHC +{PAPER_OVERHEAD_PCT} %", ylabel="ms")
    ax[0].legend(fontsize=8, loc="lower right")
    ranks = range(len(v[names[0]]["bubble_s"]))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [r + i * width for r in ranks]
        ax[1].bar(xs, [b * ms for b in v[n]["bubble_s"]], width, label=f"{n} bubble")
        ax[1].bar(xs, [e * ms for e in v[n]["exposed_comm_s"]], width, fill=False, hatch="//", edgecolor="k")
    ax[1].set(title="per-rank bubble (hatched: exposed comm)", xlabel="rank", ylabel="ms")
    ax[1].legend(fontsize=8)
    energy = [v[n]["energy_j_per_step"] for n in names]
    if all(isinstance(e, float) for e in energy):
        ax[2].bar(labels, energy, color="tab:green")
        ax[2].set(title="energy per step, all ranks", ylabel="J")
    else:
        mem = [v[n]["peak_memory_bytes"] for n in names]
        if all(isinstance(m, list) for m in mem):
            ax[2].bar(labels, [max(m) / 2**20 for m in mem], color="tab:purple")
            ax[2].set(title="peak memory, worst rank (energy unavailable)", ylabel="MiB")
        else:
            ax[2].text(0.5, 0.5, "energy and memory unavailable", ha="center", transform=ax[2].transAxes)
    fig.suptitle(report["verdict"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
