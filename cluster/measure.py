"""Measured steps in the scheduler's terms: per-stage costs for its simulator and profile
file, and a :class:`SimResult` of measured events for its trace exporter.

    costs = measured_costs(cfg, sched, results)      # medians per model stage
    costs.write_profile(path)                        # the "dualpipe-mhc-profile/1" file
    predicted = simulate(sched, costs)               # the simulator fed the measurements
    observed = measured_result(sched, results[-1])   # -> write_chrome_trace / write_timeline_png

What a stage's numbers mean (scheduler/costs.py): ``f`` one forward, ``b`` the input-
gradient backward, ``w`` the weight-gradient part; a full backward costs ``b + w``.
A schedule without W actions (1F1B) only measures full backwards: then ``b`` is the full
backward and ``w`` is 0, which gives the simulator the same totals. ``fb_overlap`` is the
measured time of an F&B pair over F + B run alone (the runtime runs the two halves back to
back, so it should be about 1).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from dualpipe_mhc.scheduler.costs import Costs
from dualpipe_mhc.scheduler.ir import Schedule
from dualpipe_mhc.scheduler.simulate import COMPUTE_STREAM, Event, SimResult

WAIT_STREAM = "recv-wait"


def activation_bytes(cfg: Any) -> int:
    """Bytes of one micro-batch's ``[b, S, n, C]`` activation (and of its gradient)."""
    m = cfg.model
    elem = 2 if cfg.run.dtype == "bfloat16" else 4
    return cfg.pipeline.microbatch_size * m.seq_len * m.streams * m.width * elem


def _kept(results: list[Any], warmup: int) -> list[Any]:
    return results[warmup:] or results


def measured_costs(cfg: Any, sched: Schedule, results: list[Any], warmup: int = 1, meta: dict | None = None) -> Costs:
    """Median per-stage F / B / W seconds over the steps after ``warmup``."""
    f, b_split, b_full, w = (defaultdict(list) for _ in range(4))
    pairs: list[tuple[int, int, float]] = []  # (F stage, B stage, pair seconds)
    for res in _kept(results, warmup):
        for rank in res.ranks:
            for a in rank["actions"]:
                halves = a["halves"]
                for h in halves:
                    s = h["stage"]
                    if h["kind"] == "F":
                        f[s].append(h["seconds"])
                    elif h["kind"] == "W":
                        w[s].append(h["seconds"])
                    elif h["full"]:
                        b_full[s].append(h["seconds"])
                    else:
                        b_split[s].append(h["seconds"])
                if a["kind"] == "FB":
                    pairs.append((halves[0]["stage"], halves[1]["stage"], a["end"] - a["start"]))
    n = sched.num_stages
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    fs = [med(f[s]) for s in range(n)]
    bs, ws = [], []
    for s in range(n):
        if w[s]:
            ww = med(w[s])
            bb = med(b_split[s]) if b_split[s] else max(0.0, med(b_full[s]) - ww)
        else:
            ww, bb = 0.0, med(b_full[s])
        bs.append(bb)
        ws.append(ww)
    fb = 1.0
    if pairs:
        ratios = [t / (fs[sf] + bs[sb] + ws[sb]) for sf, sb, t in pairs if fs[sf] + bs[sb] + ws[sb] > 0]
        fb = min(1.5, max(0.05, med(ratios))) if ratios else 1.0
    act = float(activation_bytes(cfg))
    acts = [act] * (n - 1) + [0.0]  # the last stage outputs a loss
    return Costs(
        fs, bs, ws, acts, link_bandwidth=cfg.link.bandwidth, link_latency=cfg.link.latency,
        fb_overlap=fb, meta=dict(meta or {}),
    )


def measured_result(sched: Schedule, res: Any, comm_time: list[float] | None = None) -> SimResult:
    """One measured step as a :class:`SimResult` (compute events, and the time each rank
    waited for its inputs on a ``recv-wait`` track)."""
    events: list[Event] = []
    for r, rank in enumerate(res.ranks):
        for a in rank["actions"]:
            act = a["action"]
            if a["start"] - a["wait_start"] > 1e-6:
                events.append(Event(r, WAIT_STREAM, f"wait {a['label']}", "WAIT", a["wait_start"], a["start"],
                                    act["microbatch"], act["chunk"]))
            events.append(Event(r, COMPUTE_STREAM, a["label"], a["kind"], a["start"], a["end"],
                                act["microbatch"], act["chunk"]))
    busy = res.busy()
    wait = res.waiting()
    peaks = [float(rk.get("peak_memory_bytes") or 0.0) for rk in res.ranks]
    from dualpipe_mhc.scheduler.validate import validate

    inflight = validate(sched).peak_inflight
    return SimResult(
        schedule=sched.name, ranks=sched.ranks, microbatches=sched.microbatches, step_time=res.step_time,
        busy=busy, bubble=[max(0.0, res.step_time - b) for b in busy], exposed_comm=wait,
        comm_time=comm_time or [0.0] * sched.ranks, peak_activation_bytes=peaks, peak_inflight=inflight,
        _events=events,
    )
