"""Make a schedule's transfers explicit: SEND_F/RECV_F/SEND_B/RECV_B actions.

Where consecutive stages of a micro-batch's path sit on different ranks, the producer
gets a SEND right after the compute action that makes the tensor and the consumer a
RECV right before the action that needs it (for an F&B pair: both receives before the
pair, both sends after it, as DeepSeek's reference posts them). With buffered sends and
blocking receives this adds no waits the compute dependencies did not already have, so a
valid compute schedule stays deadlock-free; :func:`scheduler.validate.validate` checks it.
"""

from __future__ import annotations

from .ir import COMM_KINDS, Action, Schedule


def add_comms(sched: Schedule) -> Schedule:
    """A copy of ``sched`` with explicit transfer actions (existing ones are replaced)."""
    last = sched.num_stages - 1
    out: list[list[Action]] = []
    for rank, acts in enumerate(sched.actions):
        seq: list[Action] = []
        for action in acts:
            if action.kind in COMM_KINDS:
                continue
            recvs: list[Action] = []
            sends: list[Action] = []
            for half in action.halves():
                s, mb, c = half.stage, half.microbatch, half.chunk
                if half.kind == "F":
                    if s > 0 and (src := sched.location(mb, s - 1)[0]) != rank:
                        recvs.append(Action("RECV_F", rank, s, c, mb, peer=src))
                    if s < last and (dst := sched.location(mb, s + 1)[0]) != rank:
                        sends.append(Action("SEND_F", rank, s, c, mb, peer=dst))
                elif half.kind == "B":
                    if s < last and (src := sched.location(mb, s + 1)[0]) != rank:
                        recvs.append(Action("RECV_B", rank, s, c, mb, peer=src))
                    if s > 0 and (dst := sched.location(mb, s - 1)[0]) != rank:
                        sends.append(Action("SEND_B", rank, s, c, mb, peer=dst))
            seq.extend(recvs)
            seq.append(action)
            seq.extend(sends)
        out.append(seq)
    return Schedule(
        sched.name, sched.ranks, sched.microbatches, sched.num_stages,
        [list(p) for p in sched.paths], list(sched.directions), out, sched.split_backward,
    )


def has_comms(sched: Schedule) -> bool:
    return any(a.kind in COMM_KINDS for a in sched)
