"""The schedule IR: per-rank ordered action lists, plain data shared by the validator,
the simulator, the trace exporter and the runtime (docs/DESIGN.md §5 and §8).

Vocabulary:
    stage       position of a model chunk along a micro-batch's path, 0 .. num_stages-1;
                model stage s is the s-th of ``num_stages`` contiguous layer slices.
    chunk       which of a rank's (at most two) model chunks an action runs on.
    path        the (rank, chunk) locations a micro-batch visits, in stage order.
                1F1B/ZB1P: one path [(0,0), (1,0), ...]; DualPipeV: one V-shaped path
                [(0,0) .. (P-1,0), (P-1,1) .. (0,1)]; DualPipe: two paths, one per
                direction, [(0,0) .. (P-1,0)] and [(P-1,1) .. (0,1)].
    microbatch  global id 0 .. M-1; ``direction_of`` says which path it takes.

Action kinds:
    F       forward of (stage, microbatch)
    B       backward for input gradients (the weight gradients are queued when the
            schedule has W actions, computed in place otherwise)
    W       weight gradients of (stage, microbatch), deferred (zero-bubble split)
    FB      an overlapped pair issued together: the F half is the action's own
            stage/chunk/microbatch, the B half is ``pair``
    SEND_F / RECV_F / SEND_B / RECV_B
            explicit transfers of activations (F) or their gradients (B) to/from ``peer``;
            inserted by :func:`scheduler.comms.add_comms` where the runtime needs them.
            Each names the stage *on its own rank*: SEND_F(s) carries F(s)'s output and
            matches RECV_F(s+1) on the peer; SEND_B(s) carries B(s)'s input gradient and
            matches RECV_B(s-1). Sends are buffered (non-blocking), receives block.

Messages: the one definition of what crosses between stages (used by ``add_comms``, the
validator, the simulator and the runtime's message plan). A message is keyed
``(kind, stage, microbatch)`` by the half that produces it: ``("F", s, mb)`` is F(s)'s output
activation, consumed by F(s+1); ``("B", s, mb)`` is B(s)'s input gradient, consumed by
B(s-1). :meth:`Schedule.message_in` / :meth:`Schedule.message_out` give a compute half's
message with both ranks (equal ranks: a local hand-off, as at DualPipeV's turn);
:meth:`Schedule.prerequisites` adds the same-stage dependencies (B after its F, W after its B);
:meth:`Schedule.transfer_message` reads a SEND_*/RECV_* action, :meth:`Schedule.send_action` /
:meth:`Schedule.recv_action` write them.

Full or split backward: a B whose (stage, microbatch) has a W action anywhere in the
schedule queues its weight gradients for that W; a B without one computes them in place
(a "full" backward, DeepSeek's ``enable_zb=False``). :meth:`Schedule.deferred_weights`
lists the former. DualPipe(V) mixes both kinds in one step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, NamedTuple

ActionKind = Literal["F", "B", "W", "FB", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
COMPUTE_KINDS = ("F", "B", "W", "FB")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")

Location = tuple[int, int]  # (rank, chunk)
MessageKey = tuple[str, int, int]  # (kind "F"/"B" of the producing half, its stage, microbatch)

# Which way each message kind travels along a path: F(s) feeds F(s+1), B(s) feeds B(s-1).
STAGE_STEP = {"F": 1, "B": -1}


class ScheduleError(ValueError):
    """A schedule is invalid or cannot be built; the message names the rule or the action.

    ``field`` names the argument a builder refused (``"ranks"`` or ``"microbatches"``), so a
    config can point at its own field; None when the fault is in the schedule itself.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    rank: int
    stage: int
    chunk: int
    microbatch: int
    peer: int | None = None  # SEND_*/RECV_*: the other rank
    pair: Action | None = None  # FB: the B half

    def __str__(self) -> str:
        if self.kind == "FB":
            assert self.pair is not None
            return f"F{self.microbatch}.s{self.stage}.c{self.chunk}&B{self.pair.microbatch}.s{self.pair.stage}.c{self.pair.chunk}@r{self.rank}"
        peer = f"->r{self.peer}" if self.kind.startswith("SEND") else f"<-r{self.peer}" if self.peer is not None else ""
        return f"{self.kind}{self.microbatch}.s{self.stage}.c{self.chunk}@r{self.rank}{peer}"

    @property
    def label(self) -> str:
        """Short trace name like ``F3.c1`` (``F3.c1&B0.c0`` for a pair)."""
        if self.kind == "FB":
            assert self.pair is not None
            return f"F{self.microbatch}.c{self.chunk}&B{self.pair.microbatch}.c{self.pair.chunk}"
        return f"{self.kind}{self.microbatch}.c{self.chunk}"

    def halves(self) -> tuple[Action, ...]:
        """The compute actions this one stands for: (F, B) for FB, else (self,)."""
        if self.kind != "FB":
            return (self,)
        # Built once per pair: the validator and simulator ask for the halves of every action
        # several times, and a frozen dataclass is slow to construct. Not a field: equality,
        # hashing and to_dict see only the fields.
        halves = self.__dict__.get("_halves")
        if halves is None:
            assert self.pair is not None
            halves = (Action("F", self.rank, self.stage, self.chunk, self.microbatch), self.pair)
            object.__setattr__(self, "_halves", halves)
        return halves

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "pair"}
        if self.pair is not None:
            d["pair"] = self.pair.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Action:
        pair = Action.from_dict(d["pair"]) if d.get("pair") else None
        return Action(d["kind"], d["rank"], d["stage"], d["chunk"], d["microbatch"], d.get("peer"), pair)


class Message(NamedTuple):
    """One tensor crossing between stages: produced by ``kind``(``stage``, ``microbatch``) on
    rank ``src``, consumed on rank ``dst`` by the same kind at stage ``stage + STAGE_STEP[kind]``.
    (A named tuple: the validator and simulator make one per action of a large schedule.)"""

    kind: str  # "F": an activation, "B": an input gradient
    stage: int
    microbatch: int
    src: int
    dst: int

    @property
    def key(self) -> MessageKey:
        return (self.kind, self.stage, self.microbatch)

    @property
    def remote(self) -> bool:
        return self.src != self.dst

    @property
    def consumer_stage(self) -> int:
        return self.stage + STAGE_STEP[self.kind]

    @property
    def label(self) -> str:
        return key_label(self.key)


def key_label(key: MessageKey) -> str:
    """Human name of a message, e.g. ``activation F3.s1`` (for transfer and error messages)."""
    kind, stage, mb = key
    return f"{'activation' if kind == 'F' else 'gradient'} {kind}{mb}.s{stage}"


@dataclass
class Schedule:
    """A whole pipeline step: ``actions[rank]`` is that rank's ordered list."""

    name: str
    ranks: int
    microbatches: int
    num_stages: int
    paths: list[list[Location]]  # paths[d][stage] = (rank, chunk)
    directions: list[int]  # directions[microbatch] = index into paths
    actions: list[list[Action]] = field(default_factory=list)
    split_backward: bool = False  # True when B computes input grads only and W actions follow

    def direction_of(self, microbatch: int) -> int:
        return self.directions[microbatch]

    def location(self, microbatch: int, stage: int) -> Location:
        """(rank, chunk) that runs ``stage`` of ``microbatch``."""
        return self.paths[self.directions[microbatch]][stage]

    def chunks_of(self, rank: int) -> dict[int, int]:
        """{chunk: model stage} held by ``rank`` (DualPipe rank i: {0: i, 1: P-1-i})."""
        held: dict[int, int] = {}
        for path in self.paths:
            for stage, (r, c) in enumerate(path):
                if r == rank:
                    held.setdefault(c, stage)
        return held

    def prerequisites(self, half: Action) -> list[tuple[str, int, int]]:
        """(kind, stage, microbatch) of the compute halves that must finish before ``half`` can
        run: those on its own rank (:meth:`local_prerequisites`), then its input message's producer."""
        needs = self.local_prerequisites(half)
        message = self.message_in(half)
        if message is not None:
            needs.append(message.key)
        return needs

    @staticmethod
    def local_prerequisites(half: Action) -> list[tuple[str, int, int]]:
        """The same-stage halves ``half`` needs, on its own rank by construction: B its F, W its B."""
        if half.kind == "B":
            return [("F", half.stage, half.microbatch)]
        if half.kind == "W":
            return [("B", half.stage, half.microbatch)]
        return []

    def message_in(self, half: Action) -> Message | None:
        """The message compute half F/B consumes (None: F of stage 0 reads data, B of the
        last stage starts from the loss, W consumes no message)."""
        step = STAGE_STEP.get(half.kind)
        if step is None:
            return None
        src_stage = half.stage - step
        if not 0 <= src_stage < self.num_stages:
            return None
        src = self.location(half.microbatch, src_stage)[0]
        return Message(half.kind, src_stage, half.microbatch, src, half.rank)

    def message_out(self, half: Action) -> Message | None:
        """The message compute half F/B produces (None: the last F outputs the loss, B of
        stage 0 has no input to send a gradient to)."""
        step = STAGE_STEP.get(half.kind)
        if step is None:
            return None
        dst_stage = half.stage + step
        if not 0 <= dst_stage < self.num_stages:
            return None
        dst = self.location(half.microbatch, dst_stage)[0]
        return Message(half.kind, half.stage, half.microbatch, half.rank, dst)

    def transfer_message(self, action: Action) -> Message:
        """The message a SEND_*/RECV_* action moves (each names the stage on its own rank)."""
        kind, peer = action.kind[-1], action.peer
        assert peer is not None, f"{action} names no peer"
        if action.kind.startswith("SEND"):
            return Message(kind, action.stage, action.microbatch, action.rank, peer)
        return Message(kind, action.stage - STAGE_STEP[kind], action.microbatch, peer, action.rank)

    def send_action(self, message: Message) -> Action:
        """The SEND_F/SEND_B action that moves ``message`` (on the producer's rank and chunk)."""
        chunk = self.location(message.microbatch, message.stage)[1]
        kind: ActionKind = "SEND_F" if message.kind == "F" else "SEND_B"
        return Action(kind, message.src, message.stage, chunk, message.microbatch, peer=message.dst)

    def recv_action(self, message: Message) -> Action:
        """The RECV_F/RECV_B action that takes ``message`` (named by the consumer's stage and chunk)."""
        stage = message.consumer_stage
        chunk = self.location(message.microbatch, stage)[1]
        kind: ActionKind = "RECV_F" if message.kind == "F" else "RECV_B"
        return Action(kind, message.dst, stage, chunk, message.microbatch, peer=message.src)

    def has_transfers(self) -> bool:
        """Whether the lists carry explicit SEND_*/RECV_* actions (``add_comms``)."""
        return any(a.kind in COMM_KINDS for a in self)

    def compute_halves(self, rank: int) -> list[Action]:
        """``rank``'s F/B/W halves in execution order (an FB pair is its F, then its B)."""
        return [h for a in self.actions[rank] if a.kind in COMPUTE_KINDS for h in a.halves()]

    def __iter__(self) -> Iterator[Action]:
        for rank_actions in self.actions:
            yield from rank_actions

    def deferred_weights(self) -> set[tuple[int, int]]:
        """{(stage, microbatch)} whose B defers its weight gradients to a W action."""
        return {(a.stage, a.microbatch) for a in self if a.kind == "W"}

    def peak_inflight(self, bytes_per_stage: list[float] | None = None) -> tuple[list[float], list[int]]:
        """Per rank, the peak activation bytes and the peak count of forwards awaiting their B,
        in program order: an F holds its stage's activations until its B ends (a pair's F
        allocates before its B frees). Without ``bytes_per_stage`` the bytes are all 0."""
        peak_bytes, peak_count = [], []
        for acts in self.actions:
            held = top = 0.0
            count = top_count = 0
            for action in acts:
                for half in action.halves():
                    size = bytes_per_stage[half.stage] if bytes_per_stage is not None else 0.0
                    if half.kind == "F":
                        held, count = held + size, count + 1
                        top, top_count = max(top, held), max(top_count, count)
                    elif half.kind == "B":
                        held, count = held - size, count - 1
            peak_bytes.append(top)
            peak_count.append(top_count)
        return peak_bytes, peak_count

    def compute_actions(self, rank: int) -> list[Action]:
        return [a for a in self.actions[rank] if a.kind in COMPUTE_KINDS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ranks": self.ranks,
            "microbatches": self.microbatches,
            "num_stages": self.num_stages,
            "paths": [[list(loc) for loc in p] for p in self.paths],
            "directions": list(self.directions),
            "split_backward": self.split_backward,
            "actions": [[a.to_dict() for a in acts] for acts in self.actions],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Schedule:
        return Schedule(
            name=d["name"],
            ranks=d["ranks"],
            microbatches=d["microbatches"],
            num_stages=d["num_stages"],
            paths=[[tuple(loc) for loc in p] for p in d["paths"]],
            directions=list(d["directions"]),
            split_backward=d.get("split_backward", False),
            actions=[[Action.from_dict(a) for a in acts] for acts in d["actions"]],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def format(self) -> str:
        """One line per rank, compute actions only: a quick look at the shape of the schedule."""
        lines = []
        for r, acts in enumerate(self.actions):
            lines.append(f"rank {r}: " + " ".join(a.label for a in acts if a.kind in COMPUTE_KINDS))
        return "\n".join(lines)
