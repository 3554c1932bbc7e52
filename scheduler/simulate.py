"""Discrete-event simulation of one pipeline step.

Each rank runs its compute actions in order on one compute stream; an action starts when
the rank is free and every input has arrived. An output needed on another rank leaves
when its action ends (for an F&B pair: when the pair ends, as in DeepSeek's reference)
over the directed link (src -> dst), which carries one message at a time in the order the
sender produced them: a message takes bytes / bandwidth on the link plus the latency.
Sends never block the sender, so communication overlaps compute unless the receiver has
nothing else to run. A rank's *input wait* is all of its waiting for inputs; the part after
every input's producer had finished is the *exposed* communication (the rest is upstream
compute, i.e. bubble). ``scheduler.measured`` applies the same two definitions to measured steps.

Every directed link is fed by a single rank whose outputs appear in program order, so the
simulation needs no global event queue: each rank runs ahead until an input is missing,
parks on it, and is woken when it is produced. That is O(actions) in plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .builders import DISPLAY_NAMES, compute_halves
from .costs import Costs
from .ir import Action, Schedule, ScheduleError

COMPUTE_STREAM = "compute"

# The largest schedule the CLI simulates. Time and memory grow linearly with the compute
# halves (F, B, W; build, validation and simulation alike): benchmarks/bench_simulator_scaling.py
# measured 20-40 us and 1.0-1.2 kB per half on the shared 2-core CPU box (its results file), so
# a schedule at the bound takes under a minute and about a GiB there (DualPipeV, 8 ranks x 31250
# through the CLI: 47 s, 0.9 GB peak), and a sweep of four schedules a few minutes and GiB.
MAX_SIMULATED_HALVES = 1_000_000


def check_simulation_size(name: str, ranks: int, microbatches: int) -> None:
    """Raise :class:`ScheduleError` (field ``microbatches``) before any work if schedule ``name``
    at this size is over :data:`MAX_SIMULATED_HALVES`; the message says the largest count that fits."""
    halves = compute_halves(name, ranks, microbatches)
    if halves <= MAX_SIMULATED_HALVES:
        return
    shown = DISPLAY_NAMES.get(name, name)
    raise ScheduleError(
        f"{shown} on {ranks} ranks x {microbatches} micro-batches is {halves:,} compute actions, over the "
        f"simulator's bound of {MAX_SIMULATED_HALVES:,} per schedule (time and memory grow linearly); "
        f"use microbatches<={largest_simulated_microbatches(name, ranks)} or fewer ranks",
        "microbatches",
    )


def largest_simulated_microbatches(name: str, ranks: int) -> int:
    """The most micro-batches schedule ``name`` on ``ranks`` ranks may have within the bound."""
    return MAX_SIMULATED_HALVES // compute_halves(name, ranks, 1)


@dataclass(slots=True)
class Event:
    """One interval on a track: a compute action, or a message on a link."""

    rank: int
    stream: str  # "compute" or "send->r<peer>"
    name: str  # action label like "F3.c1", or "F3.s2" for a message carrying F3's stage-2 output
    kind: str  # F, B, W, FB, or SEND_F / SEND_B for messages
    start: float
    end: float
    microbatch: int
    chunk: int


@dataclass
class SimResult:
    """What one simulated step costs. Times in seconds, memory in bytes, lists per rank."""

    schedule: str
    ranks: int
    microbatches: int
    step_time: float
    busy: list[float]  # compute time per rank
    bubble: list[float]  # idle time per rank = step_time - busy
    exposed_comm: list[float]  # part of the idle spent waiting for messages already produced
    comm_time: list[float]  # transfer time of the messages each rank sent
    peak_activation_bytes: list[float]
    peak_inflight: list[int]  # micro-batch chunks held (F done, B not done)
    # all of the time a rank waited for inputs, upstream compute included (exposed_comm is the
    # part after the producers had finished); the same definitions as scheduler.measured
    input_wait: list[float] = field(default_factory=list)
    # Raw (rank, start, end, action) and (src, dst, start, end, key) tuples; turned into
    # Event objects only when someone asks, which halves the cost of a large simulation.
    _compute: list = field(default_factory=list, repr=False)
    _sends: list = field(default_factory=list, repr=False)
    _events: list[Event] | None = field(default=None, repr=False)

    @property
    def events(self) -> list[Event]:
        """Compute actions and link messages, in simulation order (empty if not recorded)."""
        if self._events is None:
            self._events = _events(self._compute, self._sends, self.microbatches)
        return self._events

    @property
    def bubble_fraction(self) -> float:
        """Mean idle share of the step over ranks."""
        return sum(self.bubble) / (len(self.bubble) * self.step_time) if self.step_time else 0.0

    @property
    def exposed_comm_max(self) -> float:
        """Exposed communication of the worst-hit rank, seconds."""
        return max(self.exposed_comm) if self.exposed_comm else 0.0

    @property
    def hidden_comm(self) -> list[float]:
        return [max(0.0, c - e) for c, e in zip(self.comm_time, self.exposed_comm)]

    def summary(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "ranks": self.ranks,
            "microbatches": self.microbatches,
            "step_time_s": self.step_time,
            "bubble_fraction": self.bubble_fraction,
            "bubble_s": self.bubble,
            "exposed_comm_s": self.exposed_comm,
            "input_wait_s": self.input_wait,
            "comm_s": self.comm_time,
            "peak_activation_bytes": self.peak_activation_bytes,
            "peak_inflight": self.peak_inflight,
        }


def simulate(sched: Schedule, costs: Costs, record_events: bool = True) -> SimResult:
    """Simulate one step of ``sched`` under ``costs`` (explicit SEND/RECV actions are ignored:
    the transfers follow from the paths)."""
    if costs.num_stages != sched.num_stages:
        raise ScheduleError(
            f"costs give {costs.num_stages} stages but the {sched.name} schedule has {sched.num_stages}; "
            f"build the costs for num_stages={sched.num_stages}"
        )
    num_stages, num_mb, ranks = sched.num_stages, sched.microbatches, sched.ranks
    deferred = sched.deferred_weights()
    # Output keys: F(s, mb) -> 2*(s*M + mb), B(s, mb) -> 2*(s*M + mb) + 1.
    nkeys = 2 * num_stages * num_mb
    # ready[k]: when output k is usable by its consumer (after the transfer, if any);
    # ready[nkeys + k]: when it was produced, for a consumer on the producing rank.
    ready = [-1.0] * (2 * nkeys)
    rules = _rules(sched)
    programs = [_compile(sched, r, costs, deferred, num_mb, nkeys, rules) for r in range(ranks)]
    link_free: dict[tuple[int, int], float] = {}
    link_of = {}  # (src, dst) -> (bandwidth, latency), looked up once per pair

    ptr = [0] * ranks
    clock = [0.0] * ranks
    busy = [0.0] * ranks
    exposed = [0.0] * ranks
    wait = [0.0] * ranks
    comm = [0.0] * ranks
    waiting: dict[int, int] = {}
    compute_events: list[tuple[int, float, float, Action]] = []
    sends: list[tuple[int, int, float, float, int]] = []
    runnable = list(range(ranks))
    while runnable:
        r = runnable.pop()
        prog = programs[r]
        i, t = ptr[r], clock[r]
        while i < len(prog):
            dur, needs, outputs, action = prog[i]
            # produced: when the inputs' producers finished, i.e. when this action could start
            # if every transfer were instant; the wait beyond that is exposed communication.
            start, produced, blocked = t, t, False
            for k in needs:
                a = ready[k]
                if a < 0:
                    waiting[k] = r
                    blocked = True
                    break
                start = max(start, a)
                produced = max(produced, ready[nkeys + k] if k < nkeys else a)
            if blocked:
                break
            exposed[r] += start - produced
            wait[r] += start - t
            end = start + dur
            busy[r] += dur
            if record_events:
                compute_events.append((r, start, end, action))
            for k, nbytes, dst in outputs:
                ready[nkeys + k] = end
                if dst < 0 or dst == r:
                    ready[k] = end
                else:
                    link = (r, dst)
                    if link not in link_of:
                        link_of[link] = costs.link(r, dst)
                    bw, lat = link_of[link]
                    send_start = max(end, link_free.get(link, 0.0))
                    wire = nbytes / bw
                    link_free[link] = send_start + wire
                    ready[k] = send_start + wire + lat
                    comm[r] += wire + lat
                    if record_events:
                        sends.append((r, dst, send_start, ready[k], k))
                for wk in (k, nkeys + k):
                    waiter = waiting.pop(wk, None)
                    if waiter is not None:
                        runnable.append(waiter)
            t = end
            i += 1
        ptr[r], clock[r] = i, t

    stuck = [r for r in range(ranks) if ptr[r] < len(programs[r])]
    if stuck:
        where = "; ".join(f"rank {r} at {programs[r][ptr[r]][3]}" for r in stuck[:4])
        raise ScheduleError(f"simulation deadlocked: {where}; run validate(schedule) for the cause")

    step = max(clock) if ranks else 0.0
    peak_bytes, peak_count = sched.peak_inflight(costs.act_mem_bytes)
    return SimResult(
        schedule=sched.name,
        ranks=ranks,
        microbatches=num_mb,
        step_time=step,
        busy=busy,
        bubble=[step - b for b in busy],
        exposed_comm=exposed,
        input_wait=wait,
        comm_time=comm,
        peak_activation_bytes=peak_bytes,
        peak_inflight=peak_count,
        _compute=compute_events,
        _sends=sends,
    )


def _rules(sched: Schedule) -> dict[tuple[int, str, int], tuple[list[tuple[str, int, bool]], int]]:
    """The IR's message rule, read once per (direction, kind, stage): the prerequisites as
    (kind, stage, is the input message) and the rank the output goes to (-1: none).

    A rule depends on the micro-batch only through its direction (``Schedule.location``), so
    asking the IR for one micro-batch of each direction covers all of them; that keeps the
    per-action work of a 64-rank, 512-micro-batch compile to table look-ups."""
    first_of: dict[int, int] = {}
    for mb, d in enumerate(sched.directions):
        first_of.setdefault(d, mb)
    rules = {}
    for d, mb in first_of.items():
        for s in range(sched.num_stages):
            rank, chunk = sched.location(mb, s)
            for kind in ("F", "B", "W"):
                half = Action(kind, rank, s, chunk, mb)  # type: ignore[arg-type]
                message = sched.message_in(half)
                needs = [(k, st, message is not None and (k, st, m) == message.key)
                         for k, st, m in sched.prerequisites(half)]
                sent = sched.message_out(half)
                rules[(d, kind, s)] = (needs, sent.dst if sent is not None else -1)
    return rules


def _compile(sched: Schedule, rank: int, costs: Costs, deferred: set, num_mb: int, nkeys: int,
             rules: dict | None = None) -> list[tuple]:
    """(duration, input keys, [(output key, bytes, consumer rank or -1)], action) per compute
    action of ``rank``. An input that is a message is keyed by its output key (usable once it
    has arrived); one produced on this rank by design (a B's own F, a W's B) by ``nkeys + key``
    (usable once produced)."""
    rules = rules if rules is not None else _rules(sched)
    directions = sched.directions
    out = []
    for action in sched.actions[rank]:
        kind = action.kind
        if kind not in ("F", "B", "W", "FB"):
            continue
        dur = 0.0
        needs: list[int] = []
        outputs: list[tuple[int, float, int]] = []
        for half_kind, s, mb in _parts(action):
            prereqs, dst = rules[(directions[mb], half_kind, s)]
            for k, st, is_message in prereqs:
                key = 2 * (st * num_mb + mb) + (k == "B")
                needs.append(key if is_message else nkeys + key)
            key = 2 * (s * num_mb + mb)
            if half_kind == "F":
                dur += costs.f[s]
                outputs.append((key, costs.act_bytes[s], dst))
            elif half_kind == "B":
                dur += costs.b[s] if (s, mb) in deferred else costs.full_b[s]
                outputs.append((key + 1, costs.act_bytes[s - 1] if s > 0 else 0.0, dst))
            else:
                dur += costs.w[s]
        if kind == "FB":
            dur *= costs.fb_overlap
        out.append((dur, needs, outputs, action))
    return out


def _parts(action: Action) -> tuple[tuple[str, int, int], ...]:
    """(kind, stage, microbatch) of each compute half, without building Action objects."""
    if action.kind == "FB":
        pair = action.pair
        return (("F", action.stage, action.microbatch), (pair.kind, pair.stage, pair.microbatch))
    return ((action.kind, action.stage, action.microbatch),)


def _events(compute: list, sends: list, num_mb: int) -> list[Event]:
    events = [Event(r, COMPUTE_STREAM, a.label, a.kind, s, e, a.microbatch, a.chunk) for r, s, e, a in compute]
    for src, dst, start, end, key in sends:
        s, mb = divmod(key // 2, num_mb)
        kind = "SEND_B" if key % 2 else "SEND_F"
        events.append(Event(src, f"send->r{dst}", f"{kind[-1]}{mb}.s{s}", kind, start, end, mb, -1))
    return events
