"""Which tensors cross ranks, read off the schedule IR (no schedule logic of its own).

A message is keyed ``(kind, stage, microbatch)``: ``("F", s, mb)`` is the output
activation of F(s, mb), consumed by F(s+1, mb); ``("B", s, mb)`` is the input gradient
produced by B(s, mb), consumed by B(s-1, mb). The producer and consumer locations come
from ``Schedule.location``; a message whose two ends are on the same rank (DualPipeV's
turn at the last rank) is a local hand-off. Every rank computes the same plan, so the
receiver knows the sender's issue order on each channel and posts its receives in it
(the transport matches messages per channel in order). With explicit SEND/RECV actions
(``scheduler.add_comms``) the sender's order is that of its SEND actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualpipe_mhc.scheduler.ir import COMM_KINDS, Action, Schedule

Key = tuple[str, int, int]  # (kind "F"/"B", stage, microbatch)


def key_label(key: Key) -> str:
    kind, stage, mb = key
    return f"{'activation' if kind == 'F' else 'gradient'} {kind}{mb}.s{stage}"


@dataclass
class MessagePlan:
    """Per-rank view: what each compute half needs and produces, and channel orders."""

    rank: int
    inputs: dict[tuple[str, int, int], Key | None]  # (F/B, stage, mb) -> key it consumes (None: local data/loss)
    outputs: dict[tuple[str, int, int], Key | None]  # (F/B, stage, mb) -> key it produces (None: nothing)
    src_of: dict[Key, int]  # key consumed here -> producing rank
    dst_of: dict[Key, int]  # key produced here -> consuming rank
    channel_in: dict[int, list[Key]]  # src rank -> keys it sends here, in its issue order

    def remote_inputs(self, half: Action) -> list[Key]:
        key = self.inputs.get((half.kind, half.stage, half.microbatch))
        return [key] if key is not None and self.src_of[key] != self.rank else []


def _produces(sched: Schedule, half: Action) -> tuple[Key | None, int | None]:
    """The message a compute half produces and the rank that consumes it."""
    s, mb, last = half.stage, half.microbatch, sched.num_stages - 1
    if half.kind == "F" and s < last:
        return ("F", s, mb), sched.location(mb, s + 1)[0]
    if half.kind == "B" and s > 0:
        return ("B", s, mb), sched.location(mb, s - 1)[0]
    return None, None


def _consumes(sched: Schedule, half: Action) -> tuple[Key | None, int | None]:
    s, mb, last = half.stage, half.microbatch, sched.num_stages - 1
    if half.kind == "F" and s > 0:
        return ("F", s - 1, mb), sched.location(mb, s - 1)[0]
    if half.kind == "B" and s < last:
        return ("B", s + 1, mb), sched.location(mb, s + 1)[0]
    return None, None


def has_comms(sched: Schedule) -> bool:
    return any(a.kind in COMM_KINDS for a in sched)


def comm_key(action: Action) -> Key:
    """The message an explicit SEND_*/RECV_* action moves (the IR names the stage on its own rank)."""
    s, mb = action.stage, action.microbatch
    return {
        "SEND_F": ("F", s, mb),
        "RECV_F": ("F", s - 1, mb),
        "SEND_B": ("B", s, mb),
        "RECV_B": ("B", s + 1, mb),
    }[action.kind]


def compute_halves(actions: list[Action]) -> list[Action]:
    """F/B/W halves in execution order (an FB pair is its F then its B)."""
    return [h for a in actions if a.kind in ("F", "B", "W", "FB") for h in a.halves()]


def build_plan(sched: Schedule, rank: int) -> MessagePlan:
    inputs: dict = {}
    outputs: dict = {}
    src_of: dict[Key, int] = {}
    dst_of: dict[Key, int] = {}
    for half in compute_halves(sched.actions[rank]):
        if half.kind == "W":
            continue
        slot = (half.kind, half.stage, half.microbatch)
        key, src = _consumes(sched, half)
        inputs[slot] = key
        if key is not None:
            src_of[key] = src
        key, dst = _produces(sched, half)
        outputs[slot] = key
        if key is not None:
            dst_of[key] = dst
    channel_in: dict[int, list[Key]] = {}
    explicit = has_comms(sched)
    for src in range(sched.ranks):
        if src == rank:
            continue
        if explicit:  # the sender issues in the order of its SEND actions
            for a in sched.actions[src]:
                if a.kind in ("SEND_F", "SEND_B") and a.peer == rank:
                    channel_in.setdefault(src, []).append(comm_key(a))
            continue
        for half in compute_halves(sched.actions[src]):
            if half.kind == "W":
                continue
            key, dst = _produces(sched, half)
            if key is not None and dst == rank:
                channel_in.setdefault(src, []).append(key)
    return MessagePlan(rank, inputs, outputs, src_of, dst_of, channel_in)


def stage_holders(sched: Schedule) -> dict[int, list[int]]:
    """Model stage -> ranks that hold a copy (two for DualPipe, whose gradients must be summed)."""
    holders: dict[int, set[int]] = {}
    for path in sched.paths:
        for stage, (r, _c) in enumerate(path):
            holders.setdefault(stage, set()).add(r)
    return {s: sorted(rs) for s, rs in sorted(holders.items())}
