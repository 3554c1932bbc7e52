"""The profile report as a picture: step time split per variant, per-rank bubbles, energy or memory."""

from __future__ import annotations

import statistics
from pathlib import Path


def plot(report: dict, path: Path) -> Path:
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
    ax[0].set(title=f"step time; paper: mHC +{report['paper_overhead_pct']} %", ylabel="ms")
    ax[0].set_ylim(0, max(v[n]["step_time_s"] for n in names) * ms * 1.4)
    ax[0].legend(fontsize=8, loc="upper right")
    ranks = range(len(v[names[0]]["bubble_s"]))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [r + i * width for r in ranks]
        ax[1].bar(xs, [b * ms for b in v[n]["bubble_s"]], width, label=f"{n} bubble")
        ax[1].bar(xs, [e * ms for e in v[n]["exposed_comm_s"]], width, fill=False, hatch="//", edgecolor="k")
    ax[1].set(title="per-rank bubble (hatched: exposed comm)", xlabel="rank", ylabel="ms")
    ax[1].set_xticks([r + width * (len(names) - 1) / 2 for r in ranks], [str(r) for r in ranks])
    ax[1].legend(fontsize=8)
    energy = [v[n]["energy_j_per_step"] for n in names]  # "unavailable" without NVML
    if all(isinstance(e, float) for e in energy):
        ax[2].bar(labels, energy, color="tab:green")
        ax[2].set(title="energy per step, all ranks", ylabel="J")
    else:
        mem = [v[n]["peak_memory_bytes"] for n in names]
        if all(isinstance(m, list) for m in mem):
            ax[2].bar(labels, [max(m) / 2**20 for m in mem], color="tab:purple")
            ax[2].set(title="peak memory, worst rank (energy unavailable)", ylabel="MiB")
        else:
            ax[2].text(0.5, 0.5, "energy and peak memory unavailable\n(no NVML / CPU run)", ha="center",
                       transform=ax[2].transAxes)
            ax[2].set_axis_off()
    fig.suptitle(report["verdict"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
