"""mHC recomputation in blocks of L_r layers (docs/DESIGN.md §4, the paper's §4.3).

What is kept and what is recomputed, per hyper-connected sublayer k of a block:

    kept        x_{l0} [T, n, C]        the block's input (one per block and stage)
                y_k    [T, C]           the sublayer output F(...), needed to rebuild x_{k+1}
                H_pre, H_post, H_res    the mappings, (2n + n^2) floats a token: rebuilding them
                                        would cost the projection and Sinkhorn again
                F's own internals       (attention q/k/v, MLP hidden, ...): F is not recomputed
    recomputed  x_k    [T, n, C]        k > 0: x_{k+1} = H_res x_k + H_post^T y_k   (post/res kernel)
                u_k    [T, C]           H_pre x_k                                 (aggregate kernel)
                RMSNorm(u_k) [T, C]     F's pre-norm (and what it saves), as the paper counts it

How: the block's forward runs under ``saved_tensors_hooks``. Each hyper-connection
reports its mappings to the segment; tensors saved for the backward that view x_k, u_k
or RMSNorm(u_k), or that F's pre-norm saves, become handles; everything else is kept.
In the backward each handle's value is rebuilt on first use straight from the forward
kernels, with no autograd graph, and released once autograd has unpacked it as often
as the forward packed it. The autograd graph is the very graph of the forward and the
rebuild runs the same kernels on the same values, so gradients are bitwise those
without recomputation (the fused forward's u and the aggregate kernel share one tile
function). The cost is one post/res and one aggregate kernel per sublayer (the last
post/res of a block, whose output the next block keeps, is skipped) and the norm.

Memory: the x chain is rebuilt once per backward pass (x_{k+1} needs x_k), so the
transient is the x_k still ahead of the backward, at most 2 L_r - 1 of them, plus one
sublayer's u_k and RMSNorm(u_k). A second pass over a retained graph, such as the
zero-bubble W after its B (torch's ``stage_backward_input`` / ``stage_backward_weight``),
rebuilds what it unpacks again. ``replay_once=True`` keeps everything rebuilt until
the graph is freed instead: one rebuild, the chunk's recomputed blocks held from B to W.

Blocks are global (``layer // L_r``) and cut at stage boundaries: each stage
keeps its own first input, so a block spanning two stages costs one extra kept
input. The plain residual (n = 1, no mappings) has nothing to recompute. Not
thread-safe: one forward per module at a time.
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
    if block_layers is None or not torch.is_grad_enabled() or all(b.attn.kind == "plain" for b in blocks):
        return run_chain(blocks, x)
    for a, b in block_segments(first_layer, len(blocks), block_layers):
        x = _Segment(blocks[a:b], replay_once=replay_once, then=blocks[b] if b < len(blocks) else None).forward(x)
    return x


def run_chain(blocks: Sequence[nn.Module], x: Tensor, then: nn.Module | None = None) -> Tensor:
    """``blocks`` in turn, each told which one its output feeds (``then`` after the last): the fused
    mHC ops fuse each post/res op with the next pre op across that seam."""
    for i, block in enumerate(blocks):
        x = block(x, then=blocks[i + 1] if i + 1 < len(blocks) else then)
    return x


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


Name = tuple[str, int]  # ("x", k) | ("u", k) | ("nu", k) | ("norm", k): sublayer k's rebuildable values


@dataclass(eq=False)
class _Named:
    """A dropped tensor that views a rebuildable output: x_k (k > 0), u_k or nu_k."""

    segment: _Segment
    name: Name
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the output's own


@dataclass(eq=False)
class _NormSave:
    """The ``index``-th tensor F's pre-norm of sublayer ``k`` saved; rebuilt by running the norm again."""

    segment: _Segment
    k: int
    index: int


@dataclass(eq=False)
class _Sublayer:
    """What the forward recorded of hyper-connected sublayer k to rebuild its intermediates later:
    the op table it ran on and its mappings (a few floats a token, kept), its kept output y_k."""

    hc: nn.Module
    ops: object | None = None
    h_pre: Tensor | None = None
    h_post: Tensor | None = None
    h_res: Tensor | None = None
    y: Tensor | None = None
    norm_saves: int = 0  # tensors F's pre-norm saved in the forward


@dataclass(eq=False)
class _Segment:
    """One recompute block's slice on one stage.

    Forward: records, per sublayer, its mappings and output y_k; tensors the mHC code and F's
    pre-norm save are dropped when they view x_k (k > 0), u_k or nu_k, or come from the norm, and
    kept otherwise (x_{l0}, y_k, the mappings, parameters, F's own internals).
    Backward: each dropped value is rebuilt on first use, straight from the fused forward kernels
    (no autograd, no projection, no Sinkhorn: the mappings were kept):
        x_{k+1} = post_res(x_k, y_k, H_post, H_res)     the chain, from x_{l0}
        u_k     = H_pre x_k                               ops.aggregate
        nu_k    = norm(u_k)                               F's pre-norm, run again for what it saves
    and released once autograd has unpacked it as often as the forward packed it, so the
    backward holds the x chain still ahead of it plus one sublayer's u_k and nu_k.
    """

    blocks: Sequence[nn.Module]
    replay_once: bool = False
    then: nn.Module | None = None  # the block after this segment in the stage (the chain goes on across it)
    x0: Tensor | None = None
    subs: list[_Sublayer] = field(default_factory=list)
    kept: set[int] = field(default_factory=set)
    names: dict[int, tuple[Name, Tensor]] = field(default_factory=dict)  # forward only
    handles: dict[Name, int] = field(default_factory=dict)  # handles packed per name: unpacks per pass
    cache: dict[Name, object] = field(default_factory=dict)
    left: dict[Name, int] = field(default_factory=dict)
    regions: list[str] = field(default_factory=lambda: ["mhc"])
    autocast: tuple[str, bool, torch.dtype] | None = None
    meter: object | None = None
    replays: int = 0  # walks of the x chain (one per backward pass over the block)
    in_f: int = -1  # the sublayer whose F runs (forward)

    def hyper_connections(self) -> list[nn.Module]:
        return [hc for block in self.blocks for hc in (block.attn, block.mlp)]

    def forward(self, x: Tensor) -> Tensor:
        self.x0 = x.detach()
        device = x.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.kept.add(_storage_key(x))
        self.meter = _METER[-1] if _METER else None
        with self._recording(), saved_tensors_hooks(self._pack, _unpack):
            x = run_chain(self.blocks, x, self.then)
        # The named outputs were held only so their storages could not be reused while
        # their keys were live; from here on every save is packed.
        self.names.clear()
        if self.meter is not None:
            self.meter.add_kept(self.x0)
        return x

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Forward-only hooks: name x_k, u_k, nu_k; F is its own region, its pre-norm another."""
        handles = []
        hcs = self.hyper_connections()
        self.subs = [_Sublayer(hc) for hc in hcs]
        for k, hc in enumerate(hcs):
            hc.recorder = self._recorder(k)
            handles.append(hc.register_forward_pre_hook(self._enter_hc(k)))
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
            for hc in hcs:
                hc.recorder = None
            for h in handles:
                h.remove()

    def _recorder(self, k: int):
        def record(ops, h_pre: Tensor, h_post: Tensor, h_res: Tensor) -> None:
            s = self.subs[k]
            s.ops, s.h_pre, s.h_post, s.h_res = ops, h_pre, h_post, h_res

        return record

    def _enter_hc(self, k: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if k > 0 and args and isinstance(args[0], Tensor):
                self._name(args[0], ("x", k))

        return hook

    def _enter_f(self, k: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.regions.append("F")
            self.in_f = k
            if args and isinstance(args[0], Tensor):
                self._name(args[0], ("u", k))

        return hook

    def _leave_f(self, k: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.regions.pop()
            self.subs[k].y = out.detach()
            self.kept.add(_storage_key(out))

        return hook

    def _enter_norm(self, module: nn.Module, args: tuple) -> None:
        self.regions.append("norm")

    def _leave_norm(self, k: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.regions.pop()
            self._name(out, ("nu", k))

        return hook

    def _name(self, t: Tensor, name: Name) -> None:
        key = _storage_key(t)
        if key not in self.kept:
            self.names[key] = (name, t)  # the reference keeps the key unique during the forward

    def _pack(self, t: Tensor) -> object:
        key = _storage_key(t)
        if key in self.kept or (t.is_leaf and t.requires_grad):
            return self._keep(t)
        if self.regions[-1] == "norm":
            k = self.in_f
            handle: object = _NormSave(self, k, self.subs[k].norm_saves)
            self.subs[k].norm_saves += 1
            name: Name = ("norm", k)
        else:
            entry = self.names.get(key)
            if entry is None:  # mappings, F's own internals, a reference op's fp32 upcasts
                return self._keep(t)
            name, out = entry
            handle = _Named(self, name, t.size(), t.stride(), t.storage_offset() - out.storage_offset())
        self.handles[name] = self.handles.get(name, 0) + 1
        if self.meter is not None:
            self.meter.add_dropped(t)
        return handle

    def _keep(self, t: Tensor) -> Tensor:
        if self.meter is not None:
            self.meter.add_kept(t)
        return t

    def unpack_named(self, h: _Named) -> Tensor:
        out = self._get(h.name)
        t = out.as_strided(h.size, h.stride, out.storage_offset() + h.offset)
        self._consumed(h.name)
        return t

    def unpack_norm(self, h: _NormSave) -> Tensor:
        t = self._get(("norm", h.k))[h.index]
        self._consumed(("norm", h.k))
        return t

    def _consumed(self, name: Name) -> None:
        """One more of the name's handles unpacked; the last one of a pass frees it (a later pass,
        such as the zero-bubble W over a retained graph, rebuilds it) unless ``replay_once``."""
        if self.replay_once:
            return
        self.left[name] -= 1
        if self.left[name] == 0:
            del self.cache[name]

    def _get(self, name: Name) -> object:
        """``name``'s value, rebuilt if absent, then held until its handles are all unpacked."""
        if name not in self.cache:
            value = self._rebuild(name)
            if self.handles.get(name, 0) == 0:  # an intermediate nobody saved (u_k under a norm)
                return value
            self.cache[name], self.left[name] = value, self.handles[name]
            if self.meter is not None:
                self.meter.add_replay([t for v in self.cache.values() for t in (v if isinstance(v, list) else [v])])
        return self.cache[name]

    def _x(self, k: int) -> Tensor:
        return self.x0 if k == 0 else self._get(("x", k))

    def _rebuild(self, name: Name) -> object:
        kind, k = name
        device, enabled, dtype = self.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # as in the forward
            if kind == "x":
                if k == 1 or ("x", k - 1) in self.cache:  # where this walk of the chain starts
                    self.replays += 1
                s = self.subs[k - 1]
                with torch.no_grad():
                    return s.ops.post_res(self._x(k - 1), s.y, s.h_post, s.h_res)
            if kind == "u":
                s = self.subs[k]
                with torch.no_grad():
                    return s.ops.aggregate(self._x(k), s.h_pre)
            saves, nu = self._rerun_norm(k)
            other: Name = ("nu", k) if kind == "norm" else ("norm", k)
            if self.handles.get(other, 0) and other not in self.cache:
                self.cache[other], self.left[other] = (nu if kind == "norm" else saves), self.handles[other]
            return saves if kind == "norm" else nu

    def _rerun_norm(self, k: int) -> tuple[list[Tensor], Tensor]:
        """F's pre-norm of sublayer k on the rebuilt u_k, with autograd on: what it saves, and its output."""
        s = self.subs[k]
        u = self._get(("u", k)).detach().requires_grad_()
        saves: list[Tensor] = []

        def pack(t: Tensor) -> None:
            if not (t.is_leaf and t.requires_grad):  # the norm's weight, kept in the forward
                saves.append(t.detach())

        with torch.enable_grad(), saved_tensors_hooks(pack, _unpack):
            nu = s.hc.sublayer.norm(u.view_as(u))  # a view: u is no leaf here, as in the forward
        if len(saves) != s.norm_saves:
            raise RuntimeError(
                f"recomputing sublayer {k}'s pre-norm saved {len(saves)} tensors where the forward saved "
                f"{s.norm_saves}: the norm must run the same ops in the backward as in the forward"
            )
        return saves, nu.detach()


def _unpack(packed: object) -> Tensor:
    if isinstance(packed, _Named):
        return packed.segment.unpack_named(packed)
    if isinstance(packed, _NormSave):
        return packed.segment.unpack_norm(packed)
    return packed


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
