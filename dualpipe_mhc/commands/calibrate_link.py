"""``dualpipe-mhc calibrate-link``: achieved one-way bandwidth per link preset and message size.

Starts two stage-worker actors (GPUs with NCCL where the cluster has them, else CPU
actors with gloo), measures the raw transport, then each preset through the link
shaper the runtime uses with ``link.shape=true``, and writes ``link_calibration.json``
under ``--out`` (default ``out/calibrate-link``):

    {"format": "dualpipe-mhc-link-calibration/1", "device": ..., "backend": ...,
     "links": {"raw": {...}, "h800-nvlink": {
         "target": {"bandwidth_gbps": 200.0, "latency_us": 3.0},   # absent for raw
         "link": {"bandwidth_gbps": 197.1, "latency_us": 9.8},     # fitted: what the simulator should use
         "points": [{"bytes", "one_way_s", "achieved_gbps", "target_s", "error_pct"}, ...],
         "reachable": true}}}                                      # false: the raw link is slower than the target

Each ``link`` object has the keys of the profile file's ``link`` (scheduler/costs.py),
so a simulation can take a preset's measured figures as they are. JSON keys (``--json``):
the same object plus ``files`` {json}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", default=None,
                   help="comma-separated link presets to shape to, or 'config' for the config's link "
                        "(default: every preset the raw link can reach, and the config's)")
    p.add_argument("--sizes-mib", default=None,
                   help="message sizes in MiB, comma-separated (default 0.25,1,4,16,64; GPUs add 256,1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed round trips per point, the fastest kept (default 5)")


def _parse_sizes(text: str | None, gpu: bool) -> list[int]:
    if text is None:
        mib = [0.25, 1, 4, 16, 64] + ([256, 1024] if gpu else [])
    else:
        try:
            mib = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--sizes-mib {text!r} is invalid; use numbers such as 1,16,64") from None
        if not mib or not all(0 < m < math.inf for m in mib):  # "m <= 0" would let nan through
            raise ValueError(f"--sizes-mib {text!r} is invalid: sizes must be positive and finite")
    return sorted({max(4, int(m * 2**20) // 4 * 4) for m in mib})


def _links(cfg, text: str | None) -> dict[str, tuple[float, float]]:
    from dualpipe_mhc.config import LINK_PRESETS

    config_link = (cfg.link.bandwidth, cfg.link.latency)
    if text is None:
        out = {name: (bw * 1e9, lat * 1e-6) for name, (bw, lat) in LINK_PRESETS.items()}
        out["config"] = config_link
        return out
    out = {}
    for name in (x.strip() for x in text.split(",") if x.strip()):
        if name == "config":
            out[name] = config_link
        elif name in LINK_PRESETS:
            bw, lat = LINK_PRESETS[name]
            out[name] = (bw * 1e9, lat * 1e-6)
        else:
            raise ValueError(f"--presets: {name!r} is unknown; use 'config' or some of {sorted(LINK_PRESETS)}")
    return out


def main(cfg, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} is invalid: use a positive count")
    if args.sizes_mib is not None:
        _parse_sizes(args.sizes_mib, gpu=False)  # a bad list fails here, before Ray starts
    links = _links(cfg, args.presets)
    console = Console()

    from dualpipe_mhc.cluster.calibration import FORMAT, calibrate
    from dualpipe_mhc.cluster.launch import WorkerGroup, connect
    from dualpipe_mhc.cluster.runtime import resolve_placement
    from dualpipe_mhc.config import config_from_dict, dump_config

    data = dump_config(cfg)
    data["pipeline"].update(ranks=2, schedule="1f1b", microbatches=2)
    two = config_from_dict(data)
    started = connect(cfg.cluster.address, cfg.run.timeout_s)
    import ray  # after connect, which states Ray's auth mode before Ray first reads it

    group = None
    try:
        use_gpu, backend = resolve_placement(two)
        sizes = _parse_sizes(args.sizes_mib, use_gpu)
        console.print(f"[bold]calibrate-link[/]: 2 workers, {backend}, sizes {[s / 2**20 for s in sizes]} MiB, "
                      f"{args.repeats} round trips per point, fastest kept")
        group = WorkerGroup.launch(2, use_gpu, backend, cfg.run.timeout_s)
        device = "gpu" if use_gpu else "cpu"
        if use_gpu:
            device = ray.get(group.actors[0].device_name.remote())

        def show(name: str, entry: dict[str, Any]) -> None:
            fit = entry["link"]
            target = entry.get("target")
            tail = (f" (target {target['bandwidth_gbps']:g} GB/s, {target['latency_us']:g} us"
                    f"{'' if entry['reachable'] else ': above the raw link, not shaped'})") if target else ""
            console.print(f"  {name:12s} fit {fit['bandwidth_gbps']:.3g} GB/s + {fit['latency_us']:.0f} us{tail}")

        links_out = calibrate(group, links, sizes, args.repeats, progress=show)
    finally:
        if group is not None:
            try:
                ray.get([a.shutdown.remote() for a in group.actors], timeout=10)
            except Exception:
                pass
            group.kill()
        if started:
            ray.shutdown()
    report = {"format": FORMAT, "device": device, "backend": backend, "sizes": sizes, "repeats": args.repeats,
              "links": links_out}
    console.print(table(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "link_calibration.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {path}")
    return {**report, "files": {"json": str(path)}}


def table(report: dict[str, Any]):
    """One row per link and message size (a column per size would pass 80 columns)."""
    from rich.table import Table

    out = Table(title="achieved one-way bandwidth per message size",
                caption="target: latency + bytes / bandwidth of the preset; error: measured time over the "
                "target's; -: the preset is faster than the raw link, so it was not shaped", title_style="bold")
    out.add_column("link", overflow="fold")  # a long name breaks over lines rather than losing its end
    for col in ("MiB", "GB/s", "one-way ms", "target ms", "error"):
        out.add_column(col, justify="right", overflow="fold")
    for name, entry in report["links"].items():
        fit = entry["link"]
        label = f"{name}\nfit {fit['bandwidth_gbps']:.3g} GB/s + {fit['latency_us']:.0f} us"
        for i, p in enumerate(entry["points"]):
            shaped = "error_pct" in p and entry["reachable"]
            out.add_row(
                label if i == 0 else "", f"{p['bytes'] / 2**20:g}", f"{p['achieved_gbps']:.3g}",
                f"{p['one_way_s'] * 1e3:.3f}", f"{p['target_s'] * 1e3:.3f}" if shaped else "-",
                f"{p['error_pct']:+.0f} %" if shaped else "-",
                end_section=i == len(entry["points"]) - 1,
            )
    return out
