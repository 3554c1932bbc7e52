"""Make a schedule's transfers explicit: SEND_F/RECV_F/SEND_B/RECV_B actions.

Where consecutive stages of a micro-batch's path sit on different ranks, the producer
gets a SEND right after the compute action that makes the tensor and the consumer a
RECV right before the action that needs it (for an F&B pair: both receives before the
pair, both sends after it, as DeepSeek's reference posts them). With buffered sends and
blocking receives this adds no waits the compute dependencies did not already have, so a
valid compute schedule stays deadlock-free; :func:`scheduler.validate.validate` checks it.
Which messages exist and where they go is the IR's rule (:meth:`Schedule.message_in` /
:meth:`Schedule.message_out`); this module only places the transfers.
"""

from __future__ import annotations

from .ir import COMM_KINDS, Action, Schedule


def add_comms(sched: Schedule) -> Schedule:
    """A copy of ``sched`` with explicit transfer actions (existing ones are replaced)."""
    out: list[list[Action]] = []
    for acts in sched.actions:
        seq: list[Action] = []
        for action in acts:
            if action.kind in COMM_KINDS:
                continue
            halves = action.halves()
            incoming = [m for h in halves if (m := sched.message_in(h)) is not None and m.remote]
            outgoing = [m for h in halves if (m := sched.message_out(h)) is not None and m.remote]
            seq.extend(sched.recv_action(m) for m in incoming)
            seq.append(action)
            seq.extend(sched.send_action(m) for m in outgoing)
        out.append(seq)
    return Schedule(
        sched.name, sched.ranks, sched.microbatches, sched.num_stages,
        [list(p) for p in sched.paths], list(sched.directions), out, sched.split_backward,
    )

