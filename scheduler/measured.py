"""Measured pipeline steps in the scheduler's vocabulary (torch-free): what ``run`` and
``profile`` report about the steps the runtime executed, with the simulator's definitions.

A measured step is, per rank, the records of its compute actions in program order, as the
runtime's executor writes them (seconds since the step's common start, which the workers
share through a barrier up to its exit skew)::

    {"label": "F3.c1", "kind": "F", "action": Action.to_dict(),
     "wait_start": t0,   # the rank reached the action and began waiting for its inputs
     "start": t1,        # compute began (every input had arrived)
     "end": t2,
     "halves": [{"kind", "stage", "microbatch", "chunk", "full", "seconds"}, ...]}  # back to back from start

Per rank and step, one definition each (the same as :func:`scheduler.simulate.simulate`'s):

    busy          compute time, sum of end - start
    bubble        step time - busy
    input wait    sum of start - wait_start: all the time spent waiting for inputs, upstream
                  compute still running included (so pipeline bubble and communication)
    exposed comm  sum of start - max(wait_start, end of every input's producer): the part of
                  the input wait after the producers had finished, i.e. communication the
                  schedule failed to hide. A wait before the producer ends is bubble.

    times = analyse_step(sched, ranks, step_time)     # StepTimes of one step
    typical = median_times([...])                     # per-rank medians over steps
    costs = measured_costs(cfg, sched, steps)         # medians per model stage -> Costs
    observed = measured_result(sched, ranks, step_time)  # a SimResult for the trace exporter
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .config_view import ConfigView
from .costs import Costs
from .ir import Action, Schedule
from .simulate import COMPUTE_STREAM, Event, SimResult

WAIT_STREAM = "recv-wait"

RankRecord = dict[str, Any]  # {"actions": [action record, ...], optional "peak_memory_bytes"}


@dataclass
class StepTimes:
    """One measured step (or the medians of several), seconds; lists per rank."""

    step_time: float
    busy: list[float]
    bubble: list[float]
    input_wait: list[float]
    exposed_comm: list[float]


def busy(ranks: list[RankRecord]) -> list[float]:
    return [sum(a["end"] - a["start"] for a in r["actions"]) for r in ranks]


def input_wait(ranks: list[RankRecord]) -> list[float]:
    """Per rank, the time spent waiting for inputs (bubble and communication together)."""
    return [sum(a["start"] - a["wait_start"] for a in r["actions"]) for r in ranks]


def half_ends(ranks: list[RankRecord]) -> dict[tuple[str, int, int], float]:
    """(kind, stage, microbatch) -> when that compute half ended (halves run back to back)."""
    ends: dict[tuple[str, int, int], float] = {}
    for rec in ranks:
        for a in rec["actions"]:
            t = a["start"]
            for h in a["halves"]:
                t += h["seconds"]
                ends[(h["kind"], h["stage"], h["microbatch"])] = t
    return ends


def exposed_comm(sched: Schedule, ranks: list[RankRecord]) -> list[float]:
    """Per rank, the input wait after every input's producer had finished (see the module doc).

    The inputs are the IR's :meth:`Schedule.prerequisites` of each half; those produced on the
    rank itself ended before it reached the action, so only other ranks' can add to this.
    """
    ends = half_ends(ranks)
    out = []
    for r, rec in enumerate(ranks):
        exposed = 0.0
        for a in rec["actions"]:
            ready = a["wait_start"]
            for h in a["halves"]:
                half = Action(h["kind"], r, h["stage"], h.get("chunk", 0), h["microbatch"])
                for need in sched.prerequisites(half):
                    if need in ends:
                        ready = max(ready, ends[need])
            exposed += max(0.0, a["start"] - ready)
        out.append(exposed)
    return out


def analyse_step(sched: Schedule, ranks: list[RankRecord], step_time: float) -> StepTimes:
    used = busy(ranks)
    return StepTimes(
        step_time=step_time,
        busy=used,
        bubble=[max(0.0, step_time - b) for b in used],
        input_wait=input_wait(ranks),
        exposed_comm=exposed_comm(sched, ranks),
    )


def median_times(steps: list[StepTimes]) -> StepTimes:
    """Per-rank medians over ``steps``; the bubble from the median step and busy times, so
    the numbers of one rank add up (step = busy + bubble)."""
    step_time = statistics.median(s.step_time for s in steps)

    def med(key: str) -> list[float]:
        return [statistics.median(col) for col in zip(*(getattr(s, key) for s in steps))]

    used = med("busy")
    return StepTimes(step_time, used, [max(0.0, step_time - b) for b in used], med("input_wait"), med("exposed_comm"))


def activation_bytes(cfg: ConfigView) -> int:
    """Bytes of one micro-batch's ``[b, S, n, C]`` activation (and of its gradient)."""
    m = cfg.model
    elem = 2 if cfg.run.dtype == "bfloat16" else 4
    return cfg.pipeline.microbatch_size * m.seq_len * m.streams * m.width * elem


def measured_costs(cfg: ConfigView, sched: Schedule, steps: list[list[RankRecord]], meta: dict | None = None) -> Costs:
    """Median per-stage F / B / W seconds over ``steps`` (each: the rank records of one step).

    ``f`` is one forward, ``b`` the input-gradient backward, ``w`` the weight-gradient part;
    a full backward costs ``b + w``. A schedule without W actions (1F1B) only measures full
    backwards: then ``b`` is the full backward and ``w`` 0, the same totals for the simulator.
    ``fb_overlap`` is an F&B pair's time over F + B run alone (the runtime runs the halves
    back to back, so about 1).
    """
    f, b_split, b_full, w = (defaultdict(list) for _ in range(4))
    pairs: list[tuple[int, int, float]] = []  # (F stage, B stage, pair seconds)
    for ranks in steps:
        for rank in ranks:
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


def incoming_transfer_seconds(cfg: ConfigView, sched: Schedule) -> list[float]:
    """Per rank, the modelled transfer time of the messages it receives in one step:
    remote messages x (activation bytes / one-way bandwidth + latency) on the config's link."""
    per_message = activation_bytes(cfg) / cfg.link.bandwidth + cfg.link.latency
    counts = [0] * sched.ranks
    for r in range(sched.ranks):
        for half in sched.compute_halves(r):
            message = sched.message_in(half)
            if message is not None and message.remote:
                counts[r] += 1
    return [c * per_message for c in counts]


def measured_result(
    sched: Schedule, ranks: list[RankRecord], step_time: float, comm_time: list[float] | None = None
) -> SimResult:
    """One measured step as a :class:`SimResult`: compute events, the time each rank waited
    for its inputs on a ``recv-wait`` track, input wait and exposed communication as defined
    above, and ``comm_time`` (the modelled transfer time, see :func:`incoming_transfer_seconds`)."""
    events: list[Event] = []
    for r, rank in enumerate(ranks):
        for a in rank["actions"]:
            act = a["action"]
            if a["start"] - a["wait_start"] > 1e-6:
                events.append(Event(r, WAIT_STREAM, f"wait {a['label']}", "WAIT", a["wait_start"], a["start"],
                                    act["microbatch"], act["chunk"]))
            events.append(Event(r, COMPUTE_STREAM, a["label"], a["kind"], a["start"], a["end"],
                                act["microbatch"], act["chunk"]))
    times = analyse_step(sched, ranks, step_time)
    peaks = [float(rk.get("peak_memory_bytes") or 0.0) for rk in ranks]
    return SimResult(
        schedule=sched.name, ranks=sched.ranks, microbatches=sched.microbatches, step_time=step_time,
        busy=times.busy, bubble=times.bubble, exposed_comm=times.exposed_comm, input_wait=times.input_wait,
        comm_time=comm_time or [0.0] * sched.ranks, peak_activation_bytes=peaks,
        peak_inflight=sched.peak_inflight()[1], _events=events,
    )
