"""Execute one rank's action list for one pipeline step, exactly as the schedule gives it.

    F   forward of (stage, microbatch) on its chunk; the output goes to the next stage
    B   backward for the input gradient; if the schedule has a W for (stage, mb) the
        weight gradients are left for it (:class:`WeightGradStore`), else computed here
    W   the deferred weight gradients of (stage, microbatch)
    FB  an overlapped pair: both inputs are awaited, then the F half and the B half run
        back to back on the compute stream (no split ``overlapped_forward_backward``
        implementation exists for the mHC blocks, so the simulator's F&B = F + B holds,
        fb_overlap ~ 1). Only the communication overlaps: the pair's receives were posted
        ahead and its sends leave asynchronously (after the pair with ``add_comms``'s
        SEND placement, as DeepSeek's reference does; right after the F half without
        explicit SENDs) while the next actions compute.

Transfers: with explicit SEND_*/RECV_* actions (``scheduler.add_comms``) a send is
issued at its SEND action and a receive is posted no later than its RECV action; without
them a send leaves right after the half that produced it. Receives are posted ahead
(``recv_ahead`` actions; all of the step's on the CPU) in each sender's order, which
changes no dependency, only lets the transfer start early. Sends are waited at the end
of the step. Every wait is bounded by the run's timeout and names
the rank and the action.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dualpipe_mhc.scheduler.ir import Action, Schedule

from .plan import Key, MessagePlan, build_plan, key_label
from .split_backward import backward_input, backward_weight
from .timing import StepClock
from .transport import RecvHandle, SendHandle, TransferError, TransferTimeout, Transport


class RankError(RuntimeError):
    """An action failed on a rank; the message names the rank, the step and the action."""


class WeightGradStore:
    """Weight-gradient work deferred by a split B, popped by the W that names it.

    B runs :func:`~.split_backward.backward_input` (input gradients only; the weight-gradient GEMMs are
    skipped by autograd) and keeps the autograd intermediates that lead to the weights;
    W runs :func:`~.split_backward.backward_weight` from them. Same role as DeepSeek's WeightGradStore,
    keyed by (chunk, microbatch) because the IR names which W pops which B.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, int], Any] = {}

    def put(self, chunk: int, mb: int, groups: Any) -> None:
        self._groups[(chunk, mb)] = groups

    def pop(self, chunk: int, mb: int) -> Any:
        return self._groups.pop((chunk, mb))

    def __len__(self) -> int:
        return len(self._groups)


@dataclass
class StepRecord:
    """What one rank measured in one step (seconds since the rank's step start)."""

    losses: dict[int, float] = field(default_factory=dict)  # microbatch -> loss (ranks holding the last stage)
    actions: list[dict[str, Any]] = field(default_factory=list)  # one per compute action
    step_time: float = 0.0


class StepExecutor:
    def __init__(
        self,
        rank: int,
        sched: Schedule,
        chunks: dict[int, torch.nn.Module],
        transport: Transport | None,
        act_shape: tuple[int, ...],
        act_dtype: torch.dtype,
        device: torch.device,
        recv_ahead: int,
    ) -> None:
        self.rank = rank
        self.sched = sched
        self.chunks = chunks
        self.stage_of = sched.chunks_of(rank)  # chunk -> model stage
        self.transport = transport
        self.act_shape = act_shape
        self.act_dtype = act_dtype
        self.device = device
        self.recv_ahead = recv_ahead
        self.plan: MessagePlan = build_plan(sched, rank)
        self.deferred = sched.deferred_weights()
        self.actions = list(sched.actions[rank])
        self.explicit_comms = sched.has_transfers()
        self.clock = StepClock(device)
        self.fault: tuple[int, int, str] | None = None  # (step, action index, mode): tests inject failures
        self.current: tuple[int, str] = (-1, "idle")  # read by the actor's status() from another thread
        self._channel_pos = {src: 0 for src in self.plan.channel_in}
        self._key_pos = {k: (src, i) for src, keys in self.plan.channel_in.items() for i, k in enumerate(keys)}
        self._embed_out: torch.Tensor | None = None
        self._embed_leaf: torch.Tensor | None = None
        for chunk in chunks.values():
            if getattr(chunk, "embed", None) is not None:
                chunk.embed.register_forward_hook(self._cut_after_embed)

    def _cut_after_embed(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
        # The first stage has no differentiable input, so the split backward gets one: the
        # rest of the chunk runs on a leaf copy of the embedding output, and the embedding's
        # own (weight-only) backward runs from the leaf's gradient in W.
        self._embed_out = output
        self._embed_leaf = output.detach().requires_grad_()
        return self._embed_leaf

    def run(self, step: int, data: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> StepRecord:
        """Run the whole action list once. ``data[mb] = (tokens, targets)`` on this device."""
        self.step = step
        self.data = data
        self.scale = 1.0 / self.sched.microbatches  # total loss = mean of micro-batch losses
        # (chunk, mb) -> (differentiable input, output, embedding output on the first stage)
        self.saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.local: dict[Key, torch.Tensor] = {}
        self.posted: dict[Key, RecvHandle] = {}
        self.sends: list[SendHandle] = []
        self.parked: dict[Key, torch.Tensor] = {}  # outputs waiting for their SEND action
        self.wstore = WeightGradStore()
        self._channel_pos = {src: 0 for src in self.plan.channel_in}
        rec = StepRecord()
        self.clock.reset()
        t_start = self.clock.stamp()
        stamps: list[tuple[Action, int, int, list[int]]] = []
        for i, action in enumerate(self.actions):
            self.current = (i, str(action))
            try:
                self._maybe_fault(i)
                self._post_receives(i)
                if action.kind in ("SEND_F", "SEND_B"):
                    key = self.sched.transfer_message(action).key
                    self.sends.append(self.transport.isend(self.parked.pop(key), action.peer, key_label(key)))
                    continue
                if action.kind in ("RECV_F", "RECV_B"):
                    continue  # posted by _post_receives; waited where the compute needs it
                t_a = self.clock.stamp()
                halves = action.halves()
                inputs = [self._input(h, action) for h in halves]
                t_b = self.clock.stamp()
                ends = []
                for half, x in zip(halves, inputs):
                    self._run_half(half, x, rec)
                    ends.append(self.clock.stamp())
                stamps.append((action, t_a, t_b, ends))
            except (RankError, TransferError):
                raise
            except Exception as exc:
                raise RankError(f"rank {self.rank} failed in step {step} at action {i} {action}: {type(exc).__name__}: {exc}") from exc
        self.current = (len(self.actions), "end of step")
        for handle in self.sends:
            self.transport.wait_send(handle, f"end of step {step}")
        self._wait_device(step, stamps)
        times = self.clock.resolve()
        for action, t_a, t_b, ends in stamps:
            halves = action.halves()
            half_times, prev = [], times[t_b]
            for e in ends:
                half_times.append(times[e] - prev)
                prev = times[e]
            rec.actions.append(
                {
                    "action": action.to_dict(),
                    "label": action.label,
                    "kind": action.kind,
                    "wait_start": times[t_a] - times[t_start],
                    "start": times[t_b] - times[t_start],
                    "end": times[ends[-1]] - times[t_start],
                    "halves": [
                        {"kind": h.kind, "stage": h.stage, "microbatch": h.microbatch, "chunk": h.chunk,
                         "full": h.kind == "B" and (h.stage, h.microbatch) not in self.deferred, "seconds": d}
                        for h, d in zip(halves, half_times)
                    ],
                }
            )
        rec.step_time = max((a["end"] for a in rec.actions), default=0.0)
        rec.losses = {mb: float(v) for mb, v in rec.losses.items()}
        if len(self.wstore):
            raise RankError(f"rank {self.rank}: {len(self.wstore)} deferred weight gradients were never run by a W")
        self.current = (-1, "idle")
        return rec

    def _maybe_fault(self, i: int) -> None:
        if self.fault is None or self.fault[0] != self.step or self.fault[1] != i:
            return
        mode = self.fault[2]
        if mode == "exit":
            time.sleep(0.2)  # dies a moment into the action, as a crash in a kernel would
            os._exit(17)
        if mode == "raise":
            raise RuntimeError("injected failure")
        if mode == "hang":
            time.sleep(3600)
        if mode == "drop_sends":
            self.transport = _DroppingTransport(self.transport)

    def _post_receives(self, i: int) -> None:
        """Post receives for the inputs of actions i .. i+recv_ahead, in each sender's order."""
        if self.transport is None:
            return
        for action in self.actions[i : i + 1 + self.recv_ahead]:
            if action.kind in ("RECV_F", "RECV_B"):
                wanted = [self.sched.transfer_message(action).key]
            elif action.kind in ("F", "B", "FB"):
                wanted = [k for half in action.halves() for k in self.plan.remote_inputs(half)]
            else:
                continue
            for key in wanted:
                src, idx = self._key_pos[key]
                keys = self.plan.channel_in[src]
                while self._channel_pos[src] <= idx:  # earlier messages of the channel first
                    k = keys[self._channel_pos[src]]
                    self.posted[k] = self.transport.irecv(self.act_shape, self.act_dtype, src, key_label(k))
                    self._channel_pos[src] += 1

    def _input(self, half: Action, action: Action) -> torch.Tensor | None:
        if half.kind == "W":
            return None
        key = self.plan.inputs.get((half.kind, half.stage, half.microbatch))
        if key is None:
            return None
        if key in self.local:
            return self.local.pop(key)
        if key not in self.posted:
            self._post_receives(self.actions.index(action))
        if key not in self.posted:
            raise RankError(f"rank {self.rank}: {key_label(key)} needed by {action} was never received")
        return self.transport.wait_recv(self.posted.pop(key), f"needed by {action}")

    def _deliver(self, key: Key | None, tensor: torch.Tensor) -> None:
        if key is None:
            return
        dst = self.plan.dst_of[key]
        if dst == self.rank:
            self.local[key] = tensor.detach()
        elif self.explicit_comms:
            self.parked[key] = tensor.detach()
        else:
            self.sends.append(self.transport.isend(tensor.detach(), dst, key_label(key)))

    def _run_half(self, half: Action, x: torch.Tensor | None, rec: StepRecord) -> None:
        chunk = self.chunks[half.chunk]
        s, mb = half.stage, half.microbatch
        slot = (half.kind, s, mb)
        if half.kind == "F":
            tokens, targets = self.data[mb]
            if chunk.is_first:
                x_in: torch.Tensor = tokens
            else:
                x_in = x.detach().requires_grad_()
            self._embed_out = self._embed_leaf = None
            out = chunk(x_in, targets if chunk.is_last else None)
            if chunk.is_first:
                self.saved[(half.chunk, mb)] = (self._embed_leaf, out, self._embed_out)
            else:
                self.saved[(half.chunk, mb)] = (x_in, out, None)
            if chunk.is_last:
                rec.losses[mb] = out.detach()
            self._deliver(self.plan.outputs.get(slot), out)
        elif half.kind == "B":
            x_in, out, embed_out = self.saved.pop((half.chunk, mb))
            grad = torch.full_like(out, self.scale) if chunk.is_last else x
            if (s, mb) in self.deferred:
                dinputs, groups = backward_input([out], [grad], [x_in], chunk.parameters())
                self.wstore.put(half.chunk, mb, (groups, embed_out, dinputs[0]))
                dx = dinputs[0]
            else:
                torch.autograd.backward([out], [grad])
                dx = x_in.grad
                if embed_out is not None:
                    torch.autograd.backward([embed_out], [dx])
            if not chunk.is_first:
                self._deliver(self.plan.outputs.get(slot), dx)
        else:
            groups, embed_out, d_embed = self.wstore.pop(half.chunk, mb)
            backward_weight(chunk.parameters(), groups)
            if embed_out is not None:
                torch.autograd.backward([embed_out], [d_embed])

    def _wait_device(self, step: int, stamps: list) -> None:
        """On CUDA, wait (bounded) for the step's last event; name the action still running."""
        if not self.clock.cuda:
            return
        deadline = time.monotonic() + self.transport.timeout_s if self.transport else float("inf")
        while (idx := self.clock.pending()) is not None:
            if time.monotonic() > deadline:
                stuck = next((a for a, t_a, t_b, ends in stamps if ends[-1] >= idx), None)
                raise TransferTimeout(f"rank {self.rank}: step {step} did not finish on the GPU; stuck at {stuck}")
            time.sleep(0.0005)


class _DroppingTransport:
    """Fault injection: swallows every send from here on, so a peer's receive never completes."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def isend(self, tensor: torch.Tensor, dst: int, what: str) -> SendHandle:
        return SendHandle(tensor, dst, what)
