"""Which tensors cross ranks, read off the schedule IR's message rule (no rule of its own).

A message is keyed ``(kind, stage, microbatch)`` by the half that produces it
(:class:`dualpipe_mhc.scheduler.ir.Message`): ``("F", s, mb)`` is F(s)'s output activation,
consumed by F(s+1, mb); ``("B", s, mb)`` is B(s)'s input gradient, consumed by B(s-1, mb).
``Schedule.message_in`` / ``message_out`` give both ranks; a message whose two ends are on
the same rank (DualPipeV's turn at the last rank) is a local hand-off. Every rank computes
the same plan, so the receiver knows the sender's issue order on each channel and posts its
receives in it (the transport matches messages per channel in order). With explicit SEND/RECV
actions (``scheduler.add_comms``) the sender's order is that of its SEND actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualpipe_mhc.scheduler.ir import Action, Message, MessageKey, Schedule, key_label

Key = MessageKey  # (kind "F"/"B", stage, microbatch) of the producing half

__all__ = ["Key", "MessagePlan", "build_plan", "key_label", "stage_holders"]


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


def build_plan(sched: Schedule, rank: int) -> MessagePlan:
    inputs: dict = {}
    outputs: dict = {}
    src_of: dict[Key, int] = {}
    dst_of: dict[Key, int] = {}
    for half in sched.compute_halves(rank):
        if half.kind == "W":
            continue
        slot = (half.kind, half.stage, half.microbatch)
        message: Message | None = sched.message_in(half)
        inputs[slot] = message.key if message is not None else None
        if message is not None:
            src_of[message.key] = message.src
        message = sched.message_out(half)
        outputs[slot] = message.key if message is not None else None
        if message is not None:
            dst_of[message.key] = message.dst
    channel_in: dict[int, list[Key]] = {}
    explicit = sched.has_transfers()
    for src in range(sched.ranks):
        if src == rank:
            continue
        if explicit:  # the sender issues in the order of its SEND actions
            for a in sched.actions[src]:
                if a.kind in ("SEND_F", "SEND_B") and a.peer == rank:
                    channel_in.setdefault(src, []).append(sched.transfer_message(a).key)
            continue
        for half in sched.compute_halves(src):
            message = sched.message_out(half)
            if message is not None and message.dst == rank:
                channel_in.setdefault(src, []).append(message.key)
    return MessagePlan(rank, inputs, outputs, src_of, dst_of, channel_in)


def stage_holders(sched: Schedule) -> dict[int, list[int]]:
    """Model stage -> ranks that hold a copy (two for DualPipe, whose gradients must be summed)."""
    holders: dict[int, set[int]] = {}
    for path in sched.paths:
        for stage, (r, _c) in enumerate(path):
            holders.setdefault(stage, set()).add(r)
    return {s: sorted(rs) for s, rs in sorted(holders.items())}
