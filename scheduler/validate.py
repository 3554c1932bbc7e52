"""Prove a schedule sound before anything runs (docs/DESIGN.md §5).

Checks, each failing with a :class:`ScheduleError` that names the offending action:
every action sits where the paths put it; each micro-batch gets exactly one F and one B
per stage and at most one W; on its rank every F precedes its B and every B its W; with
explicit transfers, every send has its receive and every cross-rank input is received
before use; and executing all ranks with blocking receives and buffered sends finishes
(no rank waits on itself, no cycle of ranks waiting on each other).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .ir import COMM_KINDS, COMPUTE_KINDS, STAGE_STEP, Action, Schedule, ScheduleError


@dataclass
class ValidationReport:
    ranks: int
    actions: int
    peak_inflight: list[int]  # per rank: micro-batch chunks whose F ran and B has not


def validate(sched: Schedule) -> ValidationReport:
    """Raise :class:`ScheduleError` if ``sched`` is unsound; else report peak in-flight activations."""
    if len(sched.actions) != sched.ranks:
        raise ScheduleError(f"{sched.name}: {len(sched.actions)} action lists for {sched.ranks} ranks")
    if len(sched.directions) != sched.microbatches:
        raise ScheduleError(f"{sched.name}: {len(sched.directions)} directions for {sched.microbatches} micro-batches")
    _check_placement(sched)
    _check_counts_and_order(sched)
    explicit = sched.has_transfers()
    if explicit:
        _check_matching(sched)
    _execute(sched, explicit)
    return ValidationReport(sched.ranks, sum(len(a) for a in sched.actions), sched.peak_inflight()[1])


def _check_placement(sched: Schedule) -> None:
    for rank, acts in enumerate(sched.actions):
        for action in acts:
            for half in action.halves():
                if half.rank != rank:
                    raise ScheduleError(f"{action} is in rank {rank}'s list but names rank {half.rank}")
                if not 0 <= half.microbatch < sched.microbatches or not 0 <= half.stage < sched.num_stages:
                    raise ScheduleError(f"{action}: micro-batch or stage out of range")
                if sched.location(half.microbatch, half.stage) != (half.rank, half.chunk):
                    where = sched.location(half.microbatch, half.stage)
                    raise ScheduleError(f"{action}: stage {half.stage} of micro-batch {half.microbatch} runs on rank {where[0]} chunk {where[1]}")
            if action.kind in COMM_KINDS and (action.peer is None or action.peer == rank):
                raise ScheduleError(f"{action}: a transfer needs a peer other than its own rank")


def _check_counts_and_order(sched: Schedule) -> None:
    for rank, acts in enumerate(sched.actions):
        done: dict[tuple[str, int, int], int] = {}
        for idx, action in enumerate(acts):
            if action.kind not in COMPUTE_KINDS:
                continue
            for half in action.halves():
                key = (half.kind, half.stage, half.microbatch)
                if key in done:
                    raise ScheduleError(f"{half} runs twice on rank {rank} (actions {done[key]} and {idx})")
                if half.kind == "B" and ("F", half.stage, half.microbatch) not in done:
                    raise ScheduleError(f"{half} comes before its F on rank {rank}")
                if half.kind == "W" and ("B", half.stage, half.microbatch) not in done:
                    raise ScheduleError(f"{half} comes before its B on rank {rank}")
                done[key] = idx
    counts = Counter((h.kind, h.stage, h.microbatch) for a in sched if a.kind in COMPUTE_KINDS for h in a.halves())
    for mb in range(sched.microbatches):
        for s in range(sched.num_stages):
            for kind in ("F", "B"):
                if counts[(kind, s, mb)] != 1:
                    r, c = sched.location(mb, s)
                    raise ScheduleError(f"{kind}{mb}.s{s}.c{c}@r{r} is missing from the schedule")


def _check_matching(sched: Schedule) -> None:
    sends: Counter = Counter()
    recvs: Counter = Counter()
    by_key: dict[tuple, Action] = {}
    for action in sched:
        if action.kind in COMM_KINDS:
            message = sched.transfer_message(action)
            key = (message.key, message.src, message.dst)
            (sends if action.kind.startswith("SEND") else recvs)[key] += 1
            by_key[key] = action
    for key in sends.keys() | recvs.keys():
        if sends[key] != recvs[key]:
            action = by_key[key]
            if action.kind.startswith("SEND"):
                raise ScheduleError(f"{action} has no matching RECV_{action.kind[-1]} on rank {action.peer}")
            raise ScheduleError(f"{action} has no matching send on rank {action.peer}")


def _needs(sched: Schedule, action: Action, explicit: bool) -> list[tuple]:
    """Tokens an action waits for: ("done", kind, stage, mb) are produced by compute halves,
    ("sent", *message key) by SEND actions, ("recv", *message key) by RECV actions."""
    if action.kind in COMM_KINDS:
        message = sched.transfer_message(action)
        return [("done", *message.key)] if action.kind.startswith("SEND") else [("sent", *message.key)]
    needs = []
    for half in action.halves():
        needs.extend(("done", *need) for need in sched.local_prerequisites(half))
        message = sched.message_in(half)
        if message is not None:
            # With explicit transfers a remote input is usable once its RECV has run.
            needs.append(("recv" if explicit and message.remote else "done", *message.key))
    return needs


def _produces(sched: Schedule, action: Action) -> list[tuple]:
    if action.kind in COMM_KINDS:
        what = "sent" if action.kind.startswith("SEND") else "recv"
        return [(what, *sched.transfer_message(action).key)]
    return [("done", h.kind, h.stage, h.microbatch) for h in action.halves()]


def _execute(sched: Schedule, explicit: bool) -> None:
    """Run every rank's list with blocking waits; fail on a rank that can never proceed."""
    programs = [[(a, _needs(sched, a, explicit)) for a in acts] for acts in sched.actions]
    producer_rank = {tok: r for r, acts in enumerate(sched.actions) for a in acts for tok in _produces(sched, a)}
    have: set[tuple] = set()
    ptr = [0] * sched.ranks
    waiting: dict[tuple, list[int]] = {}
    runnable = list(range(sched.ranks))
    blocked_on: dict[int, tuple] = {}
    while runnable:
        r = runnable.pop()
        prog, i = programs[r], ptr[r]
        while i < len(prog):
            action, needs = prog[i]
            missing = next((tok for tok in needs if tok not in have), None)
            if missing is not None:
                if producer_rank.get(missing) == r:
                    raise ScheduleError(f"{action} waits on itself: rank {r} produces {_name(missing)} only later")
                if missing not in producer_rank:
                    what = "a receive" if missing[0] == "recv" else "a send" if missing[0] == "sent" else "an action"
                    raise ScheduleError(f"{action} waits for {_name(missing)}, which no rank produces (missing {what})")
                waiting.setdefault(missing, []).append(r)
                blocked_on[r] = missing
                break
            blocked_on.pop(r, None)
            for tok in _produces(sched, action):
                have.add(tok)
                runnable.extend(waiting.pop(tok, ()))
            i += 1
        ptr[r] = i
    stuck = [r for r in range(sched.ranks) if ptr[r] < len(programs[r])]
    if stuck:
        parts = [
            f"rank {r} at {programs[r][ptr[r]][0]} waits for {_name(blocked_on[r])} from rank {producer_rank[blocked_on[r]]}"
            for r in stuck
        ]
        raise ScheduleError("deadlock under blocking receives: " + "; ".join(parts[:6]))


def _name(token: tuple) -> str:
    what, kind, stage, mb = token
    # A RECV is named, as in the IR, by the stage on its own (the consumer's) rank.
    label = {"done": f"{kind}{mb}.s{stage}", "sent": f"SEND_{kind}{mb}.s{stage}",
             "recv": f"RECV_{kind}{mb}.s{stage + STAGE_STEP[kind]}"}
    return label[what]

