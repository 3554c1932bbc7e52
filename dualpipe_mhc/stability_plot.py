"""The stability report as a picture: six panels over training and depth (``dualpipe-mhc stability``)."""

from __future__ import annotations

from pathlib import Path


def plot_report(report: dict, path: Path) -> Path:
    """Six panels: loss, gradient norm, gain over training; gain over depth, per-layer H_res, random demo."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    colors = {"plain": "tab:gray", "hc": "tab:red", "mhc": "tab:blue"}
    fig, ax = plt.subplots(2, 3, figsize=(18, 9.5))
    s = report["settings"]
    for kind, r in report["kinds"].items():
        c = colors[kind]
        steps = range(1, len(r["loss"]) + 1)
        ax[0, 0].plot(steps, _smooth(r["loss"]), color=c, label=f"{kind} (n={r['streams']})")
        ax[0, 1].plot(steps, r["grad_norm"], color=c, label=kind, lw=0.8)
        ax[0, 2].plot(r["eval_steps"], r["composite_forward_gain_history"], color=c, marker="o", ms=3, label=f"{kind} fwd")
        ax[0, 2].plot(r["eval_steps"], r["composite_backward_gain_history"], color=c, ls="--", label=f"{kind} bwd")
        depth = range(1, len(r["composite_forward_gain"]) + 1)
        ax[1, 0].plot(depth, r["composite_forward_gain"], color=c, marker="o", ms=3, label=f"{kind} fwd")
        ax[1, 0].plot(depth, r["composite_backward_gain"], color=c, ls="--", label=f"{kind} bwd")
        if kind != "plain":
            ax[1, 1].plot(depth, r["layer_forward_gain"], color=c, marker="o", ms=3, label=f"{kind} gain fwd")
            ax[1, 1].plot(depth, r["layer_backward_gain"], color=c, ls="--", label=f"{kind} gain bwd")
            ax[1, 1].plot(depth, r["identity_distance"], color=c, ls=":", label=f"{kind} |H_res - I|_F (mean tok)")
    ax[0, 0].set(title=f"training loss (moving mean of 10), lr {s['lr']:g}", xlabel="step", ylabel="nats / byte")
    ax[0, 1].set(title=f"gradient norm before clipping (clip {s['clip']:g})", xlabel="step", yscale="log")
    ax[0, 2].set(title=f"composite gain at full depth ({s['sublayers']} sublayers) during training",
                 xlabel="step", ylabel="gain (worst token)", yscale="log")
    ax[1, 0].set(title="trained: composite Amax gain of H_res products (worst token)",
                 xlabel="sublayer depth", ylabel="gain", yscale="log")
    ax[1, 1].set(title="trained: single-sublayer H_res (worst-token gain, distance from I)", xlabel="sublayer")
    demo = report["random_demo"]
    depth = range(1, demo["depth"] + 1)
    shades = plt.cm.Reds([0.45, 0.7, 0.95, 0.6, 0.8])
    for i, (sigma, hc) in enumerate(demo["hc"].items()):
        ax[1, 2].plot(depth, hc["forward"], color=shades[i % 5], label=f"HC I+{sigma}G fwd")
        ax[1, 2].plot(depth, demo["mhc"][sigma]["backward"], color="tab:blue", ls=(0, (1 + i, 2)),
                      label=f"mHC Sinkhorn(I+{sigma}G) bwd")
    for i, (a, mhc) in enumerate(demo["mhc_wide"].items()):
        ax[1, 2].plot(depth, mhc["backward"], color="navy", ls=(0, (4, 1 + 2 * i)), label=f"mHC Sinkhorn(U(±{a})) bwd")
    first = next(iter(demo["mhc"].values()))
    ax[1, 2].plot(depth, first["forward"], color="tab:cyan", lw=0.8, label="mHC fwd (every case: 1)")
    ax[1, 2].set(title=f"untrained random matrices, n={demo['streams']}, worst of {demo['trials']}",
                 xlabel="depth (matrices multiplied)", ylabel="composite gain", yscale="log")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(
        f"dualpipe-mhc stability: plain vs HC vs mHC — {s['layers']} layers, C={s['width']}, n={s['streams']}, "
        f"{s['steps']} steps, batch {s['batch_size']}x{s['seq_len']} bytes"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out
