"""Link calibration on a 2-rank worker group: the raw transport, then each link preset through the
shaper the runtime uses with ``link.shape=true`` (``dualpipe-mhc calibrate-link`` prints and writes it).

Each ``link`` object has the keys of the profile file's ``link`` (scheduler/costs.py), so a
simulation can take a preset's measured figures as they are.
"""

from __future__ import annotations

from typing import Any

FORMAT = "dualpipe-mhc-link-calibration/1"


def calibrate(group, links: dict[str, tuple[float, float]], sizes: list[int], repeats: int,
              progress=None) -> dict[str, Any]:
    """Measure ``raw`` and every ``links[name] = (bytes/s, s)`` on a 2-rank :class:`WorkerGroup`."""
    import ray

    from dualpipe_mhc.cluster.linkbench import fit_line

    def measure(bandwidth: float | None, latency: float) -> list[dict[str, Any]]:
        refs = [a.measure_link.remote(bandwidth, latency, sizes, repeats) for a in group.actors]
        return ray.get(refs)[0]

    out: dict[str, Any] = {}
    raw = measure(None, 0.0)
    raw_fit = fit_line(raw)
    out["raw"] = {"link": raw_fit, "points": [_point(p, None) for p in raw], "reachable": True}
    if progress:
        progress("raw", out["raw"])
    for name, (bw, lat) in links.items():
        # Shaping only slows a link down: a target above the raw rate measures the raw link.
        reachable = bw < raw_fit["bandwidth_gbps"] * 1e9
        pts = measure(bw, lat) if reachable else raw
        entry = {"target": {"bandwidth_gbps": bw / 1e9, "latency_us": lat * 1e6}, "link": fit_line(pts),
                 "points": [_point(p, (bw, lat)) for p in pts], "reachable": reachable}
        out[name] = entry
        if progress:
            progress(name, entry)
    return out


def _point(p: dict[str, Any], target: tuple[float, float] | None) -> dict[str, Any]:
    out = {"bytes": p["bytes"], "one_way_s": p["one_way_s"], "achieved_gbps": p["bytes"] / p["one_way_s"] / 1e9}
    if target is not None:
        t = target[1] + p["bytes"] / target[0]
        out["target_s"] = t
        out["error_pct"] = 100 * (p["one_way_s"] / t - 1)
    return out
