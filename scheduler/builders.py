"""Schedule builders: 1F1B, ZB1P (ZB-H1), DualPipe and DualPipeV, in a registry by name.

Each builder returns a :class:`Schedule` of compute actions only (F, B, W, FB); the
transfers are implied by the paths, and :func:`scheduler.comms.add_comms` makes them
explicit for a runtime that wants them.

DualPipe and DualPipeV follow the step structure of DeepSeek's reference
(deepseek-ai/DualPipe, ``dualpipe.py`` / ``dualpipev.py``): warm-up forwards of the
near chunk, paired forwards of both chunks, zero-bubble B/W/F, the overlapped F&B main
loop, then the B/W cool-down where half of the backwards defer their weight gradients.
DualPipe on P ranks is the same per-rank program as DualPipeV on P/2 ranks with half the
micro-batches, mirrored about the middle: a rank in the second half runs its "near"
phase on the reverse direction.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from .ir import Action, Schedule, ScheduleError

Builder = Callable[[int, int], Schedule]


class _Program:
    """Emits one rank's actions from phase-level steps, tracking micro-batch counters.

    ``loc[phase]`` is (chunk, stage, first microbatch id) of that phase on this rank.
    Weight gradients deferred by a split B are queued and popped oldest-first by W, as
    DeepSeek's WeightGradStore does.
    """

    def __init__(self, rank: int, loc: dict[int, tuple[int, int, int]]) -> None:
        self.rank = rank
        self.loc = loc
        self.f_count = {p: 0 for p in loc}
        self.b_count = {p: 0 for p in loc}
        self.w_queue: deque[Action] = deque()
        self.actions: list[Action] = []

    def _make(self, kind: str, phase: int, counter: dict[int, int]) -> Action:
        chunk, stage, first_mb = self.loc[phase]
        mb = first_mb + counter[phase]
        counter[phase] += 1
        return Action(kind, self.rank, stage, chunk, mb)  # type: ignore[arg-type]

    def forward(self, phase: int) -> None:
        self.actions.append(self._make("F", phase, self.f_count))

    def backward(self, phase: int, zero_bubble: bool) -> None:
        b = self._make("B", phase, self.b_count)
        self.actions.append(b)
        if zero_bubble:
            self.w_queue.append(Action("W", b.rank, b.stage, b.chunk, b.microbatch))

    def weight(self) -> None:
        if self.w_queue:
            self.actions.append(self.w_queue.popleft())

    def forward_backward(self, f_phase: int, b_phase: int) -> None:
        f = self._make("F", f_phase, self.f_count)
        b = self._make("B", b_phase, self.b_count)  # full backward inside a pair, as in DeepSeek's
        self.actions.append(Action("FB", f.rank, f.stage, f.chunk, f.microbatch, pair=b))


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """Classic 1F1B: P-1-r warm-up forwards, then alternate F and (full) B."""
    check_schedule_args("1f1b", ranks, microbatches)
    sched = _single_path_schedule("1f1b", ranks, microbatches, split_backward=False)
    for r in range(ranks):
        prog = _Program(r, {0: (0, r, 0)})
        warmup = min(ranks - 1 - r, microbatches)
        for _ in range(warmup):
            prog.forward(0)
        for _ in range(microbatches - warmup):
            prog.forward(0)
            prog.backward(0, zero_bubble=False)
        for _ in range(warmup):
            prog.backward(0, zero_bubble=False)
        sched.actions.append(prog.actions)
    return sched


def zb1p(ranks: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., zero-bubble PP): 1F1B order with B split into B and W.

    Rank r defers the weight gradients of its first r backwards and runs the rest right
    after their B, so the last rank ends with P deferred W's that fill the cool-down
    while the gradients travel back; in-flight activations stay those of 1F1B.
    """
    check_schedule_args("zb1p", ranks, microbatches)
    sched = _single_path_schedule("zb1p", ranks, microbatches, split_backward=True)
    for r in range(ranks):
        prog = _Program(r, {0: (0, r, 0)})
        f = b = 0
        for _ in range(min(ranks - 1 - r, microbatches)):
            prog.forward(0)
            f += 1
        for _ in range(r):
            if f == microbatches:
                break
            prog.forward(0)
            prog.backward(0, zero_bubble=True)
            f, b = f + 1, b + 1
        while f < microbatches:
            prog.forward(0)
            prog.backward(0, zero_bubble=True)
            prog.weight()
            f, b = f + 1, b + 1
        while b < microbatches:
            prog.backward(0, zero_bubble=True)
            prog.weight()
            b += 1
        while prog.w_queue:
            prog.weight()
        sched.actions.append(prog.actions)
    return sched


def _dualpipe_steps(prog: _Program, ranks: int, rank: int, microbatches: int, last: bool) -> None:
    """DeepSeek's 8-step per-rank program in phase terms (phase 0: the near chunk).

    ``ranks``/``rank``/``microbatches`` are DualPipeV's; DualPipe passes its half-ranks
    and half the micro-batches. ``last`` marks the turning rank (DualPipeV's last rank,
    DualPipe's middle ranks), whose first main-loop pair is run unpaired to shorten the
    bubble.
    """
    for _ in range((ranks - rank - 1) * 2):  # 1: nF0
        prog.forward(0)
    for _ in range(rank + 1):  # 2: nF0F1
        prog.forward(0)
        prog.forward(1)
    for _ in range(ranks - rank - 1):  # 3: nB1W1F1, zero bubble
        prog.backward(1, zero_bubble=True)
        prog.weight()
        prog.forward(1)
    for i in range(microbatches - ranks * 2 + rank + 1):  # 4: main loop nF0B1F1B0
        if i == 0 and last:
            prog.forward(0)
            prog.backward(1, zero_bubble=False)
        else:
            prog.forward_backward(0, 1)
        prog.forward_backward(1, 0)
    for _ in range(ranks - rank - 1):  # 5: nB1F1B0
        prog.backward(1, zero_bubble=False)
        prog.forward_backward(1, 0)
    zero_bubble = False  # 6: nB1B0, the second half defers W
    steps = rank + 1
    for i in range(steps):
        if i == steps // 2 and rank % 2 == 1:
            zero_bubble = True
        prog.backward(1, zero_bubble)
        if i == steps // 2 and rank % 2 == 0:
            zero_bubble = True
        prog.backward(0, zero_bubble)
    for _ in range(ranks - rank - 1):  # 7: nWB0, zero bubble
        prog.weight()
        prog.backward(0, zero_bubble=True)
    while prog.w_queue:  # 8: nW
        prog.weight()


def dualpipe(ranks: int, microbatches: int) -> Schedule:
    """Bidirectional DualPipe: rank i holds stage i of direction 0 and stage P-1-i of
    direction 1; micro-batches 0..M/2-1 enter at rank 0, M/2..M-1 at rank P-1."""
    check_schedule_args("dualpipe", ranks, microbatches)
    half_mb, half_ranks = microbatches // 2, ranks // 2
    paths = [[(s, 0) for s in range(ranks)], [(ranks - 1 - s, 1) for s in range(ranks)]]
    sched = Schedule("dualpipe", ranks, microbatches, ranks, paths, [0] * half_mb + [1] * half_mb, [], True)
    for r in range(ranks):
        second_half = r >= half_ranks
        h = ranks - 1 - r if second_half else r
        loc = {0: (0, r, 0), 1: (1, ranks - 1 - r, half_mb)}  # by direction
        if second_half:
            loc = {0: loc[1], 1: loc[0]}  # this rank's near phase is the reverse direction
        prog = _Program(r, loc)
        _dualpipe_steps(prog, half_ranks, h, half_mb, last=h == half_ranks - 1)
        sched.actions.append(prog.actions)
    return sched


def dualpipev(ranks: int, microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half"): 2P stages in a V, rank r holds stages r and 2P-1-r;
    every micro-batch enters and leaves at rank 0."""
    check_schedule_args("dualpipev", ranks, microbatches)
    path = [(s, 0) for s in range(ranks)] + [(ranks - 1 - k, 1) for k in range(ranks)]
    sched = Schedule("dualpipev", ranks, microbatches, 2 * ranks, [path], [0] * microbatches, [], True)
    for r in range(ranks):
        prog = _Program(r, {0: (0, r, 0), 1: (1, 2 * ranks - 1 - r, 0)})
        _dualpipe_steps(prog, ranks, r, microbatches, last=r == ranks - 1)
        sched.actions.append(prog.actions)
    return sched


SCHEDULES: dict[str, Builder] = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}
DISPLAY_NAMES = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}


def build_schedule(name: str, ranks: int, microbatches: int) -> Schedule:
    """Build a registered schedule (``1f1b``, ``zb1p``, ``dualpipe``, ``dualpipev``)."""
    return SCHEDULES[_known(name)](ranks, microbatches)


def _single_path_schedule(name: str, ranks: int, microbatches: int, split_backward: bool) -> Schedule:
    return Schedule(name, ranks, microbatches, ranks, [[(s, 0) for s in range(ranks)]], [0] * microbatches, [], split_backward)


def check_schedule_args(name: str, ranks: int, microbatches: int) -> None:
    """Raise :class:`ScheduleError` (with ``field``) if schedule ``name`` cannot take this size.

    The one home of the per-schedule rules: the builders call it, and a config calls it for
    the schedule it names only (a sweep checks each schedule it is asked for).
    DualPipe: an even number of ranks and an even count >= 2 * ranks, half entering from
    each end. DualPipeV: any count >= 2 * ranks (DeepSeek's ``dualpipev.py`` and torch's
    ``ScheduleDualPipeV`` take odd counts too: all micro-batches enter at rank 0).
    """
    key = _known(name)
    shown = DISPLAY_NAMES[key]
    if ranks < 1:
        raise ScheduleError(f"{shown} needs at least 1 rank, got {ranks}", "ranks")
    if key == "dualpipe" and ranks % 2:
        raise ScheduleError(
            f"DualPipe needs an even number of ranks, got {ranks}; use 1F1B, ZB1P or DualPipeV, or {ranks + 1} ranks",
            "ranks",
        )
    if key in ("dualpipe", "dualpipev"):
        need = 2 * ranks
        even = key == "dualpipe"
        if microbatches < need or (even and microbatches % 2):
            nearest = max(need, microbatches + microbatches % 2 if even else microbatches)
            rule = "an even number of micro-batches" if even else "a micro-batch count"
            raise ScheduleError(
                f"{shown} needs {rule} >= 2*ranks={need}, got {microbatches}; use microbatches={nearest}",
                "microbatches",
            )
    elif microbatches < 1:
        raise ScheduleError(
            f"{shown} needs at least 1 micro-batch, got {microbatches}; use microbatches>={ranks}", "microbatches"
        )


def stage_count(name: str, ranks: int) -> int:
    """Model stages a micro-batch passes through: 2 x ranks for DualPipeV's V, else ranks."""
    return 2 * ranks if _known(name) == "dualpipev" else ranks


def compute_halves(name: str, ranks: int, microbatches: int) -> int:
    """Compute halves (F, B and W; an F&B pair counts two) the schedule will hold, before
    building it: an F and a B per stage and micro-batch, and ZB1P's W for each of them.
    DualPipe(V)'s few W's (O(ranks^2), not growing with the micro-batches) are left out."""
    return stage_count(name, ranks) * microbatches * (3 if _known(name) == "zb1p" else 2)


def _known(name: str) -> str:
    """The registry key of ``name`` (``DualPipe-V`` -> ``dualpipev``); unknown names are refused."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; use one of {sorted(SCHEDULES)}")
    return key
