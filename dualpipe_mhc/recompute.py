"""mHC recomputation in blocks of L_r layers (docs/DESIGN.md §4, the paper's §4.3).

What is kept and what is recomputed, per hyper-connected sublayer k of a block:

    kept        x_{l0} [T, n, C]        the block's input (one per block and stage)
                y_k    [T, C]           the sublayer output F(...), needed to rebuild x_{k+1}
                F's own internals       (attention scores, MLP hidden, ...): F is not recomputed
    recomputed  x_k    [T, n, C]        k > 0, re-derived as x_{k+1} = H_res x_k + H_post^T y_k
                u_k = H_pre x_k  [T, C], RMSNorm(u_k) [T, C]  (F's pre-norm, as the paper counts it)
                the mapping intermediates (projections, rstd, every Sinkhorn iterate)

How: the block's forward runs under ``saved_tensors_hooks``. Tensors that autograd
saves inside the mHC code (everything outside ``F`` except F's pre-norm) become
slots; tensors F saves that alias u_k or RMSNorm(u_k) become named handles. The
first unpack in the backward replays the block's mHC code once from x_{l0} and the
kept y_k (``F`` is stubbed to return y_k) and hands out the replayed tensors.
The autograd graph is the very graph of the forward and the replay runs the same
ops on the same values, so gradients are bitwise those without recomputation on a
deterministic backend; on the fused kernels they match to the kernels' determinism.

Each recomputed tensor is released as soon as autograd has unpacked it, so one
block's intermediates live at a time (docs/DESIGN.md's (n+2)·C·L_r term). A second pass
over a retained graph, such as the zero-bubble W after its B (torch's
``stage_backward_input`` / ``stage_backward_weight``), replays the block once more:
two replays per split B. ``replay_once=True`` keeps the replay until the graph is
freed instead: one replay, the chunk's recomputed blocks held from B to its W.

Blocks are global (``layer // L_r``) and cut at stage boundaries: each stage
keeps its own first input, so a block spanning two stages costs one extra kept
input (docs/DESIGN.md §4). Not thread-safe: one forward per module at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks


def check_block_layers(block_layers: int | None) -> int | None:
    """``None``/0 -> off; a positive int -> itself; anything else -> a one-line ValueError."""
    if block_layers is None or block_layers == 0:
        return None
    if isinstance(block_layers, bool) or not isinstance(block_layers, int) or block_layers < 1:
        raise ValueError(
            f"recompute block_layers={block_layers!r} is invalid: use a positive number of layers, or None to switch off"
        )
    return block_layers


def block_segments(first_layer: int, num_layers: int, block_layers: int) -> list[tuple[int, int]]:
    """Global blocks ``[b*L_r, (b+1)*L_r)`` intersected with ``[first_layer, first_layer+num_layers)``.

    Returned as ``[start, end)`` offsets into the chunk's own block list.
    """
    segments, start = [], first_layer
    end_all = first_layer + num_layers
    while start < end_all:
        end = min((start // block_layers + 1) * block_layers, end_all)
        segments.append((start - first_layer, end - first_layer))
        start = end
    return segments


def run_blocks(
    blocks: Sequence[nn.Module], x: Tensor, first_layer: int, block_layers: int | None, replay_once: bool = False
) -> Tensor:
    """Apply ``blocks`` (global layers ``first_layer ..``) to ``x [B, S, n, C]``, recomputing if asked.

    ``replay_once``: keep a block's recomputed tensors until its graph is freed instead of
    releasing each when unpacked, so a second backward pass (the zero-bubble W) does not
    replay again; costs holding the chunk's recomputed blocks from B to W.
    """
    if block_layers is None or not torch.is_grad_enabled():
        for block in blocks:
            x = block(x)
        return x
    for a, b in block_segments(first_layer, len(blocks), block_layers):
        x = _Segment(blocks[a:b], replay_once=replay_once).forward(x)
    return x


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(eq=False)
class _Slot:
    """A tensor saved inside the mHC code: the ``index``-th such save of the segment."""

    segment: _Segment
    index: int


@dataclass(eq=False)
class _Named:
    """A tensor saved by F that views a recomputable output (u_k or RMSNorm(u_k))."""

    segment: _Segment
    name: tuple[str, int]
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the output's own


@dataclass
class _Replay:
    slots: list[Tensor | None]
    named: dict[tuple[str, int], Tensor]


@dataclass(eq=False)
class _Segment:
    """One recompute block's slice on one stage."""

    blocks: Sequence[nn.Module]
    replay_once: bool = False
    x0: Tensor | None = None
    x0_requires_grad: bool = False
    ys: dict[int, Tensor] = field(default_factory=dict)  # sublayer k -> its kept output y_k
    y_requires_grad: dict[int, bool] = field(default_factory=dict)
    kept: set[int] = field(default_factory=set)
    named: dict[int, tuple[tuple[str, int], Tensor]] = field(default_factory=dict)
    regions: list[str] = field(default_factory=lambda: ["mhc"])
    num_slots: int = 0
    slot_meta: dict[int, tuple[torch.Size, torch.dtype]] = field(default_factory=dict)  # dropped slots only
    autocast: tuple[str, bool, torch.dtype] | None = None
    dropped: list[int] = field(default_factory=list)
    replay: _Replay | None = None
    meter: object | None = None
    replays: int = 0

    def hyper_connections(self) -> list[nn.Module]:
        return [hc for block in self.blocks for hc in (block.attn, block.mlp)]

    def forward(self, x: Tensor) -> Tensor:
        self.x0, self.x0_requires_grad = x.detach(), x.requires_grad
        device = x.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.kept.add(_storage_key(x))
        self.meter = _METER[-1] if _METER else None
        with self._regions(), saved_tensors_hooks(self._pack, _unpack):
            for block in self.blocks:
                x = block(x)
        # The named outputs were held only so their storages could not be reused while
        # their keys were live; from here on F's saves are all packed.
        self.named.clear()
        if self.meter is not None:
            self.meter.add_kept(self.x0)
        return x

    @contextlib.contextmanager
    def _regions(self) -> Iterator[None]:
        """Forward-only module hooks: F is its own region, F's pre-norm is mHC code again."""
        handles = []
        for k, hc in enumerate(self.hyper_connections()):
            sub = hc.sublayer
            handles.append(sub.register_forward_pre_hook(self._enter_f(k)))
            handles.append(sub.register_forward_hook(self._leave_f(k)))
            norm = getattr(sub, "norm", None)
            if isinstance(norm, nn.Module):
                handles.append(norm.register_forward_pre_hook(self._enter_norm))
                handles.append(norm.register_forward_hook(self._leave_norm(k)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _enter_f(self, k: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.regions.append("F")
            if args and isinstance(args[0], Tensor):
                self._name(args[0], ("u", k))

        return hook

    def _leave_f(self, k: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.regions.pop()
            self.ys[k] = out.detach()
            self.y_requires_grad[k] = out.requires_grad
            self.kept.add(_storage_key(out))

        return hook

    def _enter_norm(self, module: nn.Module, args: tuple) -> None:
        self.regions.append("mhc")

    def _leave_norm(self, k: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.regions.pop()
            self._name(out, ("nu", k))

        return hook

    def _name(self, t: Tensor, name: tuple[str, int]) -> None:
        key = _storage_key(t)
        if key not in self.kept:
            self.named[key] = (name, t)  # the reference keeps the key unique during the forward

    def _pack(self, t: Tensor) -> object:
        key = _storage_key(t)
        if self.regions[-1] == "F":
            entry = self.named.get(key) if key not in self.kept else None
            if entry is None:
                return self._keep(t)
            name, out = entry
            if self.meter is not None:
                self.meter.add_dropped(t)
            return _Named(self, name, t.size(), t.stride(), t.storage_offset() - out.storage_offset())
        index, self.num_slots = self.num_slots, self.num_slots + 1
        if key in self.kept or (t.is_leaf and t.requires_grad):
            return self._keep(t)
        self.dropped.append(index)
        self.slot_meta[index] = (t.shape, t.dtype)
        if self.meter is not None:
            self.meter.add_dropped(t)
        return _Slot(self, index)

    def _keep(self, t: Tensor) -> Tensor:
        if self.meter is not None:
            self.meter.add_kept(t)
        return t

    def _replayed(self) -> _Replay:
        if self.replay is None:
            self.replay = self._run_replay()
        return self.replay

    def _run_replay(self) -> _Replay:
        """Re-run the segment's mHC code from x_{l0}, with F stubbed to return the kept y_k."""
        self.replays += 1
        slots: list[Tensor | None] = []
        named: dict[tuple[str, int], Tensor] = {}

        def pack(t: Tensor) -> None:
            # With F stubbed to its pre-norm, everything the replay saves is mHC code.
            slots.append(t.detach())

        x = self.x0.detach().requires_grad_(self.x0_requires_grad)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            device, enabled, dtype = self.autocast
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))  # as in the forward
            stack.enter_context(saved_tensors_hooks(pack, _unpack))
            for k, hc in enumerate(self.hyper_connections()):
                y = self.ys[k].detach().requires_grad_(self.y_requires_grad[k])
                stack.enter_context(_stub_sublayer(hc.sublayer, y, k, named))
            for block in self.blocks:
                x = block(x)
        mismatch = len(slots) != self.num_slots or any(
            (slots[i].shape, slots[i].dtype) != meta for i, meta in self.slot_meta.items()
        )
        if mismatch:
            raise RuntimeError(
                f"recompute replay saved {len(slots)} tensors where the forward saved {self.num_slots}, or "
                "of other shapes: the block's mHC code must run the same ops in the backward as in the forward"
            )
        if self.meter is not None:
            self.meter.add_replay([slots[i] for i in self.dropped] + list(named.values()))
        return _Replay(slots, named)

    def unpack_slot(self, index: int) -> Tensor:
        if self.replay_once:
            return self._replayed().slots[index]
        if self._replayed().slots[index] is None:
            # A second backward over a retained graph (e.g. a separate weight-gradient
            # pass): what the first one consumed is gone, so replay once more.
            self.replay = None
        slots = self._replayed().slots
        t, slots[index] = slots[index], None  # free it once autograd has taken it
        return t

    def unpack_named(self, h: _Named) -> Tensor:
        out = self._replayed().named[h.name]
        return out.as_strided(h.size, h.stride, out.storage_offset() + h.offset)


def _unpack(packed: object) -> Tensor:
    if isinstance(packed, _Slot):
        return packed.segment.unpack_slot(packed.index)
    if isinstance(packed, _Named):
        return packed.segment.unpack_named(packed)
    return packed


@contextlib.contextmanager
def _stub_sublayer(sub: nn.Module, y: Tensor, k: int, named: dict) -> Iterator[None]:
    """Make ``sub(u)`` run only its pre-norm and return the kept ``y`` (shadowing ``forward``)."""
    norm = getattr(sub, "norm", None)

    def forward(u: Tensor, *args, **kwargs) -> Tensor:
        named[("u", k)] = u.detach()
        if isinstance(norm, nn.Module):
            named[("nu", k)] = norm(u).detach()
        return y

    sub.forward = forward
    try:
        yield
    finally:
        del sub.forward


_METER: list[SavedTensorMeter] = []


class SavedTensorMeter:
    """Counts the bytes autograd keeps for the backward, by unique storage: for tests and benchmarks.

    Inside ``with meter:`` every saved tensor outside a recompute segment is counted as
    kept; segments report what they keep, what they drop, and (in the backward) how
    much one replay materialises at once. Parameters are not activations and are skipped.
    A storage is classed by its size per token: ``n*C`` elements "streams", ``C`` "width",
    anything else "other". Dropped tensors are held by the meter so that their storage
    addresses stay unique while counting: measure, don't train, under a meter.
    """

    def __init__(self, streams: int, width: int, tokens: int) -> None:
        self.streams, self.width, self.tokens = streams, width, tokens
        self.kept: dict[int, tuple[int, str]] = {}
        self.dropped: dict[int, tuple[int, str]] = {}
        self.replay_peak_bytes = 0
        self._held: list[Tensor] = []
        self._hooks: saved_tensors_hooks | None = None

    def __enter__(self) -> SavedTensorMeter:
        _METER.append(self)
        self._hooks = saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        _METER.remove(self)

    def _pack(self, t: Tensor) -> Tensor:
        self.add_kept(t)
        return t

    def _entry(self, t: Tensor) -> tuple[int, str]:
        storage = t.untyped_storage()
        per_token = storage.nbytes() / (self.tokens * t.element_size())
        kind = {self.streams * self.width: "streams", self.width: "width"}.get(per_token, "other")
        return storage.nbytes(), kind

    def add_kept(self, t: Tensor) -> None:
        if not (t.is_leaf and t.requires_grad):  # parameters are not activations
            self.kept.setdefault(_storage_key(t), self._entry(t))

    def add_dropped(self, t: Tensor) -> None:
        self._held.append(t)
        self.dropped.setdefault(_storage_key(t), self._entry(t))

    def add_replay(self, recomputed: list[Tensor]) -> None:
        nbytes = {_storage_key(t): t.untyped_storage().nbytes() for t in recomputed}
        self.replay_peak_bytes = max(self.replay_peak_bytes, sum(nbytes.values()))

    def kept_bytes(self, kind: str | None = None) -> int:
        return sum(b for b, c in self.kept.values() if kind in (None, c))

    def dropped_bytes(self, kind: str | None = None) -> int:
        return sum(b for b, c in self.dropped.values() if kind in (None, c))
